"""llama.cpp through llama-cpp-python, in this process: the base's GGUF as it is shipped
(the embedded default is Q4_1) with a version's GGUF adapter (`portfolio export --format
gguf`) on top, greedy, token ids in and out — so a comparison with `portfolio generate`
compares the models, not two tokenizers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from portfolio.basemodel import resolve_source
from portfolio.errors import InvalidState


@dataclass(frozen=True)
class Target:
    """A base as llama.cpp serves it: a result label (``llamacpp:Q4_1``), the identity a
    stored result is keyed by, and the GGUF file."""

    label: str
    identity: dict[str, str]
    base_file: Path

    @property
    def source(self) -> str:
        """What the engine serves from: the GGUF file."""
        return str(self.base_file)

    @contextmanager
    def session(self, registry, work: Path, log=print, max_rank: int = 8) -> Iterator["Target"]:
        """Nothing to start: llama.cpp runs in this process, one model at a time."""
        yield self

    @contextmanager
    def model(self, registry, ref: str | None, work: Path, logits: bool) -> Iterator["LlamaCpp"]:
        """The base file with ``ref``'s GGUF adapter (None: the base alone), answering."""
        from portfolio.export import GGUF_FILE, export_version

        adapter = export_version(registry, ref, work / "gguf", card=False, format="gguf") / GGUF_FILE if ref else None
        engine = LlamaCpp(self.base_file, adapter, logits_all=logits)
        try:
            yield engine
        finally:
            engine.close()


def target(base, spec: str, log=print) -> Target:
    """``llamacpp`` (the base's registered GGUF file as it is) or ``llamacpp:QUANT`` over
    ``base``: another quantisation type is made from the registered file by llama.cpp's own
    quantize (cached by the file's sha256 and the type), so a gate can judge the model a
    coarser deployment would serve."""
    name, _, quant = spec.partition(":")
    if name != "llamacpp":
        raise InvalidState(f"unknown engine {spec!r}; use llamacpp or llamacpp:QUANT (e.g. llamacpp:Q2_K)")
    problem = available()
    if problem:
        raise InvalidState(problem)
    if not base.gguf_file:
        raise InvalidState(f"base {base.name} has no GGUF file; llama.cpp serves GGUF bases (register one with --gguf-file)")
    base_file = resolve_source(base.source) / base.gguf_file
    found = quantization(base_file)
    if not quant or quant.upper() == found:
        # the registered file is the base's weights: its sha256 is already known
        return Target(f"llamacpp:{found}", identity(base_file, base.weights_sha256, base.weights_sha256), base_file)
    made = requantized(base_file, base.weights_sha256, quant.upper(), log)
    return Target(f"llamacpp:{quant.upper()}", {**identity(made, base.weights_sha256), "requantized_from": found}, made)


def quant_types() -> dict[str, int]:
    """llama.cpp's quantisation types by name (``Q2_K``, ``Q4_K_M``, ``Q8_0``, ``F16``, …)."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {k[len(prefix):]: v for k, v in vars(llama_cpp).items() if k.startswith(prefix) and isinstance(v, int)}


def requantized(base_file: Path, base_sha256: str, quant: str, log=print) -> Path:
    """``base_file`` quantised to ``quant`` by llama.cpp's quantize API (requantising an
    already quantised file, as `llama-quantize --allow-requantize` does), cached under
    portfolio's cache by the source's sha256. A finer type made from a coarser file cannot
    restore what was lost: it measures the engine's arithmetic, not a better base."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    from portfolio.store.cache import cache_root

    types = quant_types()
    if quant not in types:
        raise InvalidState(f"llama.cpp has no quantisation type {quant!r}; use one of {', '.join(sorted(types))}")
    out = cache_root() / "gguf" / f"{base_sha256}.{quant}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"quantising {base_file.name} to {quant} with llama.cpp (cached in {out.parent})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = types[quant], True, max(1, os.cpu_count() or 1)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with suppress_stdout_stderr(disable=False):
            code = llama_cpp.llama_model_quantize(str(base_file).encode(), str(tmp).encode(), params)
        if code != 0 or not tmp.is_file():
            raise InvalidState(f"llama.cpp could not quantise {base_file.name} to {quant} (code {code})")
        os.replace(tmp, out)  # whole or absent: a crash midway leaves no half file in the cache
    finally:
        tmp.unlink(missing_ok=True)
    return out


def quantization(path: str | os.PathLike) -> str:
    """The GGUF file's weight type as llama.cpp names it (``Q4_1``, ``F16``, …)."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return "unknown"
    name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def identity(base_file: str | os.PathLike, base_sha256: str, file_sha256: str | None = None) -> dict[str, str]:
    """What a result on llama.cpp depends on beyond the model: the engine, its version, the
    registered base's sha256, the served file's quantisation and sha256 (hashed here unless
    given)."""
    import llama_cpp

    from portfolio.store.digests import sha256_file

    return {"engine": "llamacpp", "version": llama_cpp.__version__, "base_sha256": base_sha256,
            "quantization": quantization(base_file), "file_sha256": file_sha256 or sha256_file(base_file)}


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
                 threads: int | None = None, logits_all: bool = False):
        problem = available()
        if problem:
            raise InvalidState(problem)
        from llama_cpp import Llama

        for path in [base] + ([adapter] if adapter else []):
            if not Path(path).is_file():
                raise InvalidState(f"{path} does not exist; export the version with `portfolio export REF DIR --format gguf`")
        self.llm = Llama(model_path=str(base), lora_path=str(adapter) if adapter else None, n_ctx=n_ctx, seed=0,
                         n_threads=threads or max(1, (os.cpu_count() or 2)), verbose=False, logits_all=logits_all)
        self.n_ctx = n_ctx

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

    def option_logprobs(self, prompt_ids: list[int], options: list[list[int]]) -> list[float]:
        """For each option (token ids), the summed log-probability of its tokens after the
        prompt, from llama.cpp's own logits (needs ``logits_all``)."""
        import numpy as np

        out = []
        for option in options:
            seq = prompt_ids + option
            if len(seq) > self.n_ctx:
                raise InvalidState(f"a prompt with its option is {len(seq)} tokens, over llama.cpp's context of {self.n_ctx}")
            self.llm.reset()
            self.llm.eval(seq)
            logits = np.asarray(self.llm.scores[len(prompt_ids) - 1:len(seq) - 1], dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            out.append(float(logp[np.arange(len(option)), option].sum()))
        return out

    def close(self) -> None:
        """Free the model."""
        self.llm.close()
