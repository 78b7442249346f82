"""Planning a training run: a `TrainConfig` resolved against the registry (parent, base,
replay sources, LoRA shape, every check that can fail before any work), and its data
tokenised (training split, replay reservoir, held-out rows, retention set)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from portfolio import runtime
from portfolio.data.replay import replay_counts, reservoir_sample
from portfolio.data.splits import split_rows
from portfolio.data.tokenize import Example, encode_rows
from portfolio.errors import AdapterNotFound, InvalidDataset
from portfolio.registry.entities import AdapterVersion, DatasetSnapshot
from portfolio.registry.registry import Registry
from portfolio.training.config import (DEFAULT_KL_WEIGHT, DEFAULT_RANK, DEFAULT_TARGETS, MOVES_BASE, InvalidTrainConfig,
                                       TrainConfig)


@dataclass
class Plan:
    """A `TrainConfig` resolved against the registry."""

    cfg: TrainConfig
    snapshot: DatasetSnapshot
    replay_sources: list[DatasetSnapshot]
    parent: AdapterVersion | None
    notes: list[str]
    parent_data: list[str] = field(default_factory=list)  # snapshots the parent's lineage trained on or replayed


def _shape(cfg: TrainConfig, parent: AdapterVersion | None, base: str, base_modules: dict[str, list[int]],
           task_rank: int | None = None) -> TrainConfig:
    """Rank, alpha and targets: a warm start keeps the parent's (a conflicting flag is
    refused), a fresh adapter takes the defaults; checked against the base's layers."""
    if parent is not None:
        if parent.base_model != base:
            raise InvalidTrainConfig(f"--from {parent.ref} is built on {parent.base_model!r}, not {base!r}")
        if parent.artifact_digest is None:
            raise InvalidTrainConfig(f"--from {parent.ref} is a {parent.kind} version; warm-start from a single adapter")
        if parent.status == "archived":
            raise InvalidTrainConfig(f"--from {parent.ref} is archived and its bytes are gone; warm-start from a live version")
        if cfg.orthogonal:
            return _orthogonal_shape(cfg, parent, base_modules, task_rank)
        inherited = {"rank": parent.rank, "alpha": parent.alpha, "targets": parent.target_modules}
        for key, value in inherited.items():
            given = getattr(cfg, key)
            if given is not None and (sorted(given) if key == "targets" else given) != value:
                raise InvalidTrainConfig(f"--{key} {given} differs from {parent.ref}'s {value}; a warm start keeps the parent's shape")
        for flag, given in (("--use-rslora", cfg.use_rslora), ("--use-dora", cfg.use_dora), ("--init", cfg.init)):
            if given is not None:
                raise InvalidTrainConfig(f"{flag}: a warm start keeps {parent.ref}'s LoRA variant and starts from its factors "
                                         "(its adapter_config.json); drop the flag, or start a new adapter")
        cfg = replace(cfg, rank=parent.rank, alpha=parent.alpha, targets=list(parent.target_modules))
    else:
        rank = cfg.rank or DEFAULT_RANK
        cfg = replace(cfg, rank=rank, alpha=cfg.alpha or 2.0 * rank, targets=cfg.targets or list(DEFAULT_TARGETS))
    known = sorted({name.rsplit(".", 1)[-1] for name in base_modules})
    unknown = [t for t in cfg.targets if t not in known]
    if unknown:
        raise InvalidTrainConfig(f"--targets {','.join(unknown)}: not a linear layer of base {base!r}; choose from {', '.join(known)}")
    widest = min(min(shape) for name, shape in base_modules.items() if name.rsplit(".", 1)[-1] in cfg.targets)
    if cfg.rank > widest:
        raise InvalidTrainConfig(f"--rank {cfg.rank} exceeds the narrowest targeted layer of base {base!r} ({widest}); "
                                 f"a LoRA rank above {widest} adds nothing but parameters")
    return cfg


def _orthogonal_shape(cfg: TrainConfig, parent: AdapterVersion, base_modules: dict[str, list[int]],
                      task_rank: int | None = None) -> TrainConfig:
    """O-LoRA's new factors: ``--rank`` of them (default: the parent's own task rank), on the
    parent's modules; the version will hold the parent's rank plus this one."""
    if parent.lora_config.get("use_dora"):
        raise InvalidTrainConfig(f"--orthogonal: {parent.ref} is a DoRA adapter; its factors cannot be kept and concatenated "
                                 "exactly; continue it without --orthogonal")
    if cfg.targets is not None and sorted(cfg.targets) != sorted(parent.target_modules):
        raise InvalidTrainConfig(f"--targets: --orthogonal trains new factors on {parent.ref}'s modules "
                                 f"({','.join(parent.target_modules)})")
    rank = cfg.rank or task_rank or parent.rank
    cfg = replace(cfg, rank=rank, alpha=cfg.alpha or 2.0 * rank, targets=list(parent.target_modules))
    widest = min(min(shape) for name, shape in base_modules.items() if name.rsplit(".", 1)[-1] in cfg.targets)
    if parent.rank + rank > widest:
        raise InvalidTrainConfig(f"--orthogonal: {parent.ref}'s rank {parent.rank} plus {rank} new exceeds the narrowest "
                                 f"targeted layer ({widest}); its subspace is full, nothing orthogonal is left to learn")
    return cfg


