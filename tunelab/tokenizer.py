"""Tokenizer: text <-> token ids for every model tunelab runs.

One class wraps a `tokenizers.Tokenizer` (HF's Rust library), built either from
an HF directory's `tokenizer.json` or from what a GGUF file carries instead: its
vocabulary, merges, token types and the name of its pre-tokenizer. All of these
models use GPT-2 style byte-level BPE, so every token stands for exact bytes
(`token_bytes`), which is what UTF-8-safe streaming needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from tunelab.errors import ModelFormatError, ModelNotFound
from tunelab.weights.gguf_file import GGUFFile


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes spell themselves, the rest move to U+0100 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in spelling):
        spelling[b] = chr(256 + n)
    return spelling


# str.translate table from a byte-level character to the Latin-1 character of its byte,
# so `.translate(...).encode("latin-1")` turns a token spelling into its bytes in C.
_SPELLING_TO_LATIN1 = {ord(char): byte for byte, char in _byte_to_char().items()}

# Split regexes, as llama.cpp (llama-vocab.cpp) and the models' own tokenizer.json write them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_V3_SPLIT = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SINGLE_DIGIT = r"\p{N}"


@dataclass(frozen=True)
class PreTokenizer:
    """How a `tokenizer.ggml.pre` name cuts text before BPE: regex splits applied in order."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # Llama 3: a whole piece that is a token wins over merging it
    adds_bos: bool = False  # llama.cpp's default when the file has no add_bos_token key


_LLAMA3 = PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, adds_bos=True)
_QWEN2 = PreTokenizer((_QWEN2_SPLIT,))
_DIGITS_THEN_GPT2 = PreTokenizer((_SINGLE_DIGIT, _GPT2_SPLIT))
_GPT2 = PreTokenizer((_GPT2_SPLIT,))

