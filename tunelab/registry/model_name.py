"""Model names: `[host/][namespace/]model[:tag]`, as Ollama spells them.

A name maps to a manifest at `manifests/<host>/<namespace>/<model>/<tag>`, so
every part must be a safe single path component: no separators, no `..`,
nothing empty. Host, namespace and model compare case-insensitively (they are
stored lower-case, as Ollama stores them); the tag keeps its case. Missing parts
take Ollama's defaults, which keeps a tunelab store laid out exactly like an
Ollama one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunelab.errors import StoreError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_PART_LENGTH = 128

# First character alphanumeric, so no part can be "." or start like an option.
_PART_PATTERNS = {
    "host": re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*"),
    "namespace": re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*"),
    "model": re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*"),
    "tag": re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*"),
}
_PART_RULES = {
    "host": "letters, digits, '_', '.', '-' and ':'",
    "namespace": "letters, digits, '_' and '-'",
    "model": "letters, digits, '_', '.' and '-'",
    "tag": "letters, digits, '_', '.' and '-'",
}
_EXAMPLES = "names look like 'qwen3', 'qwen3:8b' or 'namespace/model:tag'"


@dataclass(frozen=True)
class ModelName:
    """A parsed, normalised model name with every part filled in."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def path_parts(self) -> tuple[str, str, str, str]:
        """The four path components of this name's manifest."""
        return (self.host, self.namespace, self.model, self.tag)

    @property
    def display(self) -> str:
        """The shortest unambiguous spelling, as `ollama list` shows it: 'qwen3:latest'."""
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def __str__(self) -> str:
        return self.display


def _invalid(text: str, rule: str) -> StoreError:
    return StoreError(f"invalid model name {text!r}: {rule}; {_EXAMPLES}")


def _check_part(text: str, kind: str, part: str) -> str:
    if not part:
        raise _invalid(text, f"the {kind} part is empty")
    if ".." in part:
        raise _invalid(text, f"'..' is not allowed in the {kind} part")
    if len(part) > MAX_PART_LENGTH:
        raise _invalid(text, f"the {kind} part is longer than {MAX_PART_LENGTH} characters")
    if not _PART_PATTERNS[kind].fullmatch(part):
        raise _invalid(text, f"the {kind} part {part!r} may only hold {_PART_RULES[kind]}, "
                             "starting with a letter or digit")
    return part


def parse_model_name(text: str | ModelName) -> ModelName:
    """Parse `[host/][namespace/]model[:tag]`, filling defaults; raise StoreError naming the broken rule."""
    if isinstance(text, ModelName):
        return text
    if not text or not text.strip():
        raise _invalid(text, "it is empty")
    if text != text.strip():
        raise _invalid(text, "it has leading or trailing spaces")
    if "\\" in text:
        raise _invalid(text, "'\\' is not allowed (a name is not a path)")
    pieces = text.split("/")
    if len(pieces) > 3:
        raise _invalid(text, "at most two '/' are allowed (host/namespace/model)")
    *prefix, last = pieces
    model, has_tag, tag = last.partition(":")
    if has_tag and not tag:
        raise _invalid(text, "the tag after ':' is empty")
    # The parts given fill from the right: "ns/model" keeps the default host only.
    host, namespace = [DEFAULT_HOST, DEFAULT_NAMESPACE][: 2 - len(prefix)] + prefix
    return ModelName(
        host=_check_part(text, "host", host).lower(),
        namespace=_check_part(text, "namespace", namespace).lower(),
        model=_check_part(text, "model", model).lower(),
        tag=_check_part(text, "tag", tag if has_tag else DEFAULT_TAG),
    )
