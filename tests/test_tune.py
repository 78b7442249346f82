"""`portfolio tune`: the choice on a case built so that the answer is known, and a real tuning
run on the tiny model from the CLI (candidates registered and tagged, the table, the front,
the stored run, promotion of the pick)."""

import json

import numpy as np
import pytest

from portfolio.policy.gates import GatePolicy
from portfolio.training.tune import Candidate, InvalidTune, choose, parse_settings
from tests.conftest import cli_invoker
from tests.test_training import train


def _rows(mean_loss: float, noise, tokens: int = 10) -> list[list[float]]:
    """Per-example [loss sum, correct, tokens] around ``mean_loss`` with shared noise."""
    return [[float((mean_loss + e) * tokens), 0.0, float(tokens)] for e in noise]


def test_choose_picks_the_smallest_setting_within_noise_of_the_best_that_passes_the_gates():
    rng = np.random.default_rng(0)
    n = 40
    example = rng.normal(0, 0.3, n)  # how hard each example is: shared by every model
    jitter = lambda s: example + rng.normal(0, s, n)  # noqa: E731
    data, ret = "new@1", "retention:w@1"
    scores = {("w@1", data): _rows(2.0, jitter(0.05)), ("w@1", ret): _rows(2.0, jitter(0.05))}
    plan = {  # setting: (loss on the new data, loss on the retention set)
        "r4 lora": (1.80, 2.00),   # gains, but significantly less than the best
        "r8 lora": (1.52, 2.40),   # near the best, but forgets (+20% loss on retention)
        "r16 lora": (1.51, 2.01),  # near the best and keeps retention: the pick
        "r32 lora": (1.50, 2.00),  # the best gain, but twice the parameters of r16
    }
    candidates = []
    for i, (setting, (new, old)) in enumerate(plan.items()):
        rank = int(setting.split()[0][1:])
        ref = f"w@{i + 2}"
        candidates.append(Candidate(setting, rank, "lora", ref, n_params=1000 * rank))
        scores[(ref, data)] = _rows(new, jitter(0.05))
        scores[(ref, ret)] = _rows(old, jitter(0.05))
    pick, why = choose(candidates, scores, "w@1", data, [ret], GatePolicy("w"))
    by = {c.setting: c for c in candidates}
    assert pick == by["r16 lora"].ref and by["r16 lora"].picked, why
    assert not by["r4 lora"].within_noise and by["r4 lora"].gates_passed
    assert by["r8 lora"].within_noise and not by["r8 lora"].gates_passed and "retention" in by["r8 lora"].failed[0]
    assert by["r32 lora"].within_noise and by["r32 lora"].gain > by["r16 lora"].gain
    assert "r16 lora is the smallest setting within noise of the best (r32 lora" in why
    # every candidate forgets: no pick, and the reason says so
    for c in candidates:
        scores[(c.ref, ret)] = _rows(2.5, jitter(0.05))
        c.picked = False
    pick, why = choose(candidates, scores, "w@1", data, [ret], GatePolicy("w"))
    assert pick is None and "no candidate passes the gate policy" in why


def test_settings_parse_and_bad_ones_are_refused():
    assert parse_settings("16,4", "dora,lora") == [(4, "lora"), (4, "dora"), (16, "lora"), (16, "dora")]
    for ranks, variants, message in (("4,x", "lora", "whole numbers"), ("0,4", "lora", "positive"), ("4,4", "lora", "twice"),
                                     ("4", "lora,qlora", "choose from lora, rslora, dora")):
        with pytest.raises(InvalidTune, match=message):
            parse_settings(ranks, variants)


def test_tune_from_the_cli_trains_tags_scores_draws_and_promotes(trainable, sqlite_url, store_dir, tmp_path):
    run = cli_invoker(sqlite_url, store_dir)
    train(trainable, adapter="w", base="tiny", data="words@1", steps=6)
    run("promote", "w@1")
    fast = ["--lr", "2e-2", "--batch-size", "4", "--seq-len", "32", "--no-progress"]
    out = run("tune", "w", "--data", "numbers@1", "--ranks", "2,8", "--variants", "lora,dora", "--budget-steps", "4",
              "--plot", str(tmp_path / "front.png"), *fast)
    assert "tune: 4/4 r8 dora" in out.stderr and "against w@1" in out.stdout
    for setting in ("r2 lora", "r2 dora", "r8 lora", "r8 dora"):
        assert setting in out.stdout
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [tune_run] = [r for r in trainable.runs.list(adapter="w") if r.kind == "tune"]
    stored = json.loads(run("tune", "w", "--show", str(tune_run.id), "--json").stdout)
    refs = [c["ref"] for c in stored["candidates"]]
    assert len(refs) == 4 and stored["incumbent"] == "w@1"
    for ref, c in zip(refs, stored["candidates"]):
        v = trainable.get_version(ref)
        assert v.tags["tune"] == str(tune_run.id) and v.status == "candidate" and v.rank == c["rank"]
        assert bool(v.lora_config.get("use_dora")) == (c["variant"] == "dora")
        assert [d.snapshot for d in trainable.lineage(ref).data if d.role == "replay"] == ["words@1"]  # replays what w@1 learnt
    assert stored["candidates"][0]["n_params"] < stored["candidates"][1]["n_params"]  # dora adds its magnitudes
    assert stored["pick"] is None or stored["pick"] in refs
    assert ("pick: " + stored["pick"]) in out.stdout if stored["pick"] else "no pick" in out.stdout
    # --promote: the pick goes through the full gates
    out = run("tune", "w", "--data", "numbers@1", "--ranks", "4", "--budget-steps", "4", "--promote", *fast)
    assert "promote" in out.stdout or "no pick" in out.stdout
    # the dashboard's tuning page: the front and the table of every tune run
    from fastapi.testclient import TestClient

    from portfolio.ui.app import create_app

    page = TestClient(create_app(trainable, None), base_url="http://127.0.0.1").get("/adapters/w/tune")
    assert page.status_code == 200 and page.text.count('class="front"') == 2 and "r8 dora" in page.text
    assert f'id="tune-{tune_run.id}"' in page.text and "<svg" in page.text
    bad = run("tune", "w", "--data", "numbers@1", "--ranks", "4,x", ok=False)
    assert bad.exit_code == 1 and bad.stderr.startswith("error: --ranks '4,x': give whole numbers")
    bad = run("tune", "w", "--ranks", "4", ok=False)
    assert bad.exit_code == 2 and bad.stderr.startswith("error: give --data NAME@V")
    bad = run("tune", "new", "--data", "numbers@1", "--ranks", "4", ok=False)
    assert bad.exit_code == 1 and "is new: name its base model with --base" in bad.stderr
