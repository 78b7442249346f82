"""Exporting a router for GPU servers (vLLM, LoRAX), and resolving ``NAME@alias`` for vLLM.

`export_router` writes every version a router reaches as a PEFT folder under a stable name
(``NAME-vN``), what the server needs to load them, and the routing table a gateway applies:

- vLLM: ``vllm-args.txt`` (``--enable-lora --max-lora-rank R --max-loras N --lora-modules
  name=path ...``) and ``vllm-load-lora-adapter.json`` (bodies for vLLM's
  ``POST /v1/load_lora_adapter``);
- LoRAX: ``lorax-adapters.json`` (``adapter_id`` = the local folder, ``adapter_source: local``);
- both: ``routes.json`` (each rule, its target and the stable adapter name it reaches now).

vLLM's ``max_lora_rank`` must be one of `VLLM_LORA_RANKS`; a stack is exported as its exact
`cat` merge, whose rank is the sum of its parts. A version above the largest is named and the
export refused before anything is written.

`PortfolioLoRAResolver` implements vLLM's LoRA resolver plugin interface
(``resolve_lora(base_model_name, lora_name)``): a vLLM server started with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` and this plugin loads ``NAME@production`` on demand from
an export cached by artifact digest — so a new ``model`` name after a promotion reaches the new
version.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from portfolio.engines.vllm import VLLM_LORA_RANKS
from portfolio.errors import InvalidState
from portfolio.export import export_rank, export_version
from portfolio.modeling import is_base

TARGETS = ("vllm", "lorax")


@dataclass(frozen=True)
class RouterExport:
    """What `export_router` wrote."""

    folder: Path
    adapters: dict[str, str]  # stable name -> version ref
    max_lora_rank: int | None
    files: list[str]


def stable_name(version) -> str:
    """The name a GPU server knows a version by: ``NAME-vN``."""
    return f"{version.adapter}-v{version.version}"


def export_router(registry, router: str, dest: str | os.PathLike, target: str = "vllm") -> RouterExport:
    """Write the router's versions and the files ``target`` needs into the empty folder ``dest``."""
    if target not in TARGETS:
        raise InvalidState(f"--for {target}: choose one of {', '.join(TARGETS)}")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidState(f"{dest} exists and is not an empty folder; choose a new folder or empty it")
    rules, version_no = registry.routes.rules(router)
    if not rules:
        raise InvalidState(f"router {router} has no rules; add one with `portfolio route set {router} --default --to REF`")
    reached = {}
    for rule in rules:
        v = registry.get_version(rule.to)
        if v.status == "archived":
            raise InvalidState(f"rule '{rule.label}' reaches {v.ref}, which is archived; point it at a served version first")
        reached[rule.to] = v
    versions = {v.ref: v for v in reached.values()}
    ranks = {ref: export_rank(registry, v) for ref, v in versions.items()}
    max_rank = None
    if target == "vllm":
        too_big = [f"{ref} (rank {r})" for ref, r in ranks.items() if r > VLLM_LORA_RANKS[-1]]
        if too_big:
            raise InvalidState(f"vLLM loads LoRA ranks up to {VLLM_LORA_RANKS[-1]}; too large: {', '.join(too_big)} "
                               "(a stack exports at the sum of its ranks: merge it to a lower rank with `portfolio merge --rank`)")
        max_rank = next(r for r in VLLM_LORA_RANKS if r >= max(ranks.values()))
    dest.mkdir(parents=True, exist_ok=True)
    try:
        names = {}
        for ref, v in versions.items():
            names[ref] = stable_name(v)
            export_version(registry, ref, dest / "adapters" / names[ref])
        table = {"router": router, "router_version": version_no,
                 "precedence": "most conditions first, then higher priority, then older rule",
                 "rules": [{"when": r.when, "priority": r.priority, "target": r.to, "adapter": names[reached[r.to].ref],
                            "version": reached[r.to].ref} for r in rules]}
        files = ["routes.json"]
        (dest / "routes.json").write_text(json.dumps(table, indent=2) + "\n")
        paths = {names[ref]: str((dest / "adapters" / names[ref]).resolve()) for ref in versions}
        if target == "vllm":
            modules = " ".join(f"{n}={p}" for n, p in paths.items())
            (dest / "vllm-args.txt").write_text(f"--enable-lora --max-lora-rank {max_rank} --max-loras {len(paths)} "
                                                f"--lora-modules {modules}\n")
            (dest / "vllm-load-lora-adapter.json").write_text(
                json.dumps([{"lora_name": n, "lora_path": p} for n, p in paths.items()], indent=2) + "\n")
            files += ["vllm-args.txt", "vllm-load-lora-adapter.json"]
        else:
            (dest / "lorax-adapters.json").write_text(json.dumps(
                [{"adapter_id": p, "adapter_source": "local", "name": n} for n, p in paths.items()], indent=2) + "\n")
            files.append("lorax-adapters.json")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # nothing half-written
        raise
    return RouterExport(dest, {names[ref]: ref for ref in versions}, max_rank, files)


