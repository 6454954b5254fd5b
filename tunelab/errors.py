"""User-facing errors.

Every mistake a user can make (a bad Modelfile line, an unknown model, a prompt
that does not fit) raises a subclass of `TunelabError` whose message names the
input and the fix. The CLI prints the message without a traceback; the server
maps `http_status` to a JSON error response.
"""


class TunelabError(Exception):
    """Base class: a problem the user can fix, with a one-line message saying how."""

    http_status = 400


class ModelNotFound(TunelabError):
    """A model name that is neither in the store nor a path on disk."""

    http_status = 404


class ModelfileError(TunelabError):
    """A Modelfile that does not parse or names something that does not exist."""


class InvalidOption(TunelabError):
    """An option (sampling knob, load option) with a wrong name, type or range."""


class InvalidRequest(TunelabError):
    """A request that is malformed apart from its options (bad messages, bad field)."""


class PromptTooLong(TunelabError):
    """A prompt that does not fit in the context window (`num_ctx`)."""

    http_status = 400


class ModelFormatError(TunelabError):
    """A model file that is truncated, corrupt, or uses something we cannot run."""

    http_status = 422


class UnsupportedArchitecture(ModelFormatError):
    """A model family tunelab does not implement."""


class UnsupportedQuantization(ModelFormatError):
    """A GGUF tensor type tunelab cannot decode."""


class DownloadError(TunelabError):
    """A pull that failed or produced a file whose checksum does not match."""

    http_status = 502


class StoreError(TunelabError):
    """A problem with the local model store (bad name, missing blob, corrupt manifest)."""
