"""`train_adapter`: one training run from settings to a registered candidate version.

1. resolve the plan against the registry (parent, replay sources, LoRA shape) and fail on
   bad settings before any work;
2. tokenise the training split and a seeded reservoir of replay rows;
3. record a run, load the base (and the parent adapter), run `train_loop` with checkpoints;
4. evaluate the new version and its parent, in the same batches, on the fresh snapshot's
   held-out rows and on the adapter's bounded retention set (or, with ``full_eval``, on
   the held-out rows of every snapshot involved);
5. register the version, its lineage, data edges (exact row ids), evaluations and the run's
   success in one transaction.

A run killed anywhere before step 5 leaves no version; ``resume=RUN`` continues it from its
last checkpoint to the same weights an uninterrupted run gives.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from portfolio import adapter_files, runtime
from portfolio.data.replay import replay_counts, reservoir_sample
from portfolio.data.splits import split_rows
from portfolio.data.tokenize import Example, encode_rows
from portfolio.errors import AdapterNotFound, InvalidDataset, InvalidState
from portfolio.export import export_version
from portfolio.registry.entities import AdapterVersion, DatasetSnapshot
from portfolio.registry.registry import DataSpec, EvalSpec, ParentSpec, Registry
from portfolio.training import distributed
from portfolio.training.checkpoint import FILENAME as CHECKPOINT_FILE, checkpoint_step
from portfolio.training.config import DEFAULT_KL_WEIGHT, DEFAULT_RANK, DEFAULT_TARGETS, InvalidTrainConfig, TrainConfig

# inits that train over a changed base (the principal part of each weight moved into the
# adapter); saved through PEFT's conversion to a plain LoRA of rank 2r over the original base
MOVES_BASE = ("pissa", "olora")
INIT_DIR = "init-adapter"


@dataclass
class TrainOutcome:
    """What `train_adapter` made."""

    version: AdapterVersion | None  # None on the processes other than rank 0 of a multi-process run
    run_id: int
    parent: str  # a version ref, or base:NAME
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


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


def _used_rows(examples: list[Example], used: set[int], sources: list[DatasetSnapshot], offset: int) -> dict[str, list[int]]:
    rows: dict[str, set[int]] = {}
    for i in used:
        for source, row in examples[i].rows:
            rows.setdefault(sources[source - offset].ref, set()).add(row)
    return {ref: sorted(ids) for ref, ids in rows.items()}


def train_adapter(
    registry: Registry,
    cfg: TrainConfig | None = None,
    *,
    resume: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_run: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainOutcome:
    """Train (or, with ``resume=RUN``, finish) one run and register its version:
    plan → data → run → model → loop → save → score → register."""
    import torch

    from portfolio.modeling import load_tokenizer, model_folder
    from portfolio.training.loop import make_schedule

    plan = _resumable_plan(registry, resume, log) if resume is not None else _new_plan(registry, cfg)
    for note in plan.notes:
        log(note)
    cfg = plan.cfg

    base = registry.bases.get(cfg.base)
    folder, _ = model_folder(base, log)
    tokenizer = load_tokenizer(folder)
    data = prepare_data(registry, plan, tokenizer)
    schedule = make_schedule(len(data.fresh), len(data.replay), cfg)

    device = runtime.resolve_device(cfg.device)
    w = distributed.world(device)
    if not w.main:
        log, progress, on_run = (lambda *_: None), False, None  # rank 0 speaks for the run
    run_id = distributed.broadcast_int(w, _start_run(registry, cfg, schedule, resume, log, w) if w.main else None)
    if on_run is not None:
        on_run(run_id)
    # checkpoints live in the run's work folder; a store elsewhere (S3) keeps a copy of each,
    # so a run killed on one host resumes on another
    workdir = registry.store.work_dir(run_id)
    if w.main and resume is not None and registry.store.pull_work(run_id, CHECKPOINT_FILE):
        log(f"run {run_id}: fetched its checkpoint from {registry.store.url}")
    distributed.barrier(w)

    try:
        torch.manual_seed(cfg.seed)
        model = _build_model(registry, plan, base, workdir, device, log, data, runtime.pad_id(tokenizer))
        result, resumed_from = _run_loop(registry, model, plan, data, schedule, runtime.pad_id(tokenizer), workdir, run_id,
                                         progress, on_step, should_stop, w)
        if not w.main:  # rank 0 evaluates and registers; the others are done
            distributed.barrier(w)
            return TrainOutcome(None, run_id, "", [], {"world_size": w.size})
        lora_folder = _save_adapter(model, workdir, cfg.init in MOVES_BASE)
        if cfg.orthogonal:
            lora_folder = _concatenated(lora_folder, workdir)
        if next(model.parameters()).dtype != torch.float32 or cfg.init in MOVES_BASE or cfg.quantize_base or cfg.orthogonal:
            # stored evaluations are keyed as float32 results (what `eval` and the gates compute):
            # score on a float32 base, not on the lower-precision (or quantised) copy it trained over (nor on
            # the base with its principal part moved out, under the unconverted adapter)
            del model
            model = _float32_model(registry, plan, base, lora_folder, workdir, device, log)
        evals, report, parent_name = _score(registry, model, plan, data, base, lora_folder, runtime.pad_id(tokenizer), device)
        metrics = {
            "loss_curve": result.losses, "kl_curve": result.kl if cfg.kl_weight else [],
            "final_loss": result.losses[-1], "tokens": result.tokens, "tokens_per_s": result.tokens_per_s,
            "wall_s": result.seconds, "peak_memory_mb": result.peak_memory_mb, "steps": schedule.steps,
            "replay_sequences": schedule.replay_sequences, "device": str(device),
            "resumed_from_step": resumed_from, "world_size": w.size, "stage_starts": result.stage_starts,
            "orthogonality_curve": result.orthogonality,
        }
        version = _register(registry, plan, data, result, lora_folder, run_id, metrics, evals, schedule.steps, w.size)
        distributed.barrier(w)
    except KeyboardInterrupt:
        registry.runs.update(run_id, status="interrupted", error="interrupted (Ctrl-C)")
        raise InvalidState(f"run {run_id} interrupted; continue it with `portfolio train --resume {run_id}`") from None
    except Exception as exc:
        registry.runs.update(run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    return TrainOutcome(version, run_id, parent_name, report, metrics)


def _start_run(registry: Registry, cfg: TrainConfig, schedule, resume: int | None, log, w) -> int:
    """The run's id: a new run recorded (and said), or the one being resumed."""
    if resume is not None:
        return resume
    run_id = registry.runs.start("train", cfg.adapter, cfg.to_dict(), seed=cfg.seed).id
    accum = f" (×{cfg.grad_accum} accumulated)" if cfg.grad_accum > 1 else ""
    procs = f" over {w.size} processes" if w.size > 1 else ""
    log(f"run {run_id}: {schedule.steps} steps of {cfg.effective_batch}×{cfg.seq_len}{accum}{procs} on {cfg.data}"
        + (f", replay {cfg.replay_ratio:.0%} from {', '.join(cfg.replay_from)}" if cfg.replay_ratio else "")
        + (f", KL weight {cfg.kl_weight:g}" if cfg.kl_weight else ""))
    return run_id


