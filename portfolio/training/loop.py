"""The training loop, top to bottom.

Given a PEFT model whose adapter ``default`` is being trained, the tokenised fresh and replay
examples and a `TrainConfig`, run the optimisation with a deterministic data order, write a
checkpoint (all resume state) every ``checkpoint_every`` steps, and return what happened.
Nothing here touches the registry: `portfolio.training.train` wires it in.
"""

from __future__ import annotations

import math
import random
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from portfolio.data.replay import replay_counts
from portfolio.runtime import place, resolve_device
from portfolio.data.tokenize import IGNORE, Example, collate, shifted_labels
from portfolio.training.checkpoint import load_checkpoint, save_checkpoint
from portfolio.training.config import MAX_STEPS, InvalidTrainConfig, TrainConfig, get_lr, parse_stages, stage_at
from portfolio.training.distributed import World, same_start, sum_floats, sum_gradients


@dataclass(frozen=True)
class Schedule:
    """Which examples go into every step's batch: iterating yields (fresh indices, replay
    indices) per step. Fresh examples go epoch by epoch in seeded permutations; replay
    examples cycle through their own seeded permutation. The order is fixed by the seed
    alone, so a resumed run sees exactly what an uninterrupted one would; it is drawn as it
    is consumed, so memory stays O(batch + examples) however many steps there are."""

    steps: int
    n_fresh: int
    n_replay: int
    batch_size: int
    ratio: float
    seed: int

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        rng = random.Random(self.seed)
        fresh_order: list[int] = []
        replay_order: list[int] = []
        for n_rep in replay_counts(self.steps, self.batch_size, self.ratio):
            n_new = self.batch_size - n_rep
            while len(fresh_order) < n_new:
                fresh_order += rng.sample(range(self.n_fresh), self.n_fresh)
            while len(replay_order) < n_rep:
                replay_order += rng.sample(range(self.n_replay), self.n_replay)
            yield fresh_order[:n_new], replay_order[:n_rep]
            fresh_order, replay_order = fresh_order[n_new:], replay_order[n_rep:]

    @property
    def batches(self) -> list[tuple[list[int], list[int]]]:
        """Every step's batch at once (for tests and small runs: O(steps) memory)."""
        return list(self)

    @property
    def replay_sequences(self) -> int:
        """How many replay sequences the run trains on."""
        return sum(replay_counts(self.steps, self.batch_size, self.ratio))


