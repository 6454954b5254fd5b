"""`tunelab serve`: the Ollama and OpenAI HTTP APIs over the continuously batched engine."""