def _new_plan(registry: Registry, cfg: TrainConfig | None) -> Plan:
    if cfg is None:
        raise InvalidTrainConfig("give a TrainConfig, or resume=RUN")
    return plan_training(registry, cfg)


def _resumable_plan(registry: Registry, resume: int, log: Callable[[str], None]) -> Plan:
    """The plan of an interrupted run, re-derived from its stored config and checked to be
    unchanged; the run is claimed for this process."""
    run = registry.runs.get(resume)
    if run.kind != "train":
        raise InvalidState(f"run {resume} is a {run.kind} run, not a training run")
    if run.status == "succeeded":
        raise InvalidState(f"run {resume} already finished and made {run.metrics.get('version')}; nothing to resume")
    if run.status == "running":
        raise InvalidState(f"run {resume} is still running; stop it first, or wait")
    cfg = TrainConfig.from_dict(run.config)
    plan = plan_training(registry, cfg)
    if plan.cfg.to_dict() != cfg.to_dict():
        raise InvalidState(f"run {resume} can no longer be resumed: its inputs changed in the registry")
    registry.runs.claim(resume)
    log(f"resuming run {resume}")
    return plan


def _build_model(registry: Registry, plan: Plan, base, workdir: Path, device, log, data: Prepared | None = None, pad_id: int = 0):
    """The base with the adapter being trained (``default``): a fresh LoRA (with its
    variant and init), or a copy of the parent, with the parent itself beside it (``parent``,
    frozen) for the KL term."""
    from peft import PeftModel

    from portfolio.modeling import load_base

    from portfolio.training.config import resolve_dtype

    cfg = plan.cfg
    model, _ = load_base(base, dtype=resolve_dtype(cfg.dtype, device), log=log, quantize=cfg.quantize_base, device=device)
    if cfg.quantize_base:
        from peft import prepare_model_for_kbit_training

        # norms (and anything else not quantised) in float32, inputs that carry gradients
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        # recompute each layer's activations in the backward pass instead of keeping them;
        # non-reentrant, so the frozen base's inputs need no requires_grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if plan.parent is not None and cfg.orthogonal:
        model = _orthogonal_adapters(model, registry, plan, workdir)
    elif plan.parent is not None:
        parent_dir = export_version(registry, plan.parent.ref, Path(tempfile.mkdtemp(dir=workdir)) / "parent", card=False)
        model = PeftModel.from_pretrained(model, parent_dir, adapter_name="default", is_trainable=True)
        model.load_adapter(parent_dir, adapter_name="parent", is_trainable=False)
        model.set_adapter("default")
    else:
        model = _fresh_adapter(model, cfg, workdir, device, data, pad_id)
    return runtime.place(model, device)


