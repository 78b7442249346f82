"""`portfolio serve`: an OpenAI-compatible HTTP server over the registry."""
