"""Any OpenAI-compatible server already running (``openai:URL``): `portfolio serve`, a vLLM,
llama.cpp's server, Ollama's ``/v1``. Portfolio starts nothing: it asks the server for each
version by its name (``NAME@V``; the base as ``base:NAME`` or ``NAME``), sends the same
chat-templated prompt token ids the reference model gets (their text, to a server that takes
only text), and reads greedy answers. Choice checks
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


#: Bumped when how prompts are sent or options scored changes, so stored results are not reused.
CLIENT_VERSION = "2"


class OpenAIModel:
    """One model name on the server, answering from token ids (decoded to the prompt text)."""

    def __init__(self, client: JsonClient, name: str, tokenizer, target: "Target"):
        self.client, self.name, self.tokenizer, self.target = client, name, tokenizer, target

    def _complete(self, prompt_ids: list[int], body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """One legacy completion of ``prompt_ids``: sent as token ids (the OpenAI API allows a
        prompt of integers, and vLLM and llama.cpp take it, so the server sees exactly the
        reference's tokens), or as their text where the server accepts only text. Returns the
        choice and whether the prompt went as token ids."""
        as_ids = not self.target.text_prompts
        prompt: Any = prompt_ids if as_ids else self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        # greedy means no repetition penalty either (llama.cpp's server applies 1.1 unless told)
        status, answer = self.client._call("POST", "/v1/completions", {"model": self.name, "temperature": 0.0, "prompt": prompt,
                                                                        "repeat_penalty": 1.0, **body})
        if as_ids and status in (400, 422, 500):  # a server that takes text only (portfolio serve: 422, llama.cpp's: 500)
            self.target.text_prompts = True
            return self._complete(prompt_ids, body)
        if status == 404:
            raise InvalidState(f"the server at {self.client.url} does not serve {self.name!r} (404): deploy it there first, "
                               "or point --engine at the server that serves it")
        if status != 200 or not isinstance(answer, dict) or not answer.get("choices"):
            raise InvalidState(f"the server at {self.client.url} refused a completion by {self.name} ({status}): {str(answer)[:300]}")
        return answer, as_ids

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """The greedy answer's token ids (the server's text, tokenised as the reference does)."""
        answer, _ = self._complete(prompt_ids, {"max_tokens": max_new_tokens})
        return list(self.tokenizer(answer["choices"][0]["text"], add_special_tokens=False)["input_ids"])

    def option_logprobs(self, prompt_ids: list[int], options: list[list[int]]) -> list[float] | None:
        """Summed log-probabilities of each option's tokens after the prompt, from the echoed
        prompt's log-probabilities; None when the server returns none (choice checks skip)."""
        if self.target.no_logprobs:
            return None
        out = []
        for option in options:
            answer, as_ids = self._complete(prompt_ids + option, {"max_tokens": 1, "echo": True, "logprobs": 0})
            values = (answer["choices"][0].get("logprobs") or {}).get("token_logprobs")
            if not values:
                self.target.no_logprobs = True
                return None
            if as_ids:  # one value per token of the prompt we sent, in order
                picked = values[len(prompt_ids):len(prompt_ids) + len(option)]
            else:  # the server tokenised the text itself: the option is the echoed prompt's last tokens
                # (counted back from the end, less what it generated: servers differ in whether the
                # echo lists special tokens, llama.cpp's leaves them out)
                usage = answer.get("usage") or {}
                n = len(values) - int(usage.get("completion_tokens", 1) if usage else 1)
                picked = values[max(0, n - len(option)):n]
            if len(picked) != len(option) or any(v is None for v in picked):
                self.target.no_logprobs = True
                return None
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
    text_prompts: bool = False
    served: list[str] = field(default_factory=list)
    tokenizer: Any = None  # set by `session`

    @property
    def source(self) -> str:
        """What the engine serves from: the server's URL."""
        return self.url

    @contextmanager
    def session(self, registry, work: Path, log=print, max_rank: int = 8) -> Iterator["Target"]:
        """Nothing to start: the server is already running. The base's tokenizer is loaded
        once, for every model of the run (prompts to text for a text-only server, answers to
        token ids)."""
        from portfolio.modeling import load_tokenizer, model_folder

        self.tokenizer = load_tokenizer(*model_folder(self.base, lambda *_: None))
        yield self

    @contextmanager
    def model(self, registry, ref: str | None, work: Path, logits: bool) -> Iterator[OpenAIModel]:
        """``ref`` (None: the base) as the server names it."""
        yield OpenAIModel(JsonClient(self.url, "the server"), ref or self.base_name(), self.tokenizer, self)

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
    identity = {"engine": "openai", "url": url, "base_sha256": base.weights_sha256, "client": CLIENT_VERSION,
                "version": version.get("version", "unknown") if status == 200 and isinstance(version, dict) else "unknown"}
    return Target(f"openai:{url}", identity, url, base, served=served)