PARENT_DIR = "parent-adapter"


def _orthogonal_adapters(model, registry: Registry, plan: Plan, workdir: Path):
    """O-LoRA: the parent's factors (``parent``, frozen) and new ones (``default``, fresh,
    ``cfg.rank``), both active so their updates add up; the parent alone is the KL teacher."""
    from peft import LoraConfig, PeftModel

    cfg = plan.cfg
    parent_dir = workdir / PARENT_DIR
    shutil.rmtree(parent_dir, ignore_errors=True)
    export_version(registry, plan.parent.ref, parent_dir, card=False)
    model = PeftModel.from_pretrained(model, parent_dir, adapter_name="parent", is_trainable=False)
    model.add_adapter("default", LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.targets, lora_dropout=cfg.dropout,
                                            task_type="CAUSAL_LM"))
    train_both(model)
    return model


def train_both(model) -> None:
    """``parent`` and ``default`` active together, only ``default``'s factors trainable."""
    model.base_model.set_adapter(["parent", "default"])
    for name, p in model.named_parameters():
        if ".parent." in name:
            p.requires_grad_(False)


def orthogonality_pairs(model) -> list[tuple[Any, Any]]:
    """(the parent's A, the new A) of every module both adapt: O-LoRA's penalty's inputs."""
    params = dict(model.named_parameters())
    suffix_new, suffix_old = ".lora_A.default.weight", ".lora_A.parent.weight"
    return [(params[n[: -len(suffix_new)] + suffix_old], p) for n, p in params.items()
            if n.endswith(suffix_new) and n[: -len(suffix_new)] + suffix_old in params]