def make_schedule(n_fresh: int, n_replay: int, cfg: TrainConfig) -> Schedule:
    """The run's data order (`Schedule`); an epoch count that would need more than
    `MAX_STEPS` steps is refused before any work."""
    ratio = cfg.replay_ratio if n_replay else 0.0
    fresh_per_step = cfg.effective_batch - cfg.effective_batch * ratio
    steps = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * n_fresh / fresh_per_step))
    if steps > MAX_STEPS:
        raise InvalidTrainConfig(f"--epochs {cfg.epochs:g} over {n_fresh} examples is {steps:,} steps, over the limit of "
                                 f"{MAX_STEPS:,}; lower --epochs or raise --batch-size")
    return Schedule(steps, n_fresh, n_replay, cfg.effective_batch, ratio, cfg.seed)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy over positions whose label is not ignored: their mean, or
    (``reduction="sum"``) their sum; and how many there are."""
    targets = shifted_labels(labels)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction=reduction)
    return loss, int((targets != IGNORE).sum())


def distillation_kl(new_logits: torch.Tensor, parent_logits: torch.Tensor, labels: torch.Tensor,
                    reduction: str = "batchmean") -> torch.Tensor:
    """KL(p_parent ‖ p_new) of the next-token distributions, averaged (or, ``"sum"``, summed)
    over scored positions (Learning without Forgetting, temperature 1)."""
    mask = shifted_labels(labels) != IGNORE
    log_new = F.log_softmax(new_logits[mask].float(), dim=-1)
    log_parent = F.log_softmax(parent_logits[mask].float(), dim=-1)
    return F.kl_div(log_new, log_parent, log_target=True, reduction=reduction)


def accumulate_gradients(model, examples: list[Example], n_replay: int, cfg: TrainConfig, pad_id: int, device, autocast,
                         parent_logits, share: list[int] | None = None) -> tuple[float, float, int, int]:
    """Forward and backward over this process's ``share`` of one step's examples (fresh
    first, the last ``n_replay`` replayed; all of them by default), ``cfg.batch_size`` at a
    time. Each micro-batch's loss is its sum over scored positions divided by the whole step's
    count, so the gradients summed over micro-batches (and processes) are exactly one big
    batch's: mean cross-entropy + kl_weight · mean KL on replay positions. Returns (loss, KL,
    tokens, scored positions) of this share."""
    use_kl = n_replay > 0 and cfg.kl_weight > 0 and parent_logits is not None
    first_replay = len(examples) - n_replay
    total = max(1, sum(e.n_targets for e in examples))
    total_kl = max(1, sum(e.n_targets for e in examples[first_replay:]))
    mine = list(range(len(examples))) if share is None else share
    loss_sum = kl_sum = 0.0
    tokens = 0
    for start in range(0, len(mine), cfg.batch_size):
        index = mine[start:start + cfg.batch_size]
        micro = [examples[i] for i in index]
        batch = {k: v.to(device) for k, v in collate(micro, pad_id).items()}
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ce, _ = causal_lm_loss(logits, batch["labels"], reduction="sum")
            loss = ce / total
            rows = [row for row, i in enumerate(index) if i >= first_replay]
            if use_kl and rows:
                # the KL term only on replay rows: they stand for what the parent knew
                replay_batch = {k: v[rows] for k, v in batch.items()}
                with torch.no_grad():
                    old = parent_logits(replay_batch)
                kl = distillation_kl(logits[rows], old, replay_batch["labels"], reduction="sum") / total_kl
                loss = loss + cfg.kl_weight * kl
                kl_sum += float(kl.detach())
        loss.backward()
        loss_sum += float(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    return loss_sum, kl_sum, tokens, total


def orthogonality_penalty(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """O-LoRA's orthogonality loss: Σ over modules of ‖A_old A_newᵀ‖²_F, the squared overlap
    of the new factors' row space with the kept ones' (zero when orthogonal; the old factors
    get no gradient)."""
    total = torch.zeros((), device=pairs[0][1].device if pairs else None)
    for old, new in pairs:
        total = total + (old.detach().to(new.dtype) @ new.T).pow(2).sum()
    return total


@dataclass
class LoopResult:
    """What a finished (or resumed-and-finished) loop reports."""

    losses: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    fresh_used: set[int] = field(default_factory=set)
    replay_used: set[int] = field(default_factory=set)
    stage_starts: list[int] = field(default_factory=list)  # steps where a --stages stage began
    orthogonality: list[float] = field(default_factory=list)  # --orthogonal's λ·penalty per step

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def layer_of(name: str) -> int | None:
    """The decoder layer a parameter belongs to (``...layers.7.self_attn...`` -> 7)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def apply_stage(params: dict[str, torch.Tensor], top: int | None, n_layers: int) -> None:
    """Make trainable only the factors of the top ``top`` layers (None: all). A frozen factor
    gets no gradient, so AdamW leaves it and its moments untouched until its stage."""
    for name, p in params.items():
        layer = layer_of(name)
        p.requires_grad_(top is None or (layer is not None and layer >= n_layers - top))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process (CPU: max RSS) or of the CUDA allocator."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_loop(
    model: torch.nn.Module,
    fresh: list[Example],
    replay: list[Example],
    cfg: TrainConfig,
    schedule: Schedule,
    pad_id: int,
    checkpoint_path: Path,
    parent_logits: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    run_id: int | None = None,
    world: World = World(),
    penalty: Callable[[], torch.Tensor] | None = None,
) -> LoopResult:
    """Train ``model``'s active adapter along ``schedule``; resume from ``checkpoint_path``
    when it exists. ``parent_logits(batch)`` gives the frozen parent's logits for the KL term.
    With several processes (``world``), each trains on its share of every step and the
    gradients are summed (`training.distributed`); rank 0 writes the checkpoints. ``penalty()``
    (O-LoRA's `orthogonality_penalty`) is added once per step, weighted ``cfg.orthogonal``."""
    device = resolve_device(cfg.device)
    place(model, device).train()
    params = _trainable(model)
    same_start(world, params.values())
    stages = parse_stages(cfg.stages) if cfg.stages else [(None, 0)]
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None) or 1 + max(
        (layer_of(n) or 0) for n in params)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(10, max(1, schedule.steps // 10))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    result = LoopResult()
    start = 0

    # Resume: every piece of state that affects the result is in the checkpoint.
    if checkpoint_path.is_file():
        start, fields = load_checkpoint(checkpoint_path, params, optimizer, run_id, schedule.steps)
        result = LoopResult(**fields)

    for step, (fresh_idx, replay_idx) in enumerate(schedule):
        if step < start:
            continue  # the data order is replayed from the seed up to the checkpoint
        t0 = time.perf_counter()
        stage = stage_at(stages, step)
        if step == start or stages[stage][1] == step:  # a stage begins (or a resume lands in one)
            apply_stage(params, stages[stage][0], n_layers)
            if cfg.stages and stages[stage][1] == step and step not in result.stage_starts:
                result.stage_starts.append(step)
        lr = get_lr(step, schedule.steps, cfg.lr, warmup, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr

        examples = [fresh[i] for i in fresh_idx] + [replay[i] for i in replay_idx]
        loss_value, kl_value, tokens, n_targets = accumulate_gradients(model, examples, len(replay_idx), cfg, pad_id, device,
                                                                       autocast, parent_logits, world.share(len(examples)))
        if penalty is not None and cfg.orthogonal:
            term = cfg.orthogonal * penalty()
            if world.main:  # once per step, however many processes sum their gradients
                term.backward()
            result.orthogonality.append(float(term.detach()))
        sum_gradients(world, params.values())
        loss_value, kl_value, tokens = sum_floats(world, loss_value, kl_value, tokens)
        tokens = int(tokens)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        seconds = time.perf_counter() - t0
        result.losses.append(loss_value)
        result.kl.append(kl_value)
        result.tokens += tokens
        result.seconds += seconds
        result.fresh_used.update(fresh_idx)
        result.replay_used.update(replay_idx)
        if on_step is not None:
            on_step(step, {"loss": loss_value, "kl": kl_value, "lr": lr, "tokens": tokens, "seconds": seconds,
                           "tokens_per_s": tokens / seconds, "n_targets": n_targets})

        stopping = should_stop is not None and should_stop() and step + 1 < schedule.steps
        if stopping or ((step + 1) % cfg.checkpoint_every == 0 and step + 1 < schedule.steps):
            result.peak_memory_mb = max(result.peak_memory_mb, peak_memory_mb(device))
            if world.main:  # every process holds the same tensors and optimiser state
                save_checkpoint(checkpoint_path, step + 1, params, optimizer, result, run_id)
                if on_checkpoint is not None:
                    on_checkpoint(step + 1)
            if stopping:  # asked to stop (SIGTERM): the step is checkpointed, nothing is lost
                raise KeyboardInterrupt

    result.peak_memory_mb = max(result.peak_memory_mb, peak_memory_mb(device))
    for p in params.values():  # every factor trainable again for whoever uses the model next
        p.requires_grad_(True)
    model.eval()
    return result
