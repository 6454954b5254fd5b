"""Reading model weights: HF safetensors directories and GGUF files, streamed into a `Transformer`."""
