"""Any OpenAI-compatible server already running (``openai:URL``): `portfolio serve`, a vLLM,
llama.cpp's server, Ollama's ``/v1``. Portfolio starts nothing: it asks the server for each
version by its name (``NAME@V``; the base as ``base:NAME`` or ``NAME``), sends the same
chat-templated prompt text the reference model gets, and reads greedy answers. Choice checks
use the legacy completions' ``echo`` + ``logprobs`` where the server returns them, and are
skipped (reported, not failed) where it does not."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portfolio.engines.http import JsonClient
from portfolio.errors import InvalidState


class OpenAIModel:
    """One model name on the server, answering from token ids (decoded to the prompt text)."""

    def __init__(self, client: JsonClient, name: str, tokenizer, target: "Target"):
        self.client, self.name, self.tokenizer, self.target = client, name, tokenizer, target

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        status, answer = self.client._call("POST", "/v1/completions", {"model": self.name, "temperature": 0.0, **body})
        if status == 404:
            raise InvalidState(f"the server at {self.client.url} does not serve {self.name!r} (404): deploy it there first, "
                               "or point --engine at the server that serves it")
        if status != 200 or not isinstance(answer, dict) or not answer.get("choices"):
            raise InvalidState(f"the server at {self.client.url} refused a completion by {self.name} ({status}): {str(answer)[:300]}")
        return answer["choices"][0]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """The greedy answer's token ids (the server's text, tokenised as the reference does)."""
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        text = self._complete({"prompt": prompt, "max_tokens": max_new_tokens})["text"]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def option_logprobs(self, prompt_ids: list[int], options: list[list[int]]) -> list[float] | None:
        """Summed log-probabilities of each option's tokens after the prompt, from the echoed
        prompt's log-probabilities; None when the server returns none (choice checks skip)."""
        if self.target.no_logprobs:
            return None
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        out = []
        for option in options:
            choice = self._complete({"prompt": prompt + self.tokenizer.decode(option), "max_tokens": 1, "echo": True, "logprobs": 0})
            logprobs = choice.get("logprobs") or {}
            offsets, values = logprobs.get("text_offset"), logprobs.get("token_logprobs")
            if not offsets or not values:
                self.target.no_logprobs = True
                return None
            # the echoed prompt's tokens at or past the option's first character, less the one generated
            picked = [v for o, v in zip(offsets[:-1], values[:-1]) if o >= len(prompt) and v is not None]
            out.append(float(sum(picked)))
        return out


@dataclass
class Target:
    """A running OpenAI-compatible server over ``base``."""

    label: str
    identity: dict[str, str]
    url: str
    base: Any
    no_logprobs: bool = False
    served: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        """What the engine serves from: the server's URL."""
        return self.url

    @contextmanager
    def session(self, registry, work: Path, log=print, max_rank: int = 8) -> Iterator["Target"]:
        """Nothing to start: the server is already running."""
        yield self

    @contextmanager
    def model(self, registry, ref: str | None, work: Path, logits: bool) -> Iterator[OpenAIModel]:
        """``ref`` (None: the base) as the server names it."""
        from portfolio.modeling import load_tokenizer, model_folder

        tokenizer = load_tokenizer(*model_folder(self.base, lambda *_: None))
        yield OpenAIModel(JsonClient(self.url, "the server"), ref or self.base_name(), tokenizer, self)

    def base_name(self) -> str:
        """The base's name on the server: ``base:NAME`` (portfolio serve) or ``NAME``."""
        for name in (f"base:{self.base.name}", self.base.name):
            if name in self.served:
                return name
        raise InvalidState(f"the server at {self.url} serves {', '.join(self.served[:6]) or 'no model'}, not base {self.base.name}; "
                           "point --engine at a server of that base")


def target(base, spec: str, log=print) -> Target:
    """``openai:URL`` over ``base``: the server must answer ``/v1/models`` and serve this
    base (by name) or versions of it; another base is refused before anything is judged."""
    url = spec.partition(":")[2].rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InvalidState(f"engine {spec!r}: give the server's address, e.g. openai:http://127.0.0.1:8000")
    client = JsonClient(url, "the server", timeout_s=30)
    status, body = client._call("GET", "/v1/models")
    if status != 200 or not isinstance(body, dict):
        raise InvalidState(f"the server at {url} answered /v1/models with {status}; is it an OpenAI-compatible server?")
    served = [m.get("id", "") for m in body.get("data", [])]
    bases = {s[5:] for s in served if s.startswith("base:")}  # portfolio serve names its base so
    if (bases and base.name not in bases) or (not bases and base.name not in served and not any("@" in s for s in served)):
        raise InvalidState(f"the server at {url} serves {', '.join(served[:6])}, not base {base.name} or its versions; "
                           "point --engine at a server of that base")
    status, version = client._call("GET", "/version")
    identity = {"engine": "openai", "url": url, "base_sha256": base.weights_sha256,
                "version": version.get("version", "unknown") if status == 200 and isinstance(version, dict) else "unknown"}
    return Target(f"openai:{url}", identity, url, base, served=served)
