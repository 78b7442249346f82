"""The state of one `portfolio serve` process, kept on ``app.state.server``: its settings,
the resolver from model names to versions, the counters, the request log and the slot
limit. Handlers (`server.api`) read it from the request; nothing lives in closures.

Aliases and routes are resolved in memory and the caches are dropped whenever the registry's
serving change counter moves (`registry.changes`, read on every request), so a promotion, a
rollback or an archive reaches the next request, without a restart, and requests in flight
finish on the version they started with. An archived version is never served."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from portfolio.errors import InvalidState, NotFound, PortfolioError
from portfolio.routing import InvalidRoute, check_request, match
from portfolio.server.engine import END, Completion, Engine
from portfolio.server.engine import Request as EngineRequest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ServerSettings:
    """Limits and choices of one server."""

    router: str | None = None
    api_key: str | None = None
    max_body_bytes: int = 1_000_000
    max_tokens: int = 512
    max_prompt_tokens: int = 4096
    max_concurrency: int = 64
    poll_s: float = 0.0  # how stale routing may be; 0: the change counter is read on every request (one cheap query)
    flush_s: float = 2.0
    request_timeout_s: float = 300.0
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted beside loopback ones when there is no key


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI-style error type and message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass(frozen=True)
class Target:
    """What a request resolved to."""

    version: Any  # AdapterVersion, or None for the base
    label: str  # NAME@7 or base:NAME
    router: str | None
    rule: str | None


class Resolver:
    """``model`` + routing attributes -> the version to serve, from in-memory caches that are
    dropped when the registry's alias, route or status history changes."""

    def __init__(self, registry, base, settings: ServerSettings):
        self.registry, self.base, self.settings = registry, base, settings
        self.lock = threading.Lock()
        self.versions: dict[str, Any] = {}
        self.rules: dict[str, list] = {}
        self.marker = registry.routes.marker()
        self.checked = time.monotonic()

    def refresh(self) -> None:
        """Drop the caches if anything that decides routing changed since the last look."""
        if time.monotonic() - self.checked < self.settings.poll_s:
            return
        marker = self.registry.routes.marker()
        with self.lock:
            self.checked = time.monotonic()
            # The counter only grows; a thread that read it before another's newer read must
            # not set it back (that would clear the caches once more, harmlessly, but also
            # let a read begun before a change be cached under the newer value).
            if marker > self.marker:
                self.marker, self.versions, self.rules = marker, {}, {}

    def _cached(self, kind: str, key: str, load):
        """``cache[key]``, loading it on a miss. A value read while the counter moved is
        returned to its own request but not cached: its read may have begun before a change
        (an archive) that another request has seen since, and caching it would serve the
        old state to every later request."""
        with self.lock:
            cache = getattr(self, kind)  # replaced, not cleared, when the counter moves
            if key in cache:
                return cache[key]
            marker = self.marker
        value = load(key)
        with self.lock:
            if self.marker == marker:
                cache[key] = value
        return value

    def _version(self, ref: str):
        return self._cached("versions", ref, self.registry.get_version)

    def _rules(self, router: str) -> list | None:
        def load(name: str):
            try:
                return self.registry.routes.rules(name)[0]
            except NotFound:
                return None

        return self._cached("rules", router, load)

    def resolve(self, model: str | None, attributes: dict[str, str | None]) -> Target:
        """The version a request gets (ApiError when none can be served)."""
        self.refresh()
        name = model or self.settings.router
        if not name:
            raise ApiError(400, "no model given and the server has no --router: name a version, an alias, base:NAME or a router")
        if name == f"base:{self.base.name}":
            return Target(None, name, None, None)
        if name.startswith("base:"):
            raise ApiError(404, f"this server serves base {self.base.name}, not {name[5:]}", "not_found_error")
        rules = self._rules(name) if "@" not in name else None
        router = rule = None
        ref = name
        if rules is not None:
            try:
                request = check_request(attributes)
            except InvalidRoute as exc:
                raise ApiError(400, str(exc)) from None
            chosen = match(rules, request)
            if chosen is None:
                raise ApiError(404, f"router {name} has no rule for this request and no default", "not_found_error")
            router, rule, ref = name, chosen.label, chosen.to
        try:
            version = self._version(ref)
        except PortfolioError as exc:
            raise ApiError(404, str(exc), "not_found_error") from None
        if version.status == "archived":
            raise ApiError(409, f"{version.ref} is archived and is never served; point the alias or route at a served version",
                           "conflict_error")
        if version.base_model != self.base.name:
            raise ApiError(400, f"{version.ref} is built on base {version.base_model}; this server serves {self.base.name}")
        return Target(version, version.ref, router, rule)


