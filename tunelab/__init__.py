"""tunelab: run Qwen3-family models locally, shape their sampling, serve them, tune them."""

__version__ = "0.1.0"
