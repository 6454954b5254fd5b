"""One transformer for every supported family, with the batch and cache it runs on."""