class Stats:
    """Counters for /metrics and the request log (flushed to the registry)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (version, status) -> n
        self.tokens: Counter = Counter()  # kind -> n
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.pending: dict[tuple[str, str, str, datetime], list[int]] = {}

    def served(self, target: Target, completion: Completion, seconds: float) -> None:
        hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
        with self.lock:
            self.requests[(target.label, "200")] += 1
            self.tokens["prompt"] += completion.prompt_tokens
            self.tokens["completion"] += len(completion.token_ids)
            self._observe(seconds)
            if target.version is not None:
                entry = self.pending.setdefault((target.label, target.router or "", target.rule or "direct", hour), [0, 0])
                entry[0] += 1
                entry[1] += completion.prompt_tokens + len(completion.token_ids)

    def failed(self, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[("-", str(status))] += 1
            self._observe(seconds)

    def _observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency[i] += 1
                return
        self.latency[-1] += 1

    def take_pending(self) -> dict:
        with self.lock:
            out, self.pending = self.pending, {}
        return {k: (v[0], v[1]) for k, v in out.items()}

    def prometheus(self, loaded: int) -> str:
        """The Prometheus text format."""
        with self.lock:
            lines = ["# HELP portfolio_requests_total Requests answered, by version and HTTP status.",
                     "# TYPE portfolio_requests_total counter"]
            lines += [f'portfolio_requests_total{{version="{v}",status="{s}"}} {n}' for (v, s), n in sorted(self.requests.items())]
            lines += ["# HELP portfolio_tokens_total Tokens processed.", "# TYPE portfolio_tokens_total counter"]
            lines += [f'portfolio_tokens_total{{kind="{k}"}} {n}' for k, n in sorted(self.tokens.items())]
            lines += ["# HELP portfolio_request_seconds Time to answer a request.", "# TYPE portfolio_request_seconds histogram"]
            total = 0
            for bound, n in zip(LATENCY_BUCKETS, self.latency):
                total += n
                lines.append(f'portfolio_request_seconds_bucket{{le="{bound}"}} {total}')
            total += self.latency[-1]
            lines += [f'portfolio_request_seconds_bucket{{le="+Inf"}} {total}', f"portfolio_request_seconds_sum {self.latency_sum:.6f}",
                      f"portfolio_request_seconds_count {total}"]
            errors = sum(n for (_, s), n in self.requests.items() if s != "200")
            lines += ["# HELP portfolio_errors_total Requests refused or failed.", "# TYPE portfolio_errors_total counter",
                      f"portfolio_errors_total {errors}",
                      "# HELP portfolio_loaded_adapters Adapter versions in memory.", "# TYPE portfolio_loaded_adapters gauge",
                      f"portfolio_loaded_adapters {loaded}"]
        return "\n".join(lines) + "\n"


class ServerState:
    """Everything a request handler needs, shared by all requests of one server."""

    def __init__(self, registry, engine: Engine, settings: ServerSettings, log=print):
        self.registry, self.engine, self.settings, self.log = registry, engine, settings, log
        self.resolver = Resolver(registry, engine.base, settings)
        self.stats = Stats()
        self.slots = threading.BoundedSemaphore(settings.max_concurrency)
        self.stop = threading.Event()

    def flush(self) -> None:
        """Write the pending request counts to the registry (kept for the next try on failure)."""
        pending = self.stats.take_pending()
        if pending:
            try:
                self.registry.routes.record_requests(pending)
            except Exception as exc:  # the log must never take the server down; try again next time
                self.log(f"request log not written ({exc}); retrying")
                with self.stats.lock:
                    for key, (n, t) in pending.items():
                        entry = self.stats.pending.setdefault(key, [0, 0])
                        entry[0] += n
                        entry[1] += t

    def flush_until_stopped(self) -> None:
        """The request-log thread: flush every ``flush_s`` until `stop` is set."""
        while not self.stop.wait(self.settings.flush_s):
            self.flush()

    def _admit(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Refuse a request beyond the server's limits, else take one of its slots."""
        settings = self.settings
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty: there is nothing to complete")
        if max_tokens > settings.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {settings.max_tokens}")
        if len(prompt_ids) > settings.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens, over this server's limit of {settings.max_prompt_tokens}")
        if not self.slots.acquire(blocking=False):
            raise ApiError(429, f"the server is at its limit of {settings.max_concurrency} requests in flight; retry shortly",
                           "rate_limit_error")

    def run(self, target: Target, prompt_ids: list[int], max_tokens: int, temperature: float, seed: int) -> Completion:
        """Generate for one request within the server's limits (ApiError when refused)."""
        self._admit(prompt_ids, max_tokens)
        try:
            future = self.engine.submit(EngineRequest(target.version, prompt_ids, max_tokens, temperature, seed))
            return self._result(future)
        finally:
            self.slots.release()

    def stream(self, target: Target, prompt_ids: list[int], max_tokens: int, temperature: float, seed: int) -> "TokenStream":
        """Start one request whose tokens arrive as they are generated. Returns once the
        first token (or the end) is there, so that a refusal (an archived version, damaged
        bytes) is still an HTTP status rather than a broken stream."""
        import queue

        self._admit(prompt_ids, max_tokens)
        request = EngineRequest(target.version, prompt_ids, max_tokens, temperature, seed, sink=queue.Queue())
        # the slot is the engine's work, not the client's reading: it is free once generation ends,
        # even when the client has gone away mid-stream
        request.future.add_done_callback(lambda _: self.slots.release())
        self.engine.submit(request)
        stream = TokenStream(request, self)
        stream.first = stream.next()
        if stream.first is END:
            self._result(request.future)
        return stream

    def _result(self, future) -> Completion:
        try:
            return future.result(timeout=self.settings.request_timeout_s)
        except InvalidState as exc:  # archived since it was resolved: its bytes are gone
            raise ApiError(409, str(exc), "conflict_error") from None
        except PortfolioError as exc:  # e.g. a damaged blob: this request fails, the server goes on
            raise ApiError(503, str(exc), "server_error") from None


class TokenStream:
    """A request's token ids as the engine generates them (`tokens`), then its `Completion`."""

    def __init__(self, request: EngineRequest, state: ServerState):
        self.request, self.state, self.first = request, state, None

    def tokens(self):
        """Each new token id, until the request is done."""
        item = self.first
        while item is not END:
            yield item
            item = self.next()

    def next(self):
        """The next token id, or `END` (ApiError 504 when none comes within the request timeout)."""
        import queue

        try:
            return self.request.sink.get(timeout=self.state.settings.request_timeout_s)
        except queue.Empty:
            raise ApiError(504, f"no token within {self.state.settings.request_timeout_s:.0f} s; the server is overloaded",
                           "server_error") from None

    def completion(self) -> Completion:
        """The finished request (ApiError when it failed midway)."""
        return self.state._result(self.request.future)
