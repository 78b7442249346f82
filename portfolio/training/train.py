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

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portfolio import runtime
from portfolio.data.tokenize import Example
from portfolio.errors import InvalidState
from portfolio.registry.entities import AdapterVersion, DatasetSnapshot
from portfolio.registry.registry import DataSpec, EvalSpec, ParentSpec, Registry
from portfolio.training import distributed
from portfolio.training.checkpoint import FILENAME as CHECKPOINT_FILE, checkpoint_step
from portfolio.training.config import MOVES_BASE, InvalidTrainConfig, TrainConfig
from portfolio.training.model import build_model, concatenated, float32_model, orthogonality_pairs, save_adapter, train_both
from portfolio.training.plan import Plan, Prepared, plan_training, prepare_data, retention_strata  # noqa: F401  (the API)


@dataclass
class TrainOutcome:
    """What `train_adapter` made."""

    version: AdapterVersion | None  # None on the processes other than rank 0 of a multi-process run
    run_id: int
    parent: str  # a version ref, or base:NAME
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


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
    _say_cut(data, cfg, log)  # (log is silent on ranks other than 0)
    # checkpoints live in the run's work folder; a store elsewhere (S3) keeps a copy of each,
    # so a run killed on one host resumes on another
    workdir = registry.store.work_dir(run_id)
    if w.main and resume is not None and registry.store.pull_work(run_id, CHECKPOINT_FILE):
        log(f"run {run_id}: fetched its checkpoint from {registry.store.url}")
    distributed.barrier(w)

    try:
        torch.manual_seed(cfg.seed)
        model = build_model(registry, plan, base, workdir, device, log, data, runtime.pad_id(tokenizer))
        result, resumed_from = _run_loop(registry, model, plan, data, schedule, runtime.pad_id(tokenizer), workdir, run_id,
                                         progress, on_step, should_stop, w)
        if not w.main:  # rank 0 evaluates and registers; the others are done
            distributed.barrier(w)
            return TrainOutcome(None, run_id, "", [], {"world_size": w.size})
        lora_folder = save_adapter(model, workdir, cfg.init in MOVES_BASE)
        if cfg.orthogonal:
            lora_folder = concatenated(lora_folder, workdir)
        if next(model.parameters()).dtype != torch.float32 or cfg.init in MOVES_BASE or cfg.quantize_base or cfg.orthogonal:
            # stored evaluations are keyed as float32 results (what `eval` and the gates compute):
            # score on a float32 base, not on the lower-precision (or quantised) copy it trained over (nor on
            # the base with its principal part moved out, under the unconverted adapter)
            del model
            model = float32_model(registry, plan, base, lora_folder, workdir, device, log)
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


def _say_cut(data, cfg: TrainConfig, log) -> None:
    """Rows longer than --seq-len lose the start of their prompt, not their answer: said once."""
    cut = sum(1 for e in data.fresh + data.replay if e.cut)
    if cut:
        log(f"{cut} of {len(data.fresh) + len(data.replay)} training rows are longer than --seq-len {cfg.seq_len}: "
            "each keeps its last tokens (the answer), its prompt cut from the start; raise --seq-len to keep them whole")


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
