"""The continual-learning study's pieces that its conclusions rest on: how corpora are cut
into drops, and how ACC, BWT, forgetting and gains are computed from the loss matrix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "bench")]

import continual  # noqa: E402
import corpora  # noqa: E402


def test_chunks_keep_paragraphs_whole_and_bounded():
    text = "\n\n".join(["a" * 30, "b" * 30, "c" * 100, "d" * 10])
    out = list(corpora.chunks(text, 70))
    assert out == ["a" * 30 + "\n\n" + "b" * 30, "c" * 70, "c" * 30 + "\n\n" + "d" * 10]
    assert all(len(c) <= 70 for c in out)


def test_build_cuts_dated_drops_and_records_every_source(tmp_path, monkeypatch):
    def fake(domain):
        return lambda: (corpora.Document(f"/src/{domain}/{i}", f"{domain} document {i}. " * 60, "test") for i in range(40))

    monkeypatch.setattr(corpora, "SOURCES", {d: fake(d) for d in ["one", "two", corpora.GENERAL]})
    manifest = corpora.build(tmp_path, drops=3, drop_kb=3, general_kb=2)
    drops = manifest["domains"]["one"]["drops"]
    assert [d["date"] for d in drops] == ["2026-01-05", "2026-02-02", "2026-03-02"]
    rows = [json.loads(line) for d in drops for line in (tmp_path / d["file"]).read_text().splitlines()]
    assert all(r["source"].startswith("/src/one/") for r in rows)
    used = {f["path"] for f in manifest["domains"]["one"]["sources"]}
    assert {r["source"] for r in rows} == used  # every row's source is listed, and only those
    first = {r["source"] for r in map(json.loads, (tmp_path / drops[0]["file"]).read_text().splitlines())}
    later = {r["source"] for d in drops[1:] for r in map(json.loads, (tmp_path / d["file"]).read_text().splitlines())}
    assert not first & later  # a document lands in one drop only
    assert json.loads((tmp_path / "sources.json").read_text()) == manifest


def test_build_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "SOURCES", {"tiny": lambda: iter([corpora.Document("/x", "short text", "t")])})
    with pytest.raises(SystemExit, match="tiny: only 0 KB .* lower --drop-kb"):
        corpora.build(tmp_path, drops=3, drop_kb=100)


def test_summary_metrics_on_a_known_loss_matrix():
    scale = continual.Scale(drops=1, drop_kb=1, steps=1, batch_size=1, seq_len=8, lr=1e-3, rank=2, domains=("a", "b", "c"))
    g = corpora.GENERAL
    results = {
        "base": {"a": 3.0, "b": 3.0, "c": 3.0, g: 3.0},
        "sequence": ["a@1", "b@1", "c@1"],
        "strategies": {
            "naive": {"R": [{"a": 2.0, "b": 3.0, "c": 3.0, g: 3.1},
                            {"a": 2.5, "b": 2.0, "c": 3.0, g: 3.2},
                            {"a": 2.8, "b": 2.4, "c": 2.0, g: 3.3}],
                      "cost": [{"tokens": 10, "replay_rows": 0, "seconds": 1.0}] * 3},
            "replay": {"R": [{"a": 2.0, "b": 3.0, "c": 3.0, g: 3.1},
                             {"a": 2.1, "b": 2.1, "c": 3.0, g: 3.1},
                             {"a": 2.1, "b": 2.2, "c": 2.1, g: 3.1}],
                       "cost": [{"tokens": 10, "replay_rows": 2, "seconds": 1.0}] * 3},
        },
    }
    s = continual.summarise(results, scale)
    naive, replay = s["naive"], s["replay"]
    assert naive["forgetting"] == pytest.approx({"a": 0.8, "b": 0.4})
    assert naive["mean_forgetting"] == pytest.approx(0.6)
    assert naive["BWT"] == pytest.approx(((2.0 - 2.8) + (2.0 - 2.4)) / 2)
    assert naive["ACC"] == pytest.approx((2.8 + 2.4 + 2.0) / 3)
    assert naive["mean_gain"] == pytest.approx(((3.0 - 2.0) + (3.0 - 2.0)) / 2)
    assert naive["general_drift"] == pytest.approx(0.3)
    assert replay["mean_forgetting"] == pytest.approx((0.1 + 0.1) / 2)
    assert replay["forgetting_cut"] == pytest.approx(1 - 0.1 / 0.6)
    assert replay["gain_kept"] == pytest.approx(((3.0 - 2.1) + (3.0 - 2.1)) / 2 / 1.0)
    assert replay["replay_sequences"] == 6
    # learned is measured from the base, so starting a step lower (forgetting less) is not penalised
    assert naive["mean_learned"] == pytest.approx(((3.0 - 2.0) + (3.0 - 2.0)) / 2)
    assert replay["learned_kept"] == pytest.approx(((3.0 - 2.1) + (3.0 - 2.1)) / 2 / 1.0)


def test_combine_refuses_a_different_naive_baseline():
    def run(naive_loss):
        return {"sequence": ["a@1"], "strategies": {"naive": {"R": [{"a": naive_loss}]}, "kl": {"R": [{"a": 1.0}]}}}

    results = run(2.0)
    del results["strategies"]["kl"]
    continual.combine(results, {"results": run(2.0), "wall_seconds": 5.0}, "other")
    assert set(results["strategies"]) == {"naive", "kl"}
    with pytest.raises(SystemExit, match="differs"):
        continual.combine(run(2.0), {"results": run(2.5), "wall_seconds": 5.0}, "other")
