"""Suites on any running OpenAI-compatible server (``--engine openai:URL``), here a real
`portfolio serve` process: its greedy answers are the reference model's, choice checks are
reported as skipped where the server returns no log-probabilities, results are stored under
that engine, and a server that is down or serves another base is one clear error."""

import json
import os
import subprocess
import sys

import httpx
import pytest

from conftest import cli_invoker, make_lora
from portfolio import Registry
from tests.conftest import free_port, wait_until_healthy


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base, lora_dir):
    root = tmp_path_factory.mktemp("openai")
    db, store = f"sqlite:///{root / 'registry.db'}", root / "store"
    with Registry.open(db, store) as reg:
        reg.bases.add("tiny", tiny_base)
        reg.import_adapter("a", lora_dir, base="tiny")
        reg.import_adapter("a", make_lora(tiny_base, root / "other", seed=5), base="tiny")
        lines = [{"suite": {"max_new_tokens": 8}}]
        lines += [{"id": f"gen-{i}", "prompt": p, "checks": [{"kind": "max_words", "value": 50}]} for i, p in enumerate(
            ["Say hello.", "Name a color.", "What is 2 + 2?"])]
        lines += [{"id": "both", "prompt": "Yes or no?", "checks": [{"kind": "max_words", "value": 50},
                                                                     {"kind": "choice", "options": ["yes", "no"], "answer": 0}]}]
        lines += [{"id": "pick", "prompt": "Pick one.", "checks": [{"kind": "choice", "options": ["a", "b"], "answer": 0}]}]
        (root / "s.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        reg.suites.add("s", root / "s.jsonl")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "portfolio", "--db", db, "--store", str(store), "serve", "--port", str(port)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        wait_until_healthy(proc, client, lambda: proc.stderr.read())
    yield {"run": cli_invoker(db, store), "url": url, "root": root, "tiny_base": tiny_base}
    proc.terminate()
    proc.wait(timeout=30)


def test_suites_on_a_running_server_match_the_reference_and_skip_what_it_cannot_score(world):
    run, engine = world["run"], f"openai:{world['url']}"
    served = json.loads(run("eval", "a@1", "a@2", "base:tiny", "--suite", "s@1", "--engine", engine, "--json").stdout)
    assert {r["engine"] for r in served["suites"]} == {engine}
    reference = json.loads(run("eval", "a@1", "a@2", "base:tiny", "--suite", "s@1", "--json").stdout)
    for model in ("a@1", "a@2", "base:tiny"):
        on_engine = json.loads(run("suite", "results", model, "--suite", "s@1", "--engine", engine, "--json").stdout)
        on_reference = json.loads(run("suite", "results", model, "--suite", "s@1", "--json").stdout)
        # the same model, the same prompt text, greedy: the same answers
        assert {c["id"]: c["output"] for c in on_engine["cases"]} == {c["id"]: c["output"] for c in on_reference["cases"]
                                                                      if c["id"] != "pick"}
        # "pick" has only a choice check: skipped; "both" is judged on its other check
        assert "pick" not in {c["id"] for c in on_engine["cases"]}
        assert [v["kind"] for c in on_engine["cases"] if c["id"] == "both" for v in c["checks"]] == ["max_words"]
    row = next(r for r in served["suites"] if r["model"] == "a@1")
    assert row["metrics"]["skipped"]["choice"] == ["both", "pick"] and "log-probabilities" in row["metrics"]["skipped"]["reason"]
    assert row["metrics"]["overall"]["n"] == 4 and reference["suites"][0]["metrics"]["overall"]["n"] == 5
    out = run("eval", "a@1", "--suite", "s@1", "--engine", engine).output
    assert "skipped" in out and "pick" in out  # said in the table, not only in --json
    # the parity gate runs on it too
    run("gate", "set", "a", "--suite", "s@1", "--parity", engine, "--max-parity-drop", "0.0")
    promoted = run("promote", "a@2", ok=False).output
    assert any(line.startswith("parity") and f"s@1 on {engine}" in line for line in promoted.splitlines()), promoted


def test_a_server_that_is_down_or_serves_another_base_is_one_error(world, tmp_path):
    run = world["run"]
    dead = run("eval", "a@1", "--suite", "s@1", "--engine", f"openai:http://127.0.0.1:{free_port()}", ok=False)
    assert dead.exit_code == 1 and "does not answer" in dead.output and "Traceback" not in dead.output
    bad = run("eval", "a@1", "--suite", "s@1", "--engine", "openai:localhost", ok=False)
    assert bad.exit_code == 1 and "openai:http://" in bad.output
    # a second registry whose base has another name: the running server serves base:tiny only
    other = cli_invoker(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "store")
    other("base", "add", "small", str(world["tiny_base"]))
    other("adapter", "import", "b", str(world["root"] / "other"), "--base", "small")
    (tmp_path / "s.jsonl").write_text(json.dumps({"id": "x", "prompt": "hi", "checks": [{"kind": "max_words", "value": 9}]}) + "\n")
    other("suite", "add", "s", str(tmp_path / "s.jsonl"))
    refused = other("eval", "b@1", "--suite", "s@1", "--engine", f"openai:{world['url']}", ok=False)
    assert refused.exit_code == 1 and "not base small" in refused.output
    assert other("suite", "results", "b@1", "--suite", "s@1", "--engine", f"openai:{world['url']}", ok=False).exit_code != 0
