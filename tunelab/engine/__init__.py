"""The engine: requests in, batched forward passes, token events out."""
