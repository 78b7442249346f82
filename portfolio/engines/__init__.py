"""The serving engines teams deploy to, driven from portfolio: llama.cpp (`llamacpp`) today.
Each engine is one module; what portfolio compares against it is `parity`."""
