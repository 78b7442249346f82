"""The serving engines teams deploy to, driven from portfolio: llama.cpp (`llamacpp`, in this
process), vLLM (`vllm`, a server process from its own virtualenv) and any OpenAI-compatible
server already running (`openai:URL`). `target` is the one
table of engines suites run on; what portfolio compares against each is `parity`."""

from __future__ import annotations


def target(base, spec: str, log=print):
    """The engine ``spec`` (``llamacpp[:QUANT]``, ``vllm`` or ``openai:URL``) over ``base``: an object with
    ``label``, ``identity``, ``session(registry, work)`` and ``model(registry, ref, work, logits)``."""
    from portfolio.engines import llamacpp, openai_api, vllm
    from portfolio.errors import InvalidState

    name = spec.partition(":")[0]
    if name == "llamacpp":
        return llamacpp.target(base, spec, log)
    if name == "vllm":
        return vllm.target(base, spec, log)
    if name == "openai":
        return openai_api.target(base, spec, log)
    raise InvalidState(f"unknown engine {spec!r}; use llamacpp[:QUANT], vllm or openai:URL")
