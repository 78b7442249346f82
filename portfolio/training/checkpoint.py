"""Training checkpoints as one safetensors file: tensors as tensors, the rest as JSON.

A checkpoint holds every piece of resume state (LoRA parameters, AdamW moments, the torch RNG
state, the step and what the loop has measured so far). It is never a pickle: a checkpoint in
a run's work folder may have been planted by anyone who can write there, and unpickling runs
code. safetensors reads only tensors and a JSON header, so a planted or damaged file is
refused with a clear error and nothing it holds is executed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from portfolio.errors import InvalidState
from portfolio.store.base import ArtifactStore

FORMAT = "portfolio-checkpoint/1"
FILENAME = ArtifactStore.CHECKPOINT_FILE


def save_checkpoint(path: Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    result: Any, run_id: int | None = None) -> None:
    """Write all resume state atomically: a reader (or a resume after kill -9) sees the old
    file or the new one. ``run_id`` is recorded, so another run's checkpoint is refused."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    optim_scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                optim_scalars.setdefault(str(index), {})[key] = value
    tensors["rng"] = torch.get_rng_state()
    result_state = asdict(result)
    for key, value in result_state.items():
        if isinstance(value, set):
            result_state[key] = sorted(value)
    meta = {"format": FORMAT, "step": step, "run": run_id, "param_groups": opt["param_groups"], "optim_scalars": optim_scalars,
            "result": result_state}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"portfolio": json.dumps(meta)})
    os.replace(tmp, path)


def _read(path: Path, run_id: int | None = None, max_step: int | None = None) -> tuple[dict[str, Any], Any]:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        meta = json.loads((handle.metadata() or {})["portfolio"])
        if meta.get("format") != FORMAT or not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool):
            raise ValueError("unknown format")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidState(
            f"{path} is not a portfolio checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "it was damaged or put there by hand; delete it to restart the run from step 0"
        ) from None
    # well-formed is not enough: it must be this run's, at a step this run has
    owner = meta.get("run")
    if run_id is not None and owner is not None and owner != run_id:
        raise InvalidState(f"{path} is a checkpoint of run {owner}, not of run {run_id}; "
                           "delete it to restart the run from step 0")
    step = meta["step"]
    if step < 0 or (max_step is not None and step > max_step):
        raise InvalidState(f"{path} resumes at step {step}, outside this run's 0..{max_step if max_step is not None else 'N'}; "
                           "delete it to restart the run from step 0")
    return meta, handle


def checkpoint_step(path: Path, run_id: int | None = None, max_step: int | None = None) -> int:
    """The step a checkpoint resumes from (0 when there is none), after checking that it is
    this run's (``run_id``) and within its ``max_step`` steps."""
    return _read(path, run_id, max_step)[0]["step"] if path.is_file() else 0


def load_checkpoint(path: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    run_id: int | None = None, max_step: int | None = None) -> tuple[int, dict[str, Any]]:
    """Restore parameters, optimizer and RNG state in place; return (step, result fields).
    A checkpoint of another run, or at a step outside ``0..max_step``, is refused."""
    meta, handle = _read(path, run_id, max_step)
    keys = set(handle.keys())
    expected = {f"param/{n}" for n in params}
    if not expected <= keys:
        missing = sorted(expected - keys)[:3]
        raise InvalidState(f"{path} does not match this run's adapter (missing {', '.join(missing)}); delete it to restart from step 0")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(handle.get_tensor(f"param/{name}").to(param.device))
    state: dict[int, dict[str, Any]] = {}
    for key in keys:
        if key.startswith("optim/"):
            _, index, field = key.split("/", 2)
            # on the CPU: load_state_dict moves moments to their parameter's device and keeps
            # AdamW's step counter where the optimizer expects it
            state.setdefault(int(index), {})[field] = handle.get_tensor(key)
    for index, scalars in meta["optim_scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(handle.get_tensor("rng"))
    result = dict(meta["result"])
    for key in ("fresh_used", "replay_used"):
        result[key] = set(result.get(key, []))
    return meta["step"], result