def plan_training(registry: Registry, cfg: TrainConfig) -> Plan:
    """Resolve every reference and default; raise on anything that would fail later."""
    notes: list[str] = []
    snapshot = registry.data.get(cfg.data)
    registry.governance.check_usable([snapshot.ref] + list(cfg.replay_from or []), "training or replay")
    try:
        existing = registry.list_versions(adapter=cfg.adapter)
    except AdapterNotFound:
        existing = []
    # --from base:NAME: a fresh adapter over the base even where the adapter has versions
    # (a new rank or variant cannot warm-start from factors of another shape)
    from_base = cfg.from_ref[5:] if cfg.from_ref and cfg.from_ref.startswith("base:") else None
    if from_base is not None:
        registry.bases.get(from_base)
        if cfg.base and cfg.base != from_base:
            raise InvalidTrainConfig(f"--from {cfg.from_ref} and --base {cfg.base} name different bases")
    parent = registry.get_version(cfg.from_ref) if cfg.from_ref and from_base is None else None
    # the base comes from the adapter's versions, else from the parent it warm-starts from
    base = cfg.base or from_base or (existing[0].base_model if existing else parent.base_model if parent else None)
    if base is None:
        raise InvalidTrainConfig(f"adapter {cfg.adapter!r} is new: name its base model with --base")
    if existing and existing[0].base_model != base:
        raise InvalidTrainConfig(f"adapter {cfg.adapter!r} is built on {existing[0].base_model!r}, not {base!r}")
    base_modules = registry.bases.modules(base)

    if parent is None and existing and from_base is None:
        active = [v for v in existing if v.status == "active"]
        parent = (active or existing)[-1]
        which = "latest active" if active else "latest (none is active)"
        notes.append(f"continuing from {parent.ref}, the {which} version of {cfg.adapter}; pass --from to choose")
    # an O-LoRA parent's own new factors had this rank (its recipe says); the next task's default
    task_rank = next((p.recipe.get("task_rank") for p in registry.lineage(parent.ref, max_depth=1).parents
                      if p.child == parent.ref and p.recipe.get("task_rank")), None) if parent and cfg.orthogonal else None
    cfg = _shape(cfg, parent, base, base_modules, task_rank)

    # what the parent's lineage trained on or replayed: the default replay sources (train
    # edges) and, with replay edges, the retention set's strata (`retention_strata`)
    upstream = [(d.snapshot, d.role) for d in registry.lineage(parent.ref).data if d.role in ("train", "replay")] if parent else []
    if cfg.replay_from:
        sources = registry.data.get_many(cfg.replay_from)
    elif parent is not None:
        sources = registry.data.get_many(list(dict.fromkeys(ref for ref, role in upstream if role == "train")))
    else:
        sources = []
    sources = [s for s in sources if s.ref != snapshot.ref]
    withdrawn = [s.ref for s in sources if s.revoked]
    if withdrawn:
        notes.append(f"not replaying {', '.join(withdrawn)}: revoked")
        sources = [s for s in sources if not s.revoked]
    if parent is not None and parent.tainted:
        notes.append(f"{parent.ref} is tainted by revoked data ({', '.join(parent.tainted_by)}): the new version inherits it "
                     "and cannot be promoted; train a fresh adapter, or --from a clean version")
    if cfg.replay_ratio > 0 and not sources:
        notes.append("no earlier snapshots to replay (first version, no --replay-from): training without replay")
        if cfg.kl_weight:
            raise InvalidTrainConfig("--kl-weight needs replay rows, and there are no earlier snapshots; pass --replay-from")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidTrainConfig("--device cuda: no CUDA device is available here; use --device auto or cpu")
    if cfg.quantize_base:
        _check_quantizable(cfg, base, base_modules)
    if cfg.orthogonal and parent is None:
        raise InvalidTrainConfig("--orthogonal keeps a parent's factors and trains new ones orthogonal to them: "
                                 "give --from a version (a first version has nothing to be orthogonal to)")
    replaying = cfg.replay_ratio > 0 and bool(sources)
    kl_weight = cfg.kl_weight if cfg.kl_weight is not None else DEFAULT_KL_WEIGHT
    if cfg.init in MOVES_BASE and replaying and kl_weight and parent is None:
        raise InvalidTrainConfig(f"--init {cfg.init} moves the base's principal directions into the adapter while training, so the "
                                 "base is not there to be the KL teacher: add --kl-weight 0, or use --init default")
    cfg = replace(
        cfg, base=base, data=snapshot.ref, from_ref=parent.ref if parent else cfg.from_ref if from_base else None,
        replay_from=[s.ref for s in sources], replay_ratio=cfg.replay_ratio if sources else 0.0,
        kl_weight=kl_weight if replaying else 0.0,
    )
    revoked = {s.ref for s in registry.data.get_many(list(dict.fromkeys(ref for ref, _ in upstream))) if s.revoked}
    return Plan(cfg, snapshot, sources, parent, notes, [ref for ref in dict.fromkeys(ref for ref, _ in upstream) if ref not in revoked])


