"""The four serious findings of the hardening review, each with a test that failed before its
fix: blobs deleted under a concurrent writer, writers failing instead of queueing, damaged
bytes used silently, and checkpoints that could run code."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from portfolio import Registry
from portfolio.errors import IntegrityFailure, InvalidState
from portfolio.export import export_version


def quiet(*_args, **_kwargs) -> None:
    pass


def flip_bit(path: Path, offset: int = -100) -> None:
    """Damage a stored file in place, the way a bad disk or a careless hand would."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- 1. a failed writer's clean-up never deletes bytes another writer relies on -------------

def test_failed_write_keeps_bytes_a_concurrent_writer_recorded(db_url, store_dir):
    """A writes a new blob, B reuses it in its own transaction, A's transaction fails: B's
    committed record must still be backed by the bytes."""
    reg_a, reg_b = Registry.open(db_url, store_dir), Registry.open(db_url, store_dir)
    data = b"adapter weights shared by two writers" * 100
    b_put = threading.Event()
    errors: list[BaseException] = []

    def writer_b() -> None:
        try:
            with reg_b._write() as (_session, put):
                put(data, "adapter_weights")
                b_put.set()
                time.sleep(0.5)  # commit only after A's clean-up has run
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=writer_b)
    with pytest.raises(RuntimeError):
        with reg_a._write() as (_session, put):
            digest = put(data, "adapter_weights")
            thread.start()
            b_put.wait(1.0)  # on SQLite B queues behind A; on PostgreSQL it waits on A's row
            raise RuntimeError("A's transaction fails after storing the blob")
    thread.join(30)
    assert not errors, errors
    assert reg_b.store.exists(digest), "B committed a record of bytes that A's clean-up deleted"
    report = reg_b.verify()
    assert report.problems == []
    reg_a.close(), reg_b.close()


def test_failed_write_alone_leaves_no_orphan(db_url, store_dir):
    reg = Registry.open(db_url, store_dir)
    with pytest.raises(RuntimeError):
        with reg._write() as (_session, put):
            digest = put(b"never recorded", "adapter_weights")
            raise RuntimeError
    assert not reg.store.exists(digest)
    assert reg.gc(dry_run=True, min_age=0).items == []
    reg.close()


# -- 2. concurrent writers queue instead of failing ----------------------------------------

def _data_add_worker(db_url: str, store: str, folder: str, worker: int, n: int, queue) -> None:
    from portfolio import Registry

    failures = []
    with Registry.open(db_url, store) as reg:
        for i in range(n):
            path = Path(folder) / f"w{worker}-{i}.jsonl"
            path.write_text(json.dumps({"text": f"worker {worker} file {i}"}) + "\n")
            try:
                reg.data.add("shared", [path], "general")
            except Exception as exc:  # noqa: BLE001 - counted, reported by the test
                failures.append(f"{type(exc).__name__}: {exc}")
    queue.put(failures)


def _import_worker(db_url: str, store: str, lora: str, worker: int, n: int, queue) -> None:
    from portfolio import Registry

    failures = []
    with Registry.open(db_url, store) as reg:
        for _ in range(n):
            try:
                reg.import_adapter("same", lora, base="tiny")
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{type(exc).__name__}: {exc}")
    queue.put(failures)


def _run_workers(target, args_for, n_workers: int = 8) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(w), queue)) for w in range(n_workers)]
    for p in procs:
        p.start()
    failures = []
    for _ in procs:
        failures += queue.get(timeout=300)
    for p in procs:
        p.join(30)
    return failures


def test_eight_writers_adding_datasets_all_succeed(db_url, store_dir, tmp_path):
    Registry.open(db_url, store_dir).close()  # initialise once, before the writers race
    n = 6
    failures = _run_workers(_data_add_worker, lambda w: (db_url, str(store_dir), str(tmp_path), w, n))
    assert failures == []
    with Registry.open(db_url, store_dir) as reg:
        snaps = reg.data.list("shared")
        assert sorted(s.version for s in snaps) == list(range(1, 8 * n + 1))
        assert reg.verify().problems == []


def test_eight_writers_importing_one_folder_all_backed(db_url, store_dir, tiny_base, lora_dir):
    with Registry.open(db_url, store_dir) as reg:
        reg.bases.add("tiny", tiny_base)
    n = 3
    failures = _run_workers(_import_worker, lambda w: (db_url, str(store_dir), str(lora_dir), w, n))
    assert failures == []
    with Registry.open(db_url, store_dir) as reg:
        versions = reg.list_versions("same")
        assert [v.version for v in versions] == list(range(1, 8 * n + 1))
        assert all(reg.store.exists(v.artifact_digest) for v in versions)
        assert reg.verify().problems == []


