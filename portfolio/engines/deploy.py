"""Keeping a running vLLM in step with the registry: `sync_vllm` makes the engine hold, under
each name a router's rules send to (``py@production``), the version that name reaches now,
and records every load and unload (`reg.deployments`); `follow_vllm` repeats it whenever the
serving change counter moves (a promotion, a rollback, a route change, an archive).

vLLM caches an adapter by name, so a name that now reaches another version is unloaded and
loaded again; a name whose version was archived is unloaded and never served again. Adapter
folders are exported once per serving key under ``cache_dir``, which the vLLM process must be
able to read (the same machine, or a shared path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from portfolio.engines.vllm import VllmClient
from portfolio.errors import InvalidState, NotFound, PortfolioError
from portfolio.export import export_version
from portfolio.serving import serving_key


@dataclass(frozen=True)
class SyncChange:
    """One change made to the engine: ``load`` (version under name) or ``unload``."""

    action: str
    name: str
    version: str | None
    previous: str | None


def wanted_names(registry, router: str) -> dict[str, object | None]:
    """``served name -> the version it reaches now`` (None: nothing servable) for every rule
    of ``router``; a rule's target is the name clients use."""
    rules, _ = registry.routes.rules(router)
    out: dict[str, object | None] = {}
    for rule in rules:
        try:
            version = registry.get_version(rule.to)
        except NotFound:
            version = None
        out[rule.to] = None if version is None or version.status == "archived" else version
    return out


def sync_vllm(registry, url: str, router: str, cache_dir: str | Path, log: Callable[[str], None] = print) -> list[SyncChange]:
    """One pass: load, reload or unload so that the vLLM at ``url`` serves exactly what
    ``router``'s names reach now; returns what changed."""
    client = VllmClient(url)
    held = registry.deployments.current(url)
    wanted = wanted_names(registry, router)
    cards = client.cards()  # one read of what the server holds, for the base check and the sync
    for base_name in sorted({v.base_model for v in wanted.values() if v is not None}):
        client.check_base(registry.bases.get(base_name), cards)
    dora = sorted(f"{n} ({v.ref})" for n, v in wanted.items() if v is not None and (v.lora_config or {}).get("use_dora"))
    if dora:  # refused before any change, not halfway through the pass
        raise InvalidState(f"router {router} sends to DoRA adapters, which vLLM cannot load: {', '.join(dora)}; "
                           "serve them with `portfolio serve`, or point those rules at plain LoRA versions")
    loaded = {c["id"] for c in cards}
    changes: list[SyncChange] = []
    for name, version in wanted.items():
        ref = version.ref if version is not None else None
        if ref == held.get(name) and (ref is None or name in loaded):
            continue
        if name in loaded:
            client.unload(name)
        if ref is None:
            if held.get(name):
                registry.deployments.record(url, name, None, "unload")
                changes.append(SyncChange("unload", name, None, held.get(name)))
                log(f"{name}: unloaded {held.get(name)} (nothing servable: archived or missing)")
            continue
        folder = Path(cache_dir) / serving_key(registry, version).replace("stack:", "stack-")
        if not (folder / "adapter_config.json").is_file():
            export_version(registry, ref, folder)
        client.load(name, folder)
        registry.deployments.record(url, name, ref, "load")
        changes.append(SyncChange("load", name, ref, held.get(name)))
        log(f"{name}: {held.get(name) or 'nothing'} -> {ref}")
    for name in set(held) - set(wanted):
        if name in loaded:
            client.unload(name)
        registry.deployments.record(url, name, None, "unload")
        changes.append(SyncChange("unload", name, None, held[name]))
        log(f"{name}: unloaded {held[name]} (no rule sends to it any more)")
    return changes


def follow_vllm(registry, url: str, router: str, cache_dir: str | Path, poll_s: float = 2.0, max_passes: int | None = None,
                log: Callable[[str], None] = print) -> int:
    """Sync now, then again each time the serving change counter moves (checked every
    ``poll_s``); a sync that fails (the engine down or restarting) is logged and retried.
    Stops after ``max_passes`` attempts when given. Returns the attempts made."""
    if poll_s <= 0:
        raise InvalidState("--poll must be a positive number of seconds")
    marker, passes = None, 0
    while max_passes is None or passes < max_passes:
        now = registry.routes.marker()
        if now != marker:
            passes += 1
            try:
                sync_vllm(registry, url, router, cache_dir, log)
                marker = now
                continue
            except PortfolioError as exc:  # the engine restarting or down: keep following, try again
                log(f"error: {exc}; retrying in {poll_s:g} s")
        time.sleep(poll_s)
    return passes