@dataclass(frozen=True)
class ResolvedLoRA:
    """The fields of vLLM's ``LoRARequest``, for when vLLM itself is not installed."""

    lora_name: str
    lora_int_id: int
    lora_path: str


class PortfolioLoRAResolver:
    """vLLM's LoRA resolver interface over a portfolio registry: ``lora_name`` is a version or
    an alias (``NAME@production``); the version's export is cached under ``cache_dir`` by
    artifact digest, so a promotion is a new folder and an unchanged version is exported once."""

    def __init__(self, registry, cache_dir: str | os.PathLike):
        self.registry, self.cache_dir = registry, Path(cache_dir)

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        """A ``LoRARequest`` (vLLM's, when installed) for ``lora_name``, or None when the
        registry has no such version, it is archived, or it is built on another base."""
        from portfolio.errors import NotFound

        try:
            version = self.registry.get_version(lora_name)
        except (NotFound, InvalidState):
            return None
        base = self.registry.bases.get(version.base_model)
        if version.status == "archived" or not is_base(base, base_model_name):
            return None
        from portfolio.serving import serving_key

        key = serving_key(self.registry, version).replace("stack:", "stack-")
        folder = self.cache_dir / key
        if not (folder / "adapter_config.json").is_file():
            export_version(self.registry, version.ref, folder)
        # vLLM keys loaded adapters by an int id: derive it from the digest so that a name
        # reaching the same weights reuses them
        lora_id = int(key[-12:], 16) % (2**31 - 1) + 1
        try:
            from vllm.lora.request import LoRARequest
        except ImportError:
            return ResolvedLoRA(lora_name, lora_id, str(folder))
        return LoRARequest(lora_name=lora_name, lora_int_id=lora_id, lora_path=str(folder))


def register_vllm_plugin() -> None:
    """vLLM general-plugin entry point: register the resolver over the registry named by
    ``PORTFOLIO_DB``/``PORTFOLIO_STORE`` (cache in ``PORTFOLIO_LORA_CACHE``, default
    ``~/.cache/portfolio/vllm-loras``)."""
    from vllm.lora.resolver import LoRAResolverRegistry

    from portfolio import Registry

    cache = os.environ.get("PORTFOLIO_LORA_CACHE", str(Path.home() / ".cache" / "portfolio" / "vllm-loras"))
    LoRAResolverRegistry.register_resolver("portfolio", PortfolioLoRAResolver(Registry.open(), cache))


def describe(export: RouterExport, target: str) -> list[str]:
    """What to tell the person who exported."""
    lines = [f"wrote {len(export.adapters)} adapters to {export.folder / 'adapters'}: "
             + ", ".join(f"{n} ({ref})" for n, ref in export.adapters.items())]
    if target == "vllm":
        lines.append(f"vLLM: vllm serve BASE $(cat {export.folder / 'vllm-args.txt'})   (max LoRA rank {export.max_lora_rank})")
    else:
        lines.append(f"LoRAX: adapter ids in {export.folder / 'lorax-adapters.json'}")
    lines.append(f"routing table for a gateway: {export.folder / 'routes.json'}")
    return lines