# -- 3. damaged bytes are refused wherever they would be used ------------------------------

@pytest.fixture
def damaged(registry_with_base, lora_dir):
    """A registry whose one adapter version has a bit flipped in its stored weights."""
    reg = registry_with_base
    version = reg.import_adapter("py", lora_dir, base="tiny")
    flip_bit(reg.store.path(version.artifact_digest))
    return reg, version


@pytest.mark.parametrize("use", ["export", "merge", "stack", "generate", "train-from", "eval"])
def test_damaged_adapter_is_refused_by_every_reader(damaged, tmp_path, write_jsonl, use):
    from portfolio.compose.merge import MergeRecipe, merge_adapters
    from portfolio.compose.stack import stack_adapters

    from portfolio.serving import generate

    reg, version = damaged
    if use == "export":
        call = lambda: export_version(reg, version.ref, tmp_path / "out")  # noqa: E731
    elif use == "merge":
        other = reg.import_adapter("other", make_other_lora(tmp_path, Path(reg.bases.get("tiny").source)), base="tiny")
        call = lambda: merge_adapters(reg, "m", [other.ref, version.ref], MergeRecipe("linear", (0.5, 0.5)), log=quiet)  # noqa: E731
    elif use == "stack":
        call = lambda: stack_adapters(reg, "s", [version.ref]) and generate(reg, "s@1", "hi", max_new_tokens=2, log=quiet)  # noqa: E731
    elif use == "generate":
        call = lambda: generate(reg, version.ref, "hello", max_new_tokens=2, log=quiet)  # noqa: E731
    elif use == "train-from":
        from portfolio.training.config import TrainConfig
        from portfolio.training.train import train_adapter

        reg.data.add("w", [write_jsonl("w.jsonl", [{"text": f"row {i} of words"} for i in range(20)])], "w")
        cfg = TrainConfig(adapter="py", data="w@1", from_ref=version.ref, steps=1, batch_size=2, seq_len=32)
        call = lambda: train_adapter(reg, cfg, progress=False, log=quiet)  # noqa: E731
    else:
        from portfolio.evaluation.evaluate import evaluate

        reg.data.add("w", [write_jsonl("w.jsonl", [{"text": f"row {i} of words"} for i in range(20)])], "w")
        call = lambda: evaluate(reg, [version.ref], ["w@1"], seq_len=32, log=quiet)  # noqa: E731
    with pytest.raises(IntegrityFailure, match="damaged.*portfolio verify"):
        call()


def test_damaged_dataset_rows_are_refused(registry, write_jsonl):
    snap, _ = registry.data.add("d", [write_jsonl("d.jsonl", [{"text": "a"}, {"text": "b"}])], "d")
    flip_bit(registry.store.path(snap.rows_digest), offset=5)
    with pytest.raises(IntegrityFailure, match="rows of d@1"):
        registry.data.rows("d@1")


def test_damaged_base_is_refused_at_load_and_by_verify(registry, tiny_base, tmp_path):
    import shutil

    from portfolio.modeling import load_base

    folder = shutil.copytree(tiny_base, tmp_path / "base-copy")
    base, _ = registry.bases.add("copy", folder)
    flip_bit(folder / "model.safetensors")
    with pytest.raises(IntegrityFailure, match="base model 'copy'"):
        load_base(base)
    problems = registry.verify().problems
    assert [(p["kind"], p["state"]) for p in problems] == [("base_weights", "corrupt")]


def test_damaged_dequantised_cache_is_rebuilt(tmp_path, monkeypatch):
    """The GGUF cache: a file that no longer matches its manifest is rebuilt, not used."""
    from portfolio import modeling

    cached = tmp_path / "cache"
    cached.mkdir()
    (cached / "model.safetensors").write_bytes(b"weights")
    from portfolio.store.digests import sha256_file

    (cached / modeling.CACHE_MANIFEST).write_text(json.dumps({"files": {"model.safetensors": sha256_file(cached / "model.safetensors")}}))
    assert modeling._cache_intact(cached)
    (cached / "model.safetensors").write_bytes(b"weightz")
    assert not modeling._cache_intact(cached)
    (cached / modeling.CACHE_MANIFEST).unlink()
    assert not modeling._cache_intact(cached)


