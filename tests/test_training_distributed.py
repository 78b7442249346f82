"""Data-parallel training through torch.distributed, launched as users launch it: `torchrun
--nproc-per-node 2 -m portfolio train ...` with the gloo backend on this CPU. The adapter equals
a one-process run with the same batch, rank 0 alone registers, the lineage names the world
size, and a run checkpointed by two processes resumes in one."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port
from tests.test_training import assert_trained_alike, train, weights

TORCHRUN = Path(sys.executable).with_name("torchrun")
SETTINGS = ["--steps", "6", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "32", "--lr", "0.02", "--seed", "4",
            "--replay-ratio", "0.25", "--checkpoint-every", "3", "--no-progress"]


def torchrun(sqlite_url, store_dir, *args, procs=2, check=True):
    cmd = [str(TORCHRUN), "--nproc-per-node", str(procs), "--master-port", str(free_port()), "-m", "portfolio",
           "--db", sqlite_url, "--store", str(store_dir), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_two_processes_train_the_same_adapter_as_one(trainable, sqlite_url, store_dir):
    start = train(trainable, adapter="w", base="tiny", data="words@1", steps=4)  # a parent to replay from, with KL
    one = train(trainable, adapter="one", data="numbers@1", from_ref="w@1", steps=6, batch_size=2, grad_accum=2, seq_len=32,
                lr=0.02, seed=4, replay_ratio=0.25, checkpoint_every=3)
    out = torchrun(sqlite_url, store_dir, "train", "two", "--data", "numbers@1", "--from", "w@1", *SETTINGS)
    assert out.stdout.count("registered ") == 1 and "registered two@1" in out.stdout  # rank 0 alone reports
    assert "over 2 processes" in out.stderr
    a, b = weights(trainable, one.version.ref), weights(trainable, "two@1")
    assert_trained_alike(a, b, weights(trainable, start.version.ref))
    assert len(trainable.list_versions(adapter="two")) == 1
    lineage = trainable.lineage("two@1")
    assert lineage.parents[0].recipe["world_size"] == 2
    # every row of the steps trained on once, replay rows without duplicates across ranks
    mine = {(d.snapshot, d.role): sorted(d.row_ids) for d in lineage.data}
    assert mine == {(d.snapshot, d.role): sorted(d.row_ids) for d in trainable.lineage(one.version.ref).data}
    assert all(len(ids) == len(set(ids)) for ids in mine.values())


def test_a_run_of_two_processes_resumes_in_one(trainable, sqlite_url, store_dir):
    """Killed after a checkpoint, then finished by one process: the adapter of one straight run.
    (Warm-started, as in the test above: a fresh adapter's B starts at zero, so some of A's
    gradients are rounding noise that Adam scales to full steps; its losses agree, a few
    elements of A do not.)"""
    import signal
    import time

    from portfolio.training.train import train_adapter

    start = train(trainable, adapter="w", base="tiny", data="words@1", steps=4)
    straight = train(trainable, adapter="s", data="numbers@1", from_ref="w@1", steps=8, batch_size=2, grad_accum=2, seq_len=32,
                     lr=0.02, seed=4, checkpoint_every=3, replay_ratio=0.25)
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "portfolio", "--db", sqlite_url,
           "--store", str(store_dir), "train", "r", "--data", "numbers@1", "--from", "w@1", *SETTINGS]
    cmd[cmd.index("--steps") + 1] = "8"
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # stop every process as soon as the first checkpoint is written
        runs = trainable.runs.list(adapter="r")
        if runs and (runs[0].metrics or {}).get("checkpoint_step"):
            break
        time.sleep(0.02)
    import psutil

    # torchrun starts its workers in sessions of their own: kill every process of the tree
    for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    [run] = trainable.runs.list(adapter="r")
    assert "r" not in {v.adapter for v in trainable.list_versions()}  # nothing registered
    if run.status == "running":
        # the killed workers were orphaned; where nothing reaps orphans (this container's init),
        # their zombies keep the pid "alive" until the 15-minute heartbeat says otherwise
        trainable.runs.update(run.id, status="interrupted", error="killed (SIGKILL) with its torchrun")
    resumed = train_adapter(trainable, resume=run.id, log=lambda *_: None, progress=False)  # one process now
    assert resumed.metrics["resumed_from_step"] in (3, 6) and resumed.metrics["world_size"] == 1
    a, b = weights(trainable, straight.version.ref), weights(trainable, resumed.version.ref)
    assert_trained_alike(a, b, weights(trainable, start.version.ref))
