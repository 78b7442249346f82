"""The continual-learning benchmark mode (`bench/continual.py --tasks DIR`) end to end on the
tiny model: two synthetic choice tasks of 20 rows, every method's versions registered with
their lineage, scored in one pass, the accuracy matrix, ACC/BWT/FWT and the cost table, and
`portfolio matrix --metric choice_accuracy` showing the same numbers; bad task folders refused
with one error line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "bravo", "delta", "kilo", "lima", "oscar", "tango", "zulu", "echo", "golf"]


def _task(folder: Path, name: str, labels: tuple[str, str], rows: int = 20) -> None:
    """A two-label task: the label is a function of the word, so it can be learnt."""
    train, suite = [], []
    for i in range(rows):
        word = WORDS[i % len(WORDS)] + str(i)
        label = labels[i % 2]
        prompt = f"Task {name}. Word: {word}. Answer {labels[0]} or {labels[1]}."
        train.append({"prompt": prompt, "completion": label})
        suite.append({"id": f"{name}-{i}", "prompt": prompt, "slice": {"task": name},
                      "checks": [{"kind": "choice", "options": list(labels), "answer": label}]})
    (folder / f"{name}.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (folder / f"{name}.suite.jsonl").write_text("".join(json.dumps(r) + "\n" for r in suite))


def bench(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "continual.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=cwd)


def test_the_benchmark_mode_runs_end_to_end_on_two_tasks(tmp_path, tiny_base):
    import time

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _task(tasks, "colours", ("Red", "Blue"))
    _task(tasks, "shapes", ("Round", "Square"))
    out = tmp_path / "out"
    start = time.time()
    done = bench("--tasks", tasks, "--order", "colours,shapes", "--seeds", "0,1", "--methods", "naive,replay-10-kl,olora,multitask",
                 "--base", tiny_base, "--steps", "3", "--batch-size", "4", "--seq-len", "48", "--rank", "4", "--out", out,
                 "--gates", "replay-10-kl")
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.time() - start < 180  # (under a minute on an idle machine; CI shares its cores)
    text = done.stdout
    for needle in ("| method | seeds | ACC | BWT | FWT | train s | peak MB¹ | stored KB | rank |", "| zero-shot base |", "| naive |",
                   "| olora |", "| multitask |", "**replay-10-kl**", "scored "):
        assert needle in text, needle
    assert (out / "matrices.png").read_bytes()[:4] == b"\x89PNG"
    # the gates on the benchmark: the scheduler ran one task a week, each later week judged on held-out halves
    gated = json.loads((out / "results.json").read_text())["gated"]
    assert [w["task"] for w in gated["0"]] == ["colours", "shapes"] and "bwt" in gated["0"][1] and "bwt" not in gated["0"][0]
    assert "| gate decision | forgot (held-out BWT < −1 point) | kept |" in text
    summary = json.loads((out / "results.json").read_text())["summary"]
    naive = summary["methods"]["naive"]
    assert len(naive["seeds"]) == 2 and len(naive["matrix"]) == 2 and len(naive["matrix"][0]) == 2
    # BWT from the matrix: final accuracy on task 1 minus accuracy right after task 1
    for seed in naive["seeds"]:
        assert seed["bwt"] == pytest.approx(seed["matrix"][1][0] - seed["matrix"][0][0])
        assert seed["acc"] == pytest.approx(sum(seed["matrix"][1]) / 2)
    assert summary["methods"]["olora"]["cost"]["rank"] == 8  # 4 kept + 4 new
    # the registry holds every version with its lineage, and `portfolio matrix` shows the same numbers
    from portfolio import Registry

    reg = Registry.open(f"sqlite:///{out / 'registry.db'}", out / "store")
    runs = json.loads((out / "results.json").read_text())["runs"]
    v1, v2 = runs["0"]["naive"]["versions"]
    assert [p.relation for p in reg.lineage(v1).parents if p.child == v1] == ["import"]
    assert {(d.snapshot, d.role) for d in reg.lineage(v2).data if d.version == v2} == {("shapes@1", "train")}
    olora = runs["0"]["olora"]["versions"][-1]
    assert reg.lineage(olora).parents[0].recipe["orthogonal"] == 0.5
    reg.close()
    shown = subprocess.run([sys.executable, "-m", "portfolio", "--db", f"sqlite:///{out / 'registry.db'}", "--store", str(out / "store"),
                            "matrix", "--metric", "choice_accuracy", "--json"], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert shown.returncode == 0, shown.stderr
    shown = json.loads(shown.stdout)
    cells = {(c["model"], c["snapshot"]): c["value"] for c in shown["values"]}
    assert cells[(v2, "colours@1")] == pytest.approx(naive["seeds"][0]["matrix"][1][0])
    # every method and seed, the ones whose first step is a copy scored under another name too
    for method in ("naive", "replay-10-kl", "olora"):
        for seed in (0, 1):
            [cl] = [c for c in shown["continual"] if c["adapter"] == f"{method}-s{seed}"]
            mine = summary["methods"][method]["seeds"][seed]
            assert (cl["acc"], cl["bwt"], cl["fwt"]) == (pytest.approx(mine["acc"]), pytest.approx(mine["bwt"]), pytest.approx(mine["fwt"]))


def test_bad_task_folders_are_refused_with_one_error_line(tmp_path, tiny_base):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _task(tasks, "colours", ("Red", "Blue"), rows=4)
    _task(tasks, "shapes", ("Round", "Square"), rows=4)
    common = ["--base", tiny_base, "--steps", "1", "--out", tmp_path / "out"]
    missing = bench("--tasks", tasks, "--order", "colours,sizes", *common)
    assert missing.returncode == 1 and missing.stderr.strip() == \
        f"error: --order names sizes, not a task of {tasks} (it has colours, shapes)"
    (tasks / "shapes.suite.jsonl").unlink()
    no_suite = bench("--tasks", tasks, "--order", "colours,shapes", *common)
    assert no_suite.returncode == 1 and no_suite.stderr.startswith("error: task shapes has no suite")
    _task(tasks, "shapes", ("Round", "Square"), rows=4)
    lines = (tasks / "shapes.suite.jsonl").read_text().splitlines()
    case = json.loads(lines[1])
    case["checks"] = [{"kind": "contains", "text": "Round"}]
    lines[1] = json.dumps(case)
    (tasks / "shapes.suite.jsonl").write_text("\n".join(lines) + "\n")
    not_choice = bench("--tasks", tasks, "--order", "colours,shapes", *common)
    assert not_choice.returncode == 1 and not_choice.stderr.startswith("error: ") and "line 2: a contains case" in not_choice.stderr
    assert len(not_choice.stderr.strip().splitlines()) == 1


def test_a_resumed_run_keeps_the_seeds_and_gates_already_done(tmp_path, tiny_base):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _task(tasks, "colours", ("Red", "Blue"), rows=8)
    _task(tasks, "shapes", ("Round", "Square"), rows=8)
    out = tmp_path / "out"
    common = ("--tasks", tasks, "--order", "colours,shapes", "--methods", "naive", "--base", tiny_base, "--steps", "2",
              "--batch-size", "4", "--seq-len", "48", "--rank", "4", "--out", out, "--gates", "naive")
    first = bench(*common, "--seeds", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads((out / "results.json").read_text())
    # a second seed added later: seed 0's versions and gate weeks are kept, only seed 1 trains
    resumed = bench(*common, "--seeds", "0,1", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "seed 0: kept from" in resumed.stdout and "gates, seed 0: kept from" in resumed.stdout
    assert "seed 1: naive ->" in resumed.stdout and "seed 0: naive ->" not in resumed.stdout
    after = json.loads((out / "results.json").read_text())
    assert after["runs"]["0"] == before["runs"]["0"] and after["gated"]["0"] == before["gated"]["0"]
    assert after["summary"]["methods"]["naive"]["seeds"][0] == before["summary"]["methods"]["naive"]["seeds"][0]
    assert set(after["runs"]) == {"0", "1"} and len(after["gated"]["1"]) == 2
    # a method added to a recorded seed trains from that seed's first step, not a new one
    added = bench(*common, "--seeds", "0", "--resume", "--methods", "naive,olora")
    assert added.returncode == 0, added.stderr[-3000:]
    assert "seed 0: olora ->" in added.stdout and "seed 0: first-s0" not in added.stdout
    runs = json.loads((out / "seeds.json").read_text())["0"]
    from portfolio import Registry

    reg = Registry.open(f"sqlite:///{out / 'registry.db'}", out / "store")
    first = {p.parent for m in ("naive", "olora") for p in reg.lineage(runs[m]["versions"][0]).parents if p.child == runs[m]["versions"][0]}
    assert first == {"first-s0@1"}
    reg.close()
    # --render trains nothing: each method over the seeds that have it, and the commands that made them
    shown = bench(*common, "--seeds", "0,1", "--render", "--methods", "naive,olora")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "->" not in shown.stdout and "| olora | 1 |" in shown.stdout and "| naive | 2 |" in shown.stdout
    produced = next(line for line in shown.stdout.splitlines() if line.startswith("Produced by"))
    assert produced.count("`python bench/continual.py") == 3 and "--render" not in produced
    # the wall time shown is the three training commands' (recorded), not the render's own
    wall = json.loads((out / "wall.json").read_text())["seconds"]
    assert wall > 0 and f"Wall time {wall / 60:.1f} min, over 3 command(s)." in shown.stdout
    # reading the same results back again stores nothing more (a copy's result is stored once under its name)
    import sqlite3

    def stored_results() -> int:
        with sqlite3.connect(out / "registry.db") as db:
            return db.execute("select count(*) from suite_results").fetchone()[0]

    before = stored_results()
    again = bench(*common, "--seeds", "0,1", "--render", "--methods", "naive,olora")
    assert again.returncode == 0, again.stderr[-3000:]
    assert stored_results() == before


def test_a_second_run_combines_into_one_table_only_when_it_shares_the_baseline(tmp_path, tiny_base):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _task(tasks, "colours", ("Red", "Blue"), rows=8)
    _task(tasks, "shapes", ("Round", "Square"), rows=8)
    common = ("--tasks", tasks, "--order", "colours,shapes", "--base", tiny_base, "--steps", "2", "--batch-size", "4",
              "--seq-len", "48", "--rank", "4", "--seeds", "0")
    first, second = tmp_path / "first", tmp_path / "second"
    assert bench(*common, "--methods", "naive", "--out", first).returncode == 0
    # the second run repeats naive (the anchor both share) and adds replay-5
    ran = bench(*common, "--methods", "naive,replay-5", "--out", second)
    assert ran.returncode == 0, ran.stderr[-3000:]
    shown = bench(*common, "--methods", "naive", "--out", first, "--render", "--combine", second)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "| naive | 1 |" in shown.stdout and "| replay-5 | 1 |" in shown.stdout and shown.stdout.count("| naive |") == 1
    produced = next(line for line in shown.stdout.splitlines() if line.startswith("Produced by"))
    assert str(first) in produced and str(second) in produced
    # a run whose shared method disagrees is not put beside this one
    saved = json.loads((second / "results.json").read_text())
    saved["summary"]["methods"]["naive"]["seeds"][0]["acc"] += 0.25
    (second / "results.json").write_text(json.dumps(saved))
    refused = bench(*common, "--methods", "naive", "--out", first, "--render", "--combine", second)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith("error: --combine")
    assert "naive seed 0 differs" in refused.stderr