def _fresh_adapter(model, cfg: TrainConfig, workdir: Path, device, data: Prepared | None, pad_id: int):
    """A new LoRA on ``model`` as PEFT initialises it for ``cfg.init``. For pissa/olora the
    starting factors are saved (`INIT_DIR`) for the conversion at save time; every init here
    is a function of the base, the data and the seed, so a resumed run rebuilds the same start."""
    from peft import LoraConfig, get_peft_model

    init = cfg.init or "default"
    extra = {}
    if init == "eva":
        from peft import EvaConfig

        # rho 1: the same rank in every layer (a plain LoRA every engine loads; EVA's
        # redistribution would need a rank_pattern)
        extra["eva_config"] = EvaConfig(rho=1.0)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.targets, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                      use_rslora=bool(cfg.use_rslora), use_dora=bool(cfg.use_dora),
                      init_lora_weights=True if init == "default" else init, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on PiSSA/OLoRA conversion, said in docs/training.md instead
        model = get_peft_model(runtime.place(model, device), lora)
    if init == "eva":
        from peft import initialize_lora_eva_weights

        from portfolio.data.tokenize import collate

        batches = [{k: v.to(device) for k, v in collate(data.fresh[i:i + cfg.batch_size], pad_id).items() if k != "labels"}
                   for i in range(0, len(data.fresh), cfg.batch_size)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    if init in MOVES_BASE:
        start = workdir / INIT_DIR
        shutil.rmtree(start, ignore_errors=True)
        model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the start saved as a plain LoRA
        model.save_pretrained(start, safe_serialization=True)
        model.peft_config["default"].init_lora_weights = init
    return model


def _float32_model(registry: Registry, plan: Plan, base, lora_folder, workdir: Path, device, log):
    """The float32 base with the trained adapter (``default``) and the parent (``parent``)."""
    from peft import PeftModel

    from portfolio.modeling import load_base

    model, _ = load_base(base, log=log)
    model = PeftModel.from_pretrained(model, lora_folder.path, adapter_name="default")
    if plan.parent is not None:
        model.load_adapter(export_version(registry, plan.parent.ref, Path(tempfile.mkdtemp(dir=workdir)) / "parent", card=False),
                           adapter_name="parent")
    model.set_adapter("default")
    return model.to(device).eval()


def _run_loop(registry: Registry, model, plan: Plan, data: Prepared, schedule, pad_id: int, workdir: Path, run_id: int,
              progress: bool, on_step, should_stop, world):
    """`train_loop` with the progress bar, the KL teacher and checkpoints copied to the store;
    returns (result, the step it resumed from)."""
    import torch

    from portfolio.training.loop import orthogonality_penalty, train_loop

    def parent_logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if plan.parent is None:
            with model.disable_adapter():
                return model(**inputs).logits
        model.set_adapter("parent", inference_mode=True)
        try:
            return model(**inputs).logits
        finally:
            train_both(model) if plan.cfg.orthogonal else model.set_adapter("default")

    bar = _progress(schedule.steps, progress)

    def step_hook(step: int, stats: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{stats['tokens_per_s']:.0f}")
        if on_step:
            on_step(step, stats)

    checkpoint = workdir / CHECKPOINT_FILE
    resumed_from = checkpoint_step(checkpoint, run_id, schedule.steps)
    bar.update(resumed_from)
    result = train_loop(
        model, data.fresh, data.replay, plan.cfg, schedule, pad_id, checkpoint,
        parent_logits=parent_logits, on_step=step_hook, should_stop=should_stop, run_id=run_id, world=world,
        penalty=(lambda pairs=orthogonality_pairs(model): orthogonality_penalty(pairs)) if plan.cfg.orthogonal else None,
        on_checkpoint=lambda step: (registry.store.push_work(run_id, checkpoint),
                                    registry.runs.update(run_id, heartbeat=True, metrics={"checkpoint_step": step})),
    )
    bar.close()
    return result, resumed_from


def _save_adapter(model, workdir: Path, convert: bool = False) -> adapter_files.LoraFolder:
    """The trained adapter as a PEFT folder; with ``convert`` (pissa/olora), PEFT's
    conversion to a plain LoRA of rank 2r over the original base, from the saved start."""
    out_dir = workdir / "adapter"
    shutil.rmtree(out_dir, ignore_errors=True)
    extra = {"path_initial_model_for_weight_conversion": str(workdir / INIT_DIR)} if convert else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out_dir, selected_adapters=["default"], safe_serialization=True, **extra)
    if convert:  # the conversion's config keeps the init's name; over the original base it is a plain LoRA
        config_path = out_dir / adapter_files.CONFIG_FILE
        config = json.loads(config_path.read_text())
        config["init_lora_weights"] = True
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return adapter_files.read_lora_folder(out_dir)


def _concatenated(new: adapter_files.LoraFolder, workdir: Path) -> adapter_files.LoraFolder:
    """An O-LoRA version as one plain LoRA: the exact `cat` of the parent's factors and the
    new ones (rank r_parent + r_new, scale 1), what `export`, vLLM and merges read."""
    from portfolio.compose.lora_files import LoraSource
    from portfolio.compose.merge import MergeRecipe, merge_sources

    parent = adapter_files.read_lora_folder(workdir / PARENT_DIR)
    out = workdir / "adapter-cat"
    shutil.rmtree(out, ignore_errors=True)
    merge_sources([LoraSource("parent", parent.weights, parent.config), LoraSource("new", new.weights, new.config)],
                  MergeRecipe("cat"), out)
    return adapter_files.read_lora_folder(out)


def _score(registry: Registry, model, plan: Plan, data: Prepared, base, lora_folder, pad_id: int, device):
    """Evaluate new and parent, in the same batches, before anything is registered; the keys
    let a later `portfolio eval` or `promote` of the same inputs reuse these numbers. Returns
    (evaluations to store, the per-snapshot report, the parent's label)."""
    from portfolio.evaluation.evaluate import Scorer, eval_key, model_key
    from portfolio.evaluation.metrics import metrics_from_rows
    from portfolio.store.digests import sha256_file

    cfg = plan.cfg
    parent_name = plan.parent.ref if plan.parent else f"base:{base.name}"
    digests = {None: sha256_file(lora_folder.weights), parent_name: plan.parent.artifact_digest if plan.parent else None}
    keys = {who: model_key(base.weights_sha256, digest, cfg.seq_len) for who, digest in digests.items()}
    snapshot_sha = {s.ref: s.sha256 for s in [plan.snapshot] + plan.replay_sources}
    targets = [(ref, examples, row_ids) for ref, (examples, row_ids) in data.heldout.items() if examples]
    if data.retention is not None and data.retention[1]:
        targets.append((data.retention[0], data.retention[1], None))
    scorer = Scorer(registry, model, pad_id, cfg.eval_batch_size, device)
    routes = {None: "default", parent_name: "parent" if plan.parent else None}
    scored = scorer.score([(keys[who], routes[who], examples) for _, examples, _ in targets for who in (None, parent_name)])
    evals: list[EvalSpec] = []
    report = []
    for i, (ref, _, row_ids) in enumerate(targets):
        new, old = (metrics_from_rows(scored[2 * i]), metrics_from_rows(scored[2 * i + 1]))
        if row_ids is not None:  # a whole held-out split: recorded as evaluations of the snapshot
            for j, who in enumerate((None, parent_name)):
                key = eval_key(base.weights_sha256, digests[who], snapshot_sha[ref], row_ids, cfg.seq_len)
                if who is not None and registry.evaluations.find(key) is not None:
                    continue  # the parent's own run (or a revalidation) already stored it
                m = (new, old)[j]
                evals.append(EvalSpec(who, ref, {k: v for k, v in m.items() if k != "n_tokens"}, int(m["n_tokens"]),
                                      row_ids, key, scored[2 * i + j]))
        report.append({"snapshot": ref, "new_loss": new["loss"], "parent_loss": old["loss"], "n_tokens": new["n_tokens"]})
    return evals, report, parent_name


def _register(registry: Registry, plan: Plan, data: Prepared, result, lora_folder, run_id: int, metrics: dict[str, Any],
              evals: list[EvalSpec], steps: int, world_size: int = 1) -> AdapterVersion:
    """The new version with its parent edge, the exact rows trained on and replayed, its
    evaluations and the run's metrics, in one transaction (`Registry.register_version`)."""
    cfg = plan.cfg
    train_rows = _used_rows(data.fresh, result.fresh_used, [plan.snapshot], 0)
    replay_rows = _used_rows(data.replay, result.replay_used, plan.replay_sources, 1)
    recipe = {"method": "lora", "replay_ratio": cfg.replay_ratio, "kl_weight": cfg.kl_weight, "steps": steps, "lr": cfg.lr,
              "batch": cfg.effective_batch, "grad_accum": cfg.grad_accum, "dtype": cfg.dtype,
              "gradient_checkpointing": cfg.gradient_checkpointing, "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
              "init": cfg.init, "quantize_base": cfg.quantize_base, "world_size": world_size, "stages": cfg.stages,
              "orthogonal": cfg.orthogonal, **({"task_rank": cfg.rank} if cfg.orthogonal else {})}
    return registry.register_version(
        cfg.adapter, base=cfg.base, lora=lora_folder, run_id=run_id, run_metrics=metrics,
        parents=[ParentSpec(plan.parent.ref, "finetune", recipe)] if plan.parent else [],
        data=[DataSpec(plan.snapshot.ref, "train", train_rows.get(plan.snapshot.ref, []))]
        + [DataSpec(ref, "replay", ids) for ref, ids in replay_rows.items()],
        description=f"trained on {cfg.data}" + (f" from {plan.parent.ref}" if plan.parent else ""),
        evaluations=evals,
    )


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=not enabled, dynamic_ncols=True, leave=True)
