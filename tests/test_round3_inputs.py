"""Reliability round 3, the rough edges on the way in: each a clean refusal before any work
or write (an impossible step count, another run's checkpoint, pickle base weights, NaN in a
row, integer LoRA factors, a snapshot with nothing held out), and `train --from` taking the
base from the parent."""

from __future__ import annotations

import time

import pytest
import torch

from portfolio import TrainConfig
from portfolio.errors import InvalidState, PortfolioError
from tests.conftest import cli_invoker, save_tiny_model


def test_an_impossible_step_count_is_refused_before_any_work(registry_with_base, write_jsonl, db_url, store_dir):
    reg = registry_with_base
    reg.data.add("d", [write_jsonl("d.jsonl", [{"text": f"row number {i} " * 8} for i in range(20)])], "x")
    invoke = cli_invoker(db_url, store_dir)
    started = time.monotonic()
    result = invoke("train", "a", "--base", "tiny", "--data", "d@1", "--steps", "1000000000000", ok=False)
    assert result.exit_code == 1 and time.monotonic() - started < 30
    assert result.output.count("error:") == 1 and "over the limit of 10,000,000 steps" in result.output
    result = invoke("train", "a", "--base", "tiny", "--data", "d@1", "--epochs", "1e9", ok=False)
    assert result.exit_code == 1 and "over the limit" in result.output, result.output
    assert reg.runs.list() == []


def test_the_data_order_is_drawn_as_it_is_consumed():
    """A 10M-step plan used to be a 10M-entry list built before step 0 (19 GB at 10^12)."""
    import tracemalloc

    from portfolio.training.config import MAX_STEPS
    from portfolio.training.loop import make_schedule

    cfg = TrainConfig(adapter="a", data="d@1", steps=MAX_STEPS, batch_size=8, replay_ratio=0.25)
    tracemalloc.start()
    schedule = make_schedule(100, 50, cfg)
    batches = iter(schedule)
    first = [next(batches) for _ in range(1000)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert schedule.steps == MAX_STEPS and peak < 5_000_000, peak
    small = make_schedule(100, 50, TrainConfig(adapter="a", data="d@1", steps=1000, batch_size=8, replay_ratio=0.25))
    assert small.batches == first  # the same order, lazily or not
    assert small.replay_sequences == sum(len(r) for _, r in small.batches) == 2000


def test_a_checkpoint_of_another_run_or_step_is_refused(tmp_path):
    from portfolio.training.checkpoint import checkpoint_step, load_checkpoint, save_checkpoint
    from portfolio.training.loop import LoopResult

    params = {"w": torch.nn.Parameter(torch.ones(2, 2))}
    optimizer = torch.optim.AdamW(params.values())
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, 5, params, optimizer, LoopResult(), run_id=7)
    assert checkpoint_step(path, 7, 10) == 5
    with pytest.raises(InvalidState, match="checkpoint of run 7, not of run 8"):
        load_checkpoint(path, params, optimizer, run_id=8, max_step=10)
    with pytest.raises(InvalidState, match="resumes at step 5, outside this run's 0..3"):
        checkpoint_step(path, 7, 3)
    save_checkpoint(path, -2, params, optimizer, LoopResult(), run_id=7)  # well-formed, but a step no run has
    with pytest.raises(InvalidState, match="resumes at step -2"):
        checkpoint_step(path, 7, 10)


def test_a_resume_with_another_runs_checkpoint_fails_cleanly(trainable, tmp_path):
    """Two interrupted runs; the first's checkpoint copied into the second's work folder."""
    import shutil

    from portfolio.training.train import train_adapter

    reg = trainable
    for adapter in ("a", "b"):
        stops = iter([False] * 3 + [True])
        cfg = TrainConfig(adapter=adapter, base="tiny", data="words@1", steps=8, checkpoint_every=2, seq_len=32, batch_size=2)
        with pytest.raises((KeyboardInterrupt, PortfolioError)):
            train_adapter(reg, cfg, log=lambda m: None, progress=False, should_stop=lambda: next(stops, True))
    runs = {r.adapter: r.id for r in reg.runs.list()}
    src, dst = (reg.store.work_dir(runs[a]) / "checkpoint.safetensors" for a in ("a", "b"))
    assert src.is_file() and dst.is_file()
    shutil.copyfile(src, dst)
    with pytest.raises(InvalidState, match=f"checkpoint of run {runs['a']}, not of run {runs['b']}"):
        train_adapter(reg, None, resume=runs["b"], log=lambda m: None, progress=False)


def test_a_base_of_pickle_weights_is_refused_at_base_add(registry, tmp_path, db_url, store_dir):
    folder = save_tiny_model(tmp_path / "pickled")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(PortfolioError, match="pickle weights \\(pytorch_model.bin\\).*safetensors"):
        registry.bases.add("pickled", folder)
    result = cli_invoker(db_url, store_dir)("base", "add", "pickled", str(folder), ok=False)
    assert result.exit_code == 1 and result.output.count("error:") == 1 and "never loads" in result.output
    assert registry.bases.list() == []


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_or_infinity_anywhere_in_a_row_is_refused(registry, tmp_path, literal):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n' + '{"text": "ok", "extra": {"score": ' + literal + "}}\n")
    with pytest.raises(PortfolioError, match=f"line 2: {literal} is not a JSON number"):
        registry.data.add("d", [path], "x")
    assert registry.data.list() == []


def test_integer_lora_factors_are_refused_at_import(registry_with_base, lora_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "int8"
    shutil.copytree(lora_dir, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: (t * 100).to(torch.int8) for k, t in tensors.items()}, folder / "adapter_model.safetensors")
    with pytest.raises(PortfolioError, match="is int8; LoRA factors must be floating point"):
        registry_with_base.import_adapter("q", folder, "tiny")


def test_a_snapshot_with_nothing_held_out_is_refused_before_any_write(trainable_any, write_jsonl):
    """On PostgreSQL a 1-row snapshot stored a NaN loss; SQLite refused with a raw NOT NULL."""
    from portfolio.training.train import train_adapter

    reg = trainable_any
    reg.data.add("one", [write_jsonl("one.jsonl", [{"text": "a single row of text " * 4}])], "x")
    cfg = TrainConfig(adapter="solo", base="tiny", data="one@1", steps=2, seq_len=32)
    with pytest.raises(PortfolioError, match="one@1 has no held-out rows to score"):
        train_adapter(reg, cfg, log=lambda m: None, progress=False)
    assert reg.runs.list() == []


def test_train_from_another_adapter_takes_the_parents_base(trainable, lora_dir):
    from portfolio.training.train import plan_training

    reg = trainable
    parent = reg.import_adapter("other", lora_dir, "tiny")
    plan = plan_training(reg, TrainConfig(adapter="new", data="words@1", from_ref=parent.ref))
    assert plan.cfg.base == "tiny" and plan.parent.ref == "other@1"
    reg.bases.add("tiny2", save_tiny_model(reg.store.root.parent / "tiny2", seed=3))
    with pytest.raises(PortfolioError, match="--from other@1 is built on 'tiny', not 'tiny2'"):
        plan_training(reg, TrainConfig(adapter="new", data="words@1", from_ref=parent.ref, base="tiny2"))