def test_digest_from_the_database_never_names_a_path(registry, lora_dir, tiny_base, tmp_path):
    """A digest edited to ``../x`` must not make export read, or gc delete, outside the store."""
    import sqlalchemy as sa

    from portfolio.registry.models import AdapterVersionRow

    registry.bases.add("tiny", tiny_base)
    version = registry.import_adapter("py", lora_dir, base="tiny")
    outside = tmp_path / "outside"
    outside.write_text("precious")
    with registry.engine.begin() as conn:
        conn.execute(sa.update(AdapterVersionRow).where(AdapterVersionRow.artifact_digest == version.artifact_digest).values(artifact_digest="../../outside"))
    with pytest.raises(IntegrityFailure, match="not a sha256 digest"):
        export_version(registry, "py@1", tmp_path / "out")
    registry.gc(min_age=0)
    assert outside.read_text() == "precious"


# -- 4. a checkpoint is data, never code ---------------------------------------------------

class _Planted:
    """Unpickling this object runs a command: what an attacker would plant."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, ([sys.executable, "-c", f"open({self.marker!r}, 'w').write('pwned')"],))


@pytest.mark.parametrize("name", ["checkpoint.safetensors", "checkpoint.pt"])
def test_planted_checkpoint_is_never_executed(trainable, store_dir, tmp_path, name):
    from portfolio.training.config import TrainConfig
    from portfolio.training.train import train_adapter

    marker = tmp_path / "pwned"

    def stop_at_2(step, _stats):
        if step == 2:
            raise KeyboardInterrupt

    cfg = TrainConfig(adapter="w", data="words@1", base="tiny", steps=4, checkpoint_every=1, batch_size=2, seq_len=32)
    with pytest.raises(InvalidState, match="--resume"):
        train_adapter(trainable, cfg, progress=False, log=quiet, on_step=stop_at_2)
    [run] = trainable.runs.list(adapter="w")
    workdir = store_dir / "work" / "runs" / str(run.id)
    assert (workdir / "checkpoint.safetensors").is_file()
    (workdir / name).write_bytes(pickle.dumps(_Planted(str(marker))))
    if name == "checkpoint.safetensors":
        with pytest.raises(InvalidState, match="not a portfolio checkpoint"):
            train_adapter(trainable, resume=run.id, progress=False, log=quiet)
    else:  # a pickle under the old name is simply not read: the run resumes from its checkpoint
        assert train_adapter(trainable, resume=run.id, progress=False, log=quiet).version.ref == "w@1"
    assert not marker.exists(), "unpickling a planted checkpoint ran its code"


# -- the rest, by class: each observed input is refused with one line, or now accepted -------

def _cli(db_url, store_dir):
    from conftest import cli_invoker

    return cli_invoker(db_url, store_dir)


def _refused(result, needle: str) -> None:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def _edit_adapter(src: Path, dest: Path, config_change=None, whole=None, strip_prefix=False) -> Path:
    import shutil

    shutil.copytree(src, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    if config_change:
        config.update(config_change)
    (dest / "adapter_config.json").write_text(whole if whole is not None else json.dumps(config))
    if strip_prefix:
        from safetensors.torch import load_file, save_file

        tensors = load_file(dest / "adapter_model.safetensors")
        save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, dest / "adapter_model.safetensors")
    return dest


@pytest.mark.parametrize("change, whole, strip, needle", [
    ({"r": 8}, None, False, "'r' is 8 but module"),
    ({"target_modules": ["q_proj"]}, None, False, "does not cover module"),
    ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, None, False, "lists 'k_proj' but the weights hold no such module"),
    (None, "[1, 2]", False, "holds a JSON list"),
    (None, '{"peft_type": "LORA", "r": 4, "lora_alpha": NaN, "target_modules": ["q_proj", "v_proj"]}', False, "finite positive"),
    (None, None, True, "must start with PEFT's 'base_model.model.'"),
], ids=["rank", "target-missing", "target-extra", "json-list", "alpha-nan", "no-prefix"])
def test_adapter_config_must_describe_its_tensors(db_url, store_dir, tiny_base, lora_dir, tmp_path, change, whole, strip, needle):
    run = _cli(db_url, store_dir)
    run("base", "add", "tiny", tiny_base)
    folder = _edit_adapter(lora_dir, tmp_path / "edited", change, whole, strip)
    _refused(run("adapter", "import", "x", folder, "--base", "tiny", ok=False), needle)


@pytest.mark.parametrize("args, needle", [
    (["alias", "set", "py", "prod\n", "1"], "invalid alias"),
    (["show", "py@\u0661"], "invalid alias"),
    (["show", "py@99999999999999999999"], "versions run from 1 to"),
    (["alias", "set", "py", "a" * 101, "1"], "up to 100"),
    (["tag", "py@1", "k=" + "v" * 1001], "at most 1000"),
    (["merge", "m", "--from", "py@1", "--from", "py@1"], "names py@1 again"),
    (["merge", "m", "--from", "py@1", "--from", "py@2", "--method", "svd", "--rank", "100000"], "exceeds what these layers can hold"),
    (["merge", "m", "--from", "py@1", "--from", "py@2", "--weights", "1e308,1e308"], "weights must be finite numbers between"),
    (["train", "t", "--data", "docs@1", "--base", "tiny", "--lr", "nan"], "--lr must be a finite number"),
    (["train", "t", "--data", "docs@1", "--base", "tiny", "--rank", "4096"], "exceeds the narrowest targeted layer"),
    (["db", "upgrade", "--revision", "bogus"], "no migration path to revision 'bogus'"),
    (["db", "downgrade", "bogus"], "no migration path to revision 'bogus'"),
], ids=["alias-newline", "arabic-digit", "huge-version", "alias-long", "tag-long", "merge-twice", "svd-rank", "weights-overflow",
        "lr-nan", "train-rank", "upgrade-bogus", "downgrade-bogus"])
def test_odd_input_is_refused_and_nothing_written(db_url, store_dir, tiny_base, lora_dir, write_jsonl, args, needle):
    run = _cli(db_url, store_dir)
    run("base", "add", "tiny", tiny_base)
    run("data", "add", "docs", write_jsonl("d.jsonl", [{"text": f"row {i}"} for i in range(8)]), "--domain", "d")
    run("adapter", "import", "py", lora_dir, "--base", "tiny")
    run("adapter", "import", "py", make_other_lora(lora_dir.parent, tiny_base), "--base", "tiny")
    with Registry.open(db_url, store_dir) as reg:
        before = (len(reg.list_versions()), len(reg.runs.list()), sorted(p.name for p in store_dir.rglob("*") if p.is_file()))
    _refused(run(*args, ok=False), needle)
    with Registry.open(db_url, store_dir) as reg:
        assert (len(reg.list_versions()), len(reg.runs.list()), sorted(p.name for p in store_dir.rglob("*") if p.is_file())) == before


def make_other_lora(where: Path, base: Path) -> Path:
    from conftest import make_lora

    folder = where / "other-lora"
    return folder if folder.is_dir() else make_lora(base, folder, seed=7)


@pytest.mark.parametrize("url, needle", [
    ("sqlite:///{tmp}/not-a-db.db", "file is not a database"),
    ("nosuchdb://x", "unknown database kind 'nosuchdb'"),
], ids=["not-a-database", "unknown-dialect"])
def test_bad_database_urls_are_one_line(tmp_path, url, needle):
    (tmp_path / "not-a-db.db").write_text("hello, I am not SQLite")
    run = _cli(url.format(tmp=tmp_path), tmp_path / "store")
    _refused(run("list", ok=False), needle)


def test_database_from_a_newer_portfolio_says_so(sqlite_url, store_dir):
    import sqlalchemy as sa

    Registry.open(sqlite_url, store_dir).close()
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    _refused(_cli(sqlite_url, store_dir)("list", ok=False), "a newer portfolio made it")


def test_downgrade_upgrade_round_trip_keeps_archive_marks(db_url, store_dir, tiny_base, lora_dir):
    with Registry.open(db_url, store_dir) as reg:
        reg.bases.add("tiny", tiny_base)
        reg.import_adapter("py", lora_dir, base="tiny")
        reg.archive("py@1", reason="retired", force=True)
        assert reg.verify().problems == []
        reg.downgrade("0004")
        reg.upgrade()
        assert reg.verify().problems == []


@pytest.mark.parametrize("kind", ["dangling-link", "proc"])
def test_export_to_an_impossible_place_is_one_line(db_url, store_dir, tiny_base, lora_dir, tmp_path, kind):
    run = _cli(db_url, store_dir)
    run("base", "add", "tiny", tiny_base)
    run("adapter", "import", "py", lora_dir, "--base", "tiny")
    if kind == "dangling-link":
        dest = tmp_path / "link"
        dest.symlink_to(tmp_path / "nowhere")
    else:
        dest = Path("/proc/portfolio-export")
    _refused(run("export", "py@1", dest, ok=False), str(dest))


def test_export_is_readable_by_others(registry_with_base, lora_dir, tmp_path):
    import os
    import stat

    registry_with_base.import_adapter("py", lora_dir, base="tiny")
    old = os.umask(0o022)
    try:
        out = export_version(registry_with_base, "py@1", tmp_path / "served")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
