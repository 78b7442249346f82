"""Training settings: one typed dataclass, validated all at once, stored with every run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from portfolio.errors import PortfolioError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Set by the continual-learning study (docs/continual-learning.md): on real text, 10% replay
# plus KL to the parent on the replay rows cut forgetting of earlier domains by 78% against
# plain fine-tuning while ending 92% as far below the base on each new domain; replay alone,
# even at 20%, cut it by 61%. With those settings rank 16 ended lower than rank 8 on every
# domain of the study's two-step rank check.
DEFAULT_RANK = 16
DEFAULT_REPLAY_RATIO = 0.10
DEFAULT_KL_WEIGHT = 1.0
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # the base's weights while training; the adapter stays float32
# how a new adapter's factors start (PEFT's implementations): default is kaiming-uniform A and
# zero B; pissa and olora start from the base's principal directions (SVD, QR) and move them out
# of the base while training, so the result is stored converted to a plain LoRA of rank 2r;
# eva starts A from the principal directions of the layer inputs on the training data
INITS = ("default", "gaussian", "pissa", "olora", "eva")
# inits that train over a changed base (the principal part of each weight moved into the
# adapter); saved through PEFT's conversion to a plain LoRA of rank 2r over the original base
MOVES_BASE = ("pissa", "olora")


# More steps than any run on one adapter needs (10M steps of batch 8 is 80M sequences): a
# larger number is a typo, refused before any work rather than found hours into a run
MAX_STEPS = 10_000_000


class InvalidTrainConfig(PortfolioError, ValueError):
    """A training setting is out of range or inconsistent with another."""


@dataclass
class TrainConfig:
    """Everything that determines a training run. ``rank``/``alpha``/``targets`` left at
    None follow the parent version when warm-starting, else the defaults."""

    adapter: str
    data: str
    base: str | None = None
    from_ref: str | None = None
    replay_ratio: float = DEFAULT_REPLAY_RATIO
    replay_from: list[str] = field(default_factory=list)
    # None: DEFAULT_KL_WEIGHT when there are replay rows, else 0 (a first version has none,
    # and the default must not make it fail); an explicit value is checked strictly.
    kl_weight: float | None = None
    rank: int | None = None
    alpha: float | None = None
    targets: list[str] | None = None
    # rank-stabilised LoRA (scale alpha/sqrt(r) instead of alpha/r); None: the parent's, else off
    use_rslora: bool | None = None
    # DoRA (weight-decomposed LoRA: a learned magnitude per output row); None: the parent's, else off
    use_dora: bool | None = None
    init: str | None = None  # one of INITS, for a new adapter; None: default
    # O-LoRA (Wang et al. 2023): a warm start keeps the parent's factors frozen and trains new
    # ones beside them, with λ·Σ‖A_parent A_newᵀ‖² pulling the new subspace orthogonal to the
    # old; stored as the exact cat of both. 0: off (the usual warm start of the parent's factors)
    orthogonal: float = 0.0
    dropout: float = 0.0
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    # optimiser steps take batch_size × grad_accum sequences, run batch_size at a time
    grad_accum: int = 1
    dtype: str = "auto"
    # the base's linear layers quantised by bitsandbytes (QLoRA): nf4 or int8; the adapter stays float32
    quantize_base: str | None = None
    gradient_checkpointing: bool = False
    # staged unfreezing: "top:4@0,top:12@200,all@400" (LoRA factors of the top N layers
    # trainable from step S; `parse_stages`); None: every LoRA factor from the start
    stages: str | None = None
    seq_len: int = 256
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 50
    eval_batch_size: int = 8
    # False: score new and parent on the fresh snapshot and the adapter's bounded retention
    # set; True: on the whole held-out split of every snapshot involved (cost grows with history)
    full_eval: bool = False

    def __post_init__(self) -> None:
        problems = []
        for flag, value in (("--lr", self.lr), ("--alpha", self.alpha), ("--replay-ratio", self.replay_ratio),
                            ("--kl-weight", self.kl_weight), ("--epochs", self.epochs), ("--dropout", self.dropout),
                            ("--weight-decay", self.weight_decay), ("--grad-clip", self.grad_clip),
                            ("--min-lr-ratio", self.min_lr_ratio), ("--orthogonal", self.orthogonal)):
            if value is not None and not math.isfinite(value):
                problems.append(f"{flag} must be a finite number (got {value})")
        if self.rank is not None and self.rank < 1:
            problems.append(f"--rank must be at least 1 (got {self.rank})")
        if self.alpha is not None and not self.alpha > 0:
            problems.append(f"--alpha must be positive (got {self.alpha})")
        if not 0 <= self.replay_ratio < 1:
            problems.append(f"--replay-ratio must be in [0, 1) (got {self.replay_ratio})")
        if self.kl_weight is not None and self.kl_weight < 0:
            problems.append(f"--kl-weight must be ≥ 0 (got {self.kl_weight})")
        if self.kl_weight and self.replay_ratio == 0:
            problems.append("--kl-weight applies to replay rows; set --replay-ratio above 0")
        if self.steps is not None and self.epochs is not None:
            problems.append("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps must be at least 1 (got {self.steps})")
        if self.steps is not None and self.steps > MAX_STEPS:
            problems.append(f"--steps {self.steps:,} is over the limit of {MAX_STEPS:,} steps")
        if self.epochs is not None and not self.epochs > 0:
            problems.append(f"--epochs must be positive (got {self.epochs})")
        if not self.lr > 0:
            problems.append(f"--lr must be positive (got {self.lr})")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.grad_accum < 1:
            problems.append(f"--grad-accum must be at least 1 (got {self.grad_accum})")
        if self.orthogonal < 0:
            problems.append(f"--orthogonal must be ≥ 0 (got {self.orthogonal})")
        if self.quantize_base is not None and self.quantize_base not in ("nf4", "int8"):
            problems.append(f"--quantize-base must be nf4 or int8 (got {self.quantize_base!r})")
        if self.quantize_base and self.init in ("pissa", "olora"):
            problems.append(f"--init {self.init} rewrites the base's weights, which --quantize-base keeps quantised; use one of them")
        if self.init is not None and self.init not in INITS:
            problems.append(f"--init must be one of {', '.join(INITS)} (got {self.init!r})")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.stages is not None:
            try:
                parse_stages(self.stages)
            except ValueError as exc:
                problems.append(f"--stages {self.stages!r}: {exc}")
        if self.seq_len < 8:
            problems.append(f"--seq-len must be at least 8 (got {self.seq_len})")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.device not in DEVICES:
            problems.append(f"--device must be one of {', '.join(DEVICES)} (got {self.device!r})")
        if self.checkpoint_every < 1:
            problems.append(f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})")
        if self.targets is not None and not self.targets:
            problems.append("--targets must name at least one module")
        if problems:
            raise InvalidTrainConfig("; ".join(problems))

    @property
    def effective_batch(self) -> int:
        """Sequences per optimiser step: ``batch_size × grad_accum``."""
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (stored with the run)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Rebuild from a stored dict, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def parse_stages(text: str) -> list[tuple[int | None, int]]:
    """``"top:4@0,top:12@200,all@400"`` -> ``[(4, 0), (12, 200), (None, 400)]``: from each
    step on, the LoRA factors of the top N layers (None: all) are trainable. The first stage
    starts at step 0; later ones start later and unfreeze more."""
    stages: list[tuple[int | None, int]] = []
    for part in text.split(","):
        what, at, start = part.strip().partition("@")
        if not at or not start.strip().isdigit():
            raise ValueError(f"{part.strip()!r} is not LAYERS@STEP (e.g. top:4@0 or all@400)")
        what = what.strip()
        if what == "all":
            n = None
        elif what.startswith("top:") and what[4:].isdigit() and int(what[4:]) >= 1:
            n = int(what[4:])
        else:
            raise ValueError(f"{what!r}: say top:N (the N layers nearest the output) or all")
        stages.append((n, int(start)))
    if stages[0][1] != 0:
        raise ValueError("the first stage must start at step 0")
    for (n0, s0), (n1, s1) in zip(stages, stages[1:]):
        if s1 <= s0:
            raise ValueError(f"stages must start at increasing steps ({s0} then {s1})")
        if n0 is None or (n1 is not None and n1 <= n0):
            raise ValueError("each stage must unfreeze more layers than the one before")
    return stages


def stage_at(stages: list[tuple[int | None, int]], step: int) -> int:
    """The index of the stage in force at ``step``."""
    return max(i for i, (_, start) in enumerate(stages) if start <= step)


def resolve_dtype(name: str, device) -> "Any":
    """The torch dtype of the base's weights: ``auto`` is bfloat16 on a GPU that supports it,
    float32 elsewhere (CPU bfloat16 matmuls are slower than float32 ones on most CPUs)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def get_lr(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio · lr`` at the last step."""
    import math

    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if total_steps <= warmup_steps + 1:
        return lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps - 1)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