def _check_quantizable(cfg: TrainConfig, base: str, base_modules: dict[str, list[int]]) -> None:
    """Refuse --quantize-base where bitsandbytes is missing, has no kernel for the device,
    or cannot pack the base's layers, before any work."""
    from portfolio.modeling import bitsandbytes_problem

    problem = bitsandbytes_problem(runtime.resolve_device(cfg.device).type)
    if problem:
        raise InvalidTrainConfig(f"--quantize-base {cfg.quantize_base}: {problem}")
    if cfg.quantize_base == "nf4":
        # 4-bit weights are quantised in blocks of 64 inputs; narrower layers cannot be packed
        narrow = sorted(name for name, (_, n_in) in base_modules.items() if n_in % 64)
        if narrow:
            raise InvalidTrainConfig(f"--quantize-base nf4: layer {narrow[0]} of base {base!r} has {base_modules[narrow[0]][1]} inputs, "
                                     "not a multiple of bitsandbytes' 4-bit block of 64; use --quantize-base int8 or none")


@dataclass
class Prepared:
    """Tokenised data for one run."""

    fresh: list[Example]
    replay: list[Example]
    heldout: dict[str, tuple[list[Example], list[int]]]  # snapshot ref -> (examples, row ids)
    retention: tuple[str, list[Example]] | None = None  # (retention set ref, one example per row)


def retention_strata(plan: Plan) -> list[str]:
    """The earlier snapshots a new version must not forget: what its parent's lineage was
    trained on or replayed, and what it replays, except what it is trained on now."""
    return [s for s in dict.fromkeys(plan.parent_data + [s.ref for s in plan.replay_sources]) if s != plan.snapshot.ref]


def prepare_data(registry: Registry, plan: Plan, tokenizer: Any) -> Prepared:
    """Tokenise the training split, sample and tokenise the replay buffer, the fresh
    snapshot's held-out split and the adapter's retention set (with ``full_eval``: the
    held-out split of every snapshot involved instead of the retention set)."""
    cfg = plan.cfg
    snapshots = [plan.snapshot] + plan.replay_sources
    splits = {s.ref: split_rows(registry.data.rows(s)) for s in snapshots}
    train_rows, heldout_rows = splits[plan.snapshot.ref]
    if not heldout_rows:  # nothing to judge the new version on: refused before a run is recorded
        raise InvalidDataset(f"{plan.snapshot.ref} has no held-out rows to score ({len(train_rows)} row); a snapshot to train "
                             "on needs at least 2 rows, one of which is held out")
    fresh = encode_rows(train_rows, plan.snapshot.format, tokenizer, cfg.seq_len, source=0)
    if not fresh:
        raise InvalidDataset(f"{plan.snapshot.ref} yields no training tokens with this base's tokenizer (--data)")

    replay: list[Example] = []
    if plan.replay_sources and cfg.replay_ratio > 0:
        from portfolio.training.loop import make_schedule

        steps = make_schedule(len(fresh), 1, cfg).steps
        needed = sum(replay_counts(steps, cfg.effective_batch, cfg.replay_ratio))
        pool = [(i, row) for i, s in enumerate(plan.replay_sources, start=1) for row in splits[s.ref][0]]
        buffer = reservoir_sample(pool, max(1, needed), cfg.seed)
        for i, s in enumerate(plan.replay_sources, start=1):
            replay += encode_rows([row for src, row in buffer if src == i], s.format, tokenizer, cfg.seq_len, source=i)

    heldout = {}
    for s in snapshots if cfg.full_eval else [plan.snapshot]:
        rows = splits[s.ref][1]
        heldout[s.ref] = (encode_rows(rows, s.format, tokenizer, cfg.seq_len), [r["row"] for r in rows])
    retention = None
    strata = [] if cfg.full_eval else retention_strata(plan)
    if strata:
        rset = registry.retention.build(cfg.adapter, strata)
        examples = []
        members = rset.restricted(strata)
        for snap in registry.data.get_many(list(members)):
            keep = set(members[snap.ref])
            rows = splits[snap.ref][1] if snap.ref in splits else split_rows(registry.data.rows(snap))[1]
            examples += encode_rows([r for r in rows if r["row"] in keep], snap.format, tokenizer, cfg.seq_len, pack=False)
        retention = (rset.ref, examples)
    return Prepared(fresh, replay, heldout, retention)
