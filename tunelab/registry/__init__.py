"""The model registry: Modelfiles, model names, the local store, and imports from Ollama."""