GGUF_PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "stablelm2": _QWEN2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "falcon3": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "dbrx": _LLAMA3,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "gpt-2": _GPT2,
    "default": _GPT2,  # a file that names no pre-tokenizer; transformers reads it as GPT-2 too
    "deepseek-coder": PreTokenizer(
        (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", _SINGLE_DIGIT)),
    "deepseek-v3": PreTokenizer(
        (r"\p{N}{1,3}", r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK_V3_SPLIT)),
}

# llama.cpp token types (gguf.TokenType)
_CONTROL = 3
_USER_DEFINED = 4

# Tokens that end a turn in the families tunelab runs; generation stops on any present.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


class Tokenizer:
    """Byte-level BPE tokenizer with special tokens, a BOS policy and the model's chat template.

    `backend` is the wrapped `tokenizers.Tokenizer`."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None, eos_token: str | None,
                 add_bos: bool, chat_template: str | None):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None
        self._add_bos = bool(add_bos)
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self._added_bytes = {i: token.content.encode("utf-8") for i, token in added.items()}
        self.special_token_ids = frozenset(i for i, token in added.items() if token.special)
        end_of_turn = {backend.token_to_id(text) for text in _END_OF_TURN} & self.special_token_ids
        self.stop_token_ids = frozenset(end_of_turn | ({self.eos_token_id} - {None}))

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a GGUF file or of an HF model directory."""
        path = Path(path)
        if path.is_dir():
            return cls.from_hf_dir(path)
        if not path.is_file():
            raise ModelNotFound(f"no model at {path}; give a GGUF file or an HF model directory")
        with path.open("rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        if not is_gguf:
            raise ModelFormatError(f"{path} is not a GGUF file; give a GGUF file or an HF model directory")
        return cls.from_gguf_metadata(GGUFFile(path).metadata)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Read `tokenizer.json` and `tokenizer_config.json` (chat template, bos/eos) from an HF directory."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFormatError(
                f"{path} has no tokenizer.json; save the tokenizer there with transformers' save_pretrained")
        # Asked of the built tokenizer, not of the parsed JSON: a 151k-token vocabulary as Python
        # objects costs ~120 MB of memory that the allocator keeps after it is freed.
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        decoder = type(backend.decoder).__name__ if backend.decoder is not None else None
        if not isinstance(backend.model, models.BPE) or decoder != "ByteLevel":
            raise ModelFormatError(
                f"{tokenizer_file} is not a byte-level BPE tokenizer (decoder {decoder!r}); "
                "tunelab runs GPT-2 style tokenizers such as Qwen's, Llama 3's and SmolLM2's")
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        bos_token = _token_text(config.get("bos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # no flag: the tokenizer.json post-processor decides, as in transformers
            bos_id = backend.token_to_id(bos_token) if bos_token is not None else None
            add_bos = bos_id is not None and backend.encode("").ids[:1] == [bos_id]
        return cls(backend, bos_token=bos_token, eos_token=_token_text(config.get("eos_token")),
                   add_bos=add_bos, chat_template=_hf_chat_template(path, config))

    def save_hf_dir(self, path: str | Path) -> None:
        """Write this tokenizer as an HF directory (`tokenizer.json`, `tokenizer_config.json`) that `from_hf_dir` reads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.json").write_text(self.backend.to_str(), encoding="utf-8")
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "add_bos_token": self._add_bos,
                  "chat_template": self.chat_template}
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes from its `tokenizer.*` metadata."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelFormatError(
                f"GGUF tokenizer model {model!r} is not supported; tunelab reads byte-level BPE ('gpt2') "
                "tokenizers, such as Qwen's, Llama 3's and SmolLM2's")
        pre_name = metadata.get("tokenizer.ggml.pre", "default")
        pre = GGUF_PRE_TOKENIZERS.get(pre_name)
        if pre is None:
            raise ModelFormatError(
                f"GGUF pre-tokenizer {pre_name!r} is not supported; use a model whose tokenizer.ggml.pre "
                f"is one of: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}")
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        # Normal tokens are stored in byte-level spelling, control and user-defined ones as their
        # literal text; the vocabulary keeps both as stored so added tokens find their own ids.
        vocab = {token: i for i, token in enumerate(tokens)}
        merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                    for token, kind in zip(tokens, token_types) if kind == _CONTROL and token])
        # User-defined tokens such as `<think>` are matched whole but stay in skip_special_tokens output.
        backend.add_tokens([AddedToken(token, special=False, normalized=False)
                            for token, kind in zip(tokens, token_types) if kind == _USER_DEFINED and token])

        def token_at(key: str) -> str | None:
            token_id = metadata.get(key)
            return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

        return cls(backend, bos_token=token_at("tokenizer.ggml.bos_token_id"),
                   eos_token=token_at("tokenizer.ggml.eos_token_id"),
                   add_bos=metadata.get("tokenizer.ggml.add_bos_token", pre.adds_bos),
                   chat_template=metadata.get("tokenizer.chat_template"))

    # ---- use ----------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in it become their ids. BOS is added per the
        model's default unless `add_bos` says otherwise, and never twice."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self._add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            if ids[:1] != [self.bos_token_id]:
                ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; invalid UTF-8 becomes U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (an added token: its text as UTF-8; an unknown id: b"")."""
        added = self._added_bytes.get(token_id)
        if added is not None:
            return added
        spelling = self.backend.id_to_token(token_id)
        if spelling is None:
            return b""
        try:
            return spelling.translate(_SPELLING_TO_LATIN1).encode("latin-1")
        except UnicodeEncodeError:  # not byte-level spelled: the decoder passes it through as UTF-8
            return spelling.encode("utf-8")

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary spelling of a token id (byte-level for normal tokens), or None."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary spelling, or None."""
        return self.backend.token_to_id(token)

    @cached_property
    def token_texts(self) -> list[str]:
        """Each token id's text on its own (what DRY's sequence breakers are matched against)."""
        return self.backend.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)


def _token_text(value: str | dict | None) -> str | None:
    # tokenizer_config.json writes a special token either as its text or as a serialized AddedToken.
    return value.get("content") if isinstance(value, dict) else value


def _hf_chat_template(path: Path, config: dict) -> str | None:
    """The chat template of an HF directory: `chat_template.jinja`, else tokenizer_config's."""
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template
