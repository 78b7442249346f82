"""llama.cpp through llama-cpp-python, in this process: the base's GGUF as it is shipped
(the embedded default is Q4_1) with a version's GGUF adapter (`portfolio export --format
gguf`) on top, greedy, token ids in and out — so a comparison with `portfolio generate`
compares the models, not two tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

from portfolio.errors import InvalidState


def available() -> str | None:
    """None when llama-cpp-python can be imported, else why not (with the fix)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama-cpp-python is not installed ({exc}); run `make engines`"
    return None


class LlamaCpp:
    """One llama.cpp model: ``base`` (a GGUF file) with ``adapter`` (a GGUF LoRA) or none."""

    def __init__(self, base: str | os.PathLike, adapter: str | os.PathLike | None = None, n_ctx: int = 2048,
                 threads: int | None = None):
        problem = available()
        if problem:
            raise InvalidState(problem)
        from llama_cpp import Llama

        for path in [base] + ([adapter] if adapter else []):
            if not Path(path).is_file():
                raise InvalidState(f"{path} does not exist; export the version with `portfolio export REF DIR --format gguf`")
        self.llm = Llama(model_path=str(base), lora_path=str(adapter) if adapter else None, n_ctx=n_ctx, seed=0,
                         n_threads=threads or max(1, (os.cpu_count() or 2)), verbose=False, logits_all=False)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """The greedy continuation of ``prompt_ids`` (stops at end-of-sequence)."""
        self.llm.reset()
        out: list[int] = []
        eos = self.llm.token_eos()
        for token in self.llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if token == eos:
                break
            out.append(int(token))
            if len(out) >= max_new_tokens:
                break
        return out

    def close(self) -> None:
        """Free the model."""
        self.llm.close()
