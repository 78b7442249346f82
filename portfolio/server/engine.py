"""The serving engine: one base model in memory, adapter versions loaded on first use and kept
in an LRU, and one thread that batches concurrent requests for different adapters into the
same forward passes (PEFT's mixed-adapter batch, ``adapter_names``).

HTTP handlers never touch the model: they `submit` a request and wait on its future. The
engine thread takes the first queued request, gathers what else arrives within
``max_wait_s`` (up to ``batch_size``), and generates greedy requests of single adapters (and
of the base, PEFT's ``__base__``) together in one left-padded batch; a stack — whose parts
must be active together — and a sampled request run in batches of their own.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from portfolio import mixed_batch, runtime



@dataclass
class Request:
    """One generation: whose weights, which tokens, how much."""

    version: Any  # an AdapterVersion, or None for the base alone
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    future: Future = field(default_factory=Future)
    #: Where each new token id goes as it is generated, then `END` once the future is
    #: resolved (None: the request waits for the whole completion).
    sink: queue.Queue | None = None


#: What a request's sink receives after its last token (its future is resolved by then).
END = object()


@dataclass(frozen=True)
class Completion:
    """What a request produced."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence) or "length"
    prompt_tokens: int


class Engine:
    """A base model serving many adapter versions (see the module docstring)."""

    def __init__(self, registry, base, *, max_adapters: int = 8, batch_size: int = 8, max_wait_s: float = 0.005,
                 device: str = "auto", log=print):
        from portfolio.modeling import load_base

        self.registry, self.base = registry, base
        self.max_adapters, self.batch_size, self.max_wait_s = max_adapters, batch_size, max_wait_s
        self.device = runtime.resolve_device(device)
        self.model, self.tokenizer = load_base(base, log=log)
        self.model.to(self.device).eval()
        self.pad_id = runtime.pad_id(self.tokenizer)
        self.loaded: OrderedDict[str, list[str]] = OrderedDict()  # serving key -> PEFT adapter names, LRU last
        self.queue: queue.Queue[Request | None] = queue.Queue()
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name="portfolio-engine", daemon=True)
        self._thread.start()

    # -- what handlers call ---------------------------------------------------------------

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation with the assistant's turn opened."""
        from portfolio.data.tokenize import chat_prompt_ids

        return chat_prompt_ids(self.tokenizer, messages)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a plain prompt."""
        return list(self.tokenizer(text)["input_ids"])

    def submit(self, request: Request) -> Future:
        """Queue a request; its future resolves to a `Completion`."""
        self.queue.put(request)
        return request.future

    def close(self) -> None:
        """Stop the engine thread (requests in flight finish first)."""
        self.queue.put(None)
        self._thread.join(timeout=30)

    # -- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.batch_size:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[Request]) -> None:
        try:
            self._run_groups(batch)
        finally:
            for req in batch:
                if req.sink is not None:
                    req.sink.put(END)

    def _run_groups(self, batch: list[Request]) -> None:
        groups: dict[Any, list[tuple[Request, list[str]]]] = {}
        in_use: set[str] = set()
        for req in batch:
            try:
                names = self._names(req.version, in_use)
            except Exception as exc:  # a version that cannot be loaded fails its own request only
                req.future.set_exception(exc)
                continue
            greedy = req.temperature == 0
            # PEFT mixes plain LoRA adapters in one pass, not DoRA ones: a DoRA version's
            # greedy requests share a batch of their own
            dora = len(names) == 1 and mixed_batch.is_dora(self.model, names[0])
            key = "mixed" if greedy and len(names) <= 1 and not dora else (tuple(names), "greedy" if greedy else id(req))
            groups.setdefault(key, []).append((req, names))
        for key, items in groups.items():
            try:
                outs = self._generate(items, mixed=key == "mixed")
            except Exception as exc:
                for req, _ in items:
                    if not req.future.done():
                        req.future.set_exception(exc)
                continue
            for (req, _), out in zip(items, outs):
                req.future.set_result(out)

    def _names(self, version, in_use: set[str]) -> list[str]:
        """PEFT adapter names of a version, loading it if needed and evicting the least
        recently used version beyond ``max_adapters`` that this batch does not use; [] for
        the base."""
        if version is None:
            return []
        from portfolio.serving import serving_key

        key = serving_key(self.registry, version)
        in_use.add(key)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        for old in [k for k in self.loaded if k not in in_use][: max(0, len(self.loaded) + 1 - self.max_adapters)]:
            self._unload(self.loaded.pop(old))
        names = self._load(version, key)
        self.loaded[key] = names
        return names

    def _load(self, version, key: str) -> list[str]:
        """Attach a version's parts as PEFT adapters (`serving.attach`, which removes the
        folder it read them from). A load that fails midway (bytes gone, a damaged blob)
        takes back the parts it had attached, so the model holds only what `loaded` lists."""
        from peft import PeftModel

        from portfolio.serving import attach

        prefix = f"s{hashlib.sha256(key.encode()).hexdigest()[:12]}_"
        before = set(self.model.peft_config) if isinstance(self.model, PeftModel) else set()
        try:
            self.model, names = attach(self.model, self.registry, version.ref, prefix=prefix)
        except BaseException:
            if isinstance(self.model, PeftModel):
                self._unload([n for n in self.model.peft_config if n not in before])
            raise
        self.model.to(self.device).eval()
        return names

    def _unload(self, names: list[str]) -> None:
        """Delete adapters from the model. PEFT leaves a deleted adapter named active, so
        the active one is reset to a survivor; with none left the model is unwrapped back to
        the bare base, which a PeftModel without adapters cannot stand in for."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in names:
                if name in self.model.peft_config:
                    self.model.delete_adapter(name)
            remaining = list(self.model.peft_config)
            if not remaining:
                self.model = self.model.unload()
            elif not set(self.model.active_adapters) <= set(remaining):
                self.model.set_adapter(remaining[0])
        self.model.eval()

    def _generate(self, items: list[tuple[Request, list[str]]], mixed: bool) -> list[Completion]:
        import torch
        from peft import PeftModel

        from portfolio.data.tokenize import left_pad

        reqs = [req for req, _ in items]
        peft = isinstance(self.model, PeftModel)
        extra: dict[str, Any] = {}
        if mixed and peft:
            extra["adapter_names"] = [(names or [runtime.BASE_ADAPTER])[0] for _, names in items]
        elif not mixed and items[0][1]:
            from portfolio.serving import activate

            activate(self.model, items[0][1])
        sampling: dict[str, Any] = {"do_sample": False}
        if reqs[0].temperature > 0:
            torch.manual_seed(reqs[0].seed)
            sampling = {"do_sample": True, "temperature": reqs[0].temperature}
        ids, mask = left_pad([r.prompt_ids for r in reqs], self.pad_id)
        width = ids.shape[1]
        # the base alone in a batch of its own (a sampled request): no adapter may be active
        base_only = self.model.disable_adapter() if not mixed and not items[0][1] and peft else nullcontext()
        if any(r.sink is not None for r in reqs):
            extra["streamer"] = BatchStreamer(reqs, self.tokenizer.eos_token_id)
        with torch.no_grad(), base_only:
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max(r.max_tokens for r in reqs), pad_token_id=self.pad_id, **sampling, **extra)
        self.batches += 1
        eos = self.tokenizer.eos_token_id
        results = []
        for row, r in enumerate(reqs):
            new = out[row, width:].tolist()[: r.max_tokens]
            stop = eos is not None and eos in new
            if stop:
                new = new[: new.index(eos)]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            results.append(Completion(text, new, "stop" if stop else "length", len(r.prompt_ids)))
        return results


class BatchStreamer:
    """transformers' streamer protocol (``put``/``end``) for a whole batch: ``generate``
    hands it the prompt once and then each step's new token of every row, and each row's
    token goes to its request's sink until that row's end of sequence or ``max_tokens`` —
    so every request of a mixed-adapter batch streams as it is generated."""

    def __init__(self, requests: list[Request], eos_id: int | None):
        self.requests, self.eos_id = requests, eos_id
        self.counts = [0] * len(requests)
        self.done = [r.sink is None for r in requests]
        self.prompt_seen = False

    def put(self, value) -> None:
        """One step's tokens (the first call is the prompt, which is not streamed)."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        tokens = value.reshape(len(self.requests), -1)[:, -1].tolist()
        for row, (req, token) in enumerate(zip(self.requests, tokens)):
            if self.done[row]:
                continue
            if token == self.eos_id:
                self.done[row] = True
                continue
            req.sink.put(int(token))
            self.counts[row] += 1
            self.done[row] = self.counts[row] >= req.max_tokens

    def end(self) -> None:
        """Generation is over; the engine signals each sink itself once results are set."""
