"""Every command through click's CliRunner, on SQLite and PostgreSQL."""

import json
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import cli_invoker
from portfolio.cli import cli


@pytest.fixture
def run(db_url, store_dir):
    return cli_invoker(db_url, store_dir)


@pytest.fixture
def populated(run, tiny_base, lora_dir, write_jsonl):
    run("init")
    run("base", "add", "tiny", tiny_base)
    data = write_jsonl("docs.jsonl", [{"text": "def f(): pass"}, {"text": "class A: ..."}])
    run("data", "add", "docs", data, "--domain", "python", "--source", "https://docs.python.org", "--license", "PSF")
    run("adapter", "import", "py", lora_dir, "--base", "tiny", "--data", "docs@1")
    return {"data": data}


def test_lineage_json_shows_sha256sum_of_the_added_file(run, populated):
    out = run("lineage", "py@1", "--format", "json").output
    lineage = json.loads(out)
    expected = subprocess.run(["sha256sum", str(populated["data"])], capture_output=True, text=True, check=True).stdout.split()[0]
    assert [(d["snapshot"], d["role"], d["sha256"]) for d in lineage["data"]] == [("docs@1", "train", expected)]


@pytest.mark.parametrize("fmt, needle", [("tree", "train  docs@1 [python] sha256"), ("dot", "digraph lineage"), ("mermaid", "flowchart BT")], ids=["tree", "dot", "mermaid"])
def test_lineage_formats(run, populated, fmt, needle):
    assert needle in run("lineage", "py", "--format", fmt).output


def test_lineage_to_file(run, populated, tmp_path):
    target = tmp_path / "lin.dot"
    run("lineage", "py@1", "--format", "dot", "-o", target)
    assert target.read_text().startswith("digraph")


def test_data_add_twice_says_it_exists(run, populated):
    out = run("data", "add", "docs", populated["data"], "--domain", "python").output
    assert "already docs@1" in out
    listing = json.loads(run("data", "list", "--json").output)
    assert [s["version"] for s in listing] == [1]
    assert json.loads(run("data", "show", "docs@1").output)["license"] == "PSF"


def test_list_show_and_json(run, populated):
    assert "py@1" in run("list").output
    shown = json.loads(run("show", "py@1", "--json").output)
    assert (shown["adapter"], shown["version"], shown["rank"]) == ("py", 1, 4)
    assert "candidate" in run("show", "py").output
    assert json.loads(run("base", "list", "--json").output)[0]["name"] == "tiny"
    base = json.loads(run("base", "show", "tiny", "--json").output)
    assert base["gguf"] is None and (Path(base["folder"]) / "config.json").is_file()
    assert run("base", "show", "tiny", "--folder").output.strip() == base["folder"]
    assert "vllm serve " + base["folder"] in run("base", "show", "tiny").output
    missing = run("base", "show", "nope", ok=False)
    assert missing.exit_code != 0 and missing.output.startswith("error:")


def test_alias_tag_deprecate_flow(run, populated, lora_dir):
    run("adapter", "import", "py", lora_dir, "--base", "tiny")
    assert "py@production -> py@1" in run("alias", "set", "py", "production", "1", "--reason", "launch").output
    assert "(was py@1)" in run("alias", "set", "py", "production", "2", "--reason", "retrained").output
    history = json.loads(run("alias", "history", "py", "--json").output)
    assert [(h["from_version"], h["to_version"], h["reason"]) for h in history] == [(None, 1, "launch"), (1, 2, "retrained")]
    run("tag", "py@2", "team=search")
    assert [v["version"] for v in json.loads(run("list", "--tag", "team=search", "--json").output)] == [2]
    assert "replaced by py@2" in run("deprecate", "py@1", "--reason", "stale", "--successor", "py@2").output
    refused = run("alias", "set", "py", "staging", "1", ok=False)
    assert refused.exit_code == 1 and "pass --force" in refused.stderr
    run("alias", "set", "py", "staging", "1", "--force", "--reason", "debugging")
    assert "(forced)" in run("alias", "history", "py").output
    assert "removed py@staging" in run("alias", "remove", "py", "staging").output


def test_export_and_verify(run, populated, tmp_path):
    run("export", "py@1", tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "0 missing or corrupt" in run("verify").output
    report = json.loads(run("verify", "--json").output)
    assert report["checked"] == report["ok"] > 0


def test_verify_fails_on_damage(run, populated, store_dir):
    shown = json.loads(run("show", "py@1", "--json").output)
    blob = store_dir / "blobs" / shown["artifact_digest"][:2] / shown["artifact_digest"]
    blob.chmod(0o644)
    blob.write_bytes(b"x")
    result = run("verify", ok=False)
    assert result.exit_code == 1 and "corrupt: adapter_weights" in result.output and "py@1" in result.output


def test_db_commands(run):
    run("init")
    assert "already up to date" in run("init").output
    from portfolio.registry import db

    head = db.head_revision(db.create_engine("sqlite://"))
    assert f"database: {head}" in run("db", "current").output
    assert f"schema at {head}" in run("db", "upgrade").output
    assert "base (empty)" in run("db", "downgrade", "base").output
    refused = run("list", ok=False)
    assert refused.exit_code == 1 and "run `portfolio init`" in refused.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "ghost@1"], "no adapter 'ghost'"),
        (["show", "bad@@ref"], "invalid alias"),
        (["lineage", "py@9"], "has no version 9"),
        (["data", "add", "d", "missing.jsonl", "--domain", "x"], "no such file"),
        (["adapter", "import", "q", "/nonexistent", "--base", "tiny"], "no such folder"),
        (["adapter", "import", "q", ".", "--base", "nobase"], "no base model 'nobase'"),
        (["deprecate", "py@1", "--reason", " "], "needs a reason"),
        (["alias", "set", "py", "7", "1"], "would shadow version"),
    ],
    ids=["unknown-adapter", "bad-ref", "unknown-version", "missing-file", "missing-folder", "unknown-base", "empty-reason", "numeric-alias"],
)
def test_bad_input_is_one_line_and_nonzero(run, populated, args, message):
    result = run(*args, ok=False)
    assert result.exit_code != 0
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_bad_line_is_named_and_nothing_is_written(run, populated, write_jsonl, store_dir):
    before = sorted(p.name for p in (store_dir / "blobs").rglob("*"))
    bad = write_jsonl("bad.jsonl", ['{"text": "ok"}', '{"text": 3}'])
    result = run("data", "add", "docs", bad, "--domain", "python", ok=False)
    assert "bad.jsonl line 2: 'text' must be a non-empty string" in result.stderr
    assert sorted(p.name for p in (store_dir / "blobs").rglob("*")) == before
    assert len(json.loads(run("data", "list", "--json").output)) == 1


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))


@pytest.mark.parametrize("path, command", list(_commands(cli)), ids=lambda x: " ".join(x) if isinstance(x, tuple) else "")
def test_every_command_has_help(path, command):
    assert command.help and command.help.strip(), f"`portfolio {' '.join(path)}` has no help text"
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_runs_list_and_show(run, populated, db_url, store_dir):
    from portfolio import Registry

    with Registry.open(db_url, store_dir) as reg:
        r = reg.runs.start("train", "py", {"lr": 0.001}, seed=3)
        reg.runs.update(r.id, status="interrupted")
    assert "interrupted" in run("runs").output
    assert json.loads(run("runs", "--json").output)[0]["status"] == "interrupted"
    assert json.loads(run("runs", "show", r.id).output)["config"] == {"lr": 0.001}
    missing = run("runs", "show", "999", ok=False)
    assert missing.exit_code == 1 and "no run 999" in missing.stderr
