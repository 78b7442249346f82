"""The artifact stores: the same guarantees from a local folder and from an S3 API server (moto
in server mode, a separate process), then what only S3 brings: multipart uploads, conditional
writes, the read-through cache, and faults (the server gone mid-upload, a damaged upload, a
missing bucket, bad credentials), each one line, nothing recorded, nothing `gc` cannot find."""

import hashlib
import json
from pathlib import Path

import pytest

from portfolio import Registry
from portfolio.errors import IntegrityFailure, StoreError
from portfolio.store import open_store, sha256_file
from portfolio.export import export_version
from tests.conftest import S3_ENV, cli_invoker, corrupt_blob, new_bucket, start_moto

MIB = 1024 * 1024


@pytest.fixture
def store(store_dir):
    return open_store(store_dir)


def test_identical_bytes_are_stored_once(store):
    d1, new1 = store.put_bytes(b"hello")
    d2, new2 = store.put_bytes(b"hello")
    assert d1 == d2 == hashlib.sha256(b"hello").hexdigest()
    assert (new1, new2) == (True, False)
    assert list(store.digests()) == [d1] and store.size(d1) == 5


def test_put_file_digest_matches_sha256sum(store, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(bytes(range(256)) * 5000)
    digest, _ = store.put_file(src)
    assert digest == sha256_file(src) == hashlib.sha256(src.read_bytes()).hexdigest()
    assert store.read_bytes(digest) == src.read_bytes()


def test_no_temporary_files_left_behind(store):
    store.put_bytes(b"a")
    store.put_bytes(b"a")
    assert store.stale_temp_files(0) == [] and store.stale_uploads(0) == []


def test_check_detects_corruption_and_loss(store):
    good, _ = store.put_bytes(b"good")
    bad, _ = store.put_bytes(b"bad")
    gone, _ = store.put_bytes(b"gone")
    corrupt_blob(store, bad)
    store.delete(gone)
    assert [store.check(d) for d in (good, bad, gone)] == ["ok", "corrupt", "missing"]


def test_work_files_reach_another_host(store, tmp_path, monkeypatch):
    """A checkpoint pushed from one machine is pulled on another (with S3: another cache)."""
    ckpt = store.work_dir(7) / "checkpoint.safetensors"
    ckpt.write_bytes(b"step 5")
    store.push_work(7, ckpt)
    monkeypatch.setenv("PORTFOLIO_CACHE", str(tmp_path / "other-host"))
    other = open_store(store.url)
    if other.work_dir(7) != ckpt.parent:  # a separate host's work folder
        assert not (other.work_dir(7) / ckpt.name).exists()
        assert other.pull_work(7, ckpt.name)
    assert (other.work_dir(7) / ckpt.name).read_bytes() == b"step 5" and 7 in other.work_runs()
    assert other.remove_work(7) > 0 and 7 not in other.work_runs()


# -- S3 only ----------------------------------------------------------------------------------


@pytest.fixture
def s3(moto_endpoint, tmp_path, monkeypatch):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PORTFOLIO_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("PORTFOLIO_CACHE", str(tmp_path / "cache"))
    return f"s3://{new_bucket(moto_endpoint)}/p"


def _gets(store) -> list[str]:
    """Record every GetObject the store's client sends (botocore's own event hooks)."""
    calls: list[str] = []
    store.client.meta.events.register("before-call.s3.GetObject", lambda params, **_: calls.append(params["url_path"]))
    return calls


def test_large_blobs_go_in_parts_each_with_its_checksum(s3, tmp_path):
    store = open_store(s3)
    store.multipart_threshold, store.part_size = 6 * MIB, 5 * MIB
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (12 * MIB // 256))
    digest, new = store.put_file(big)
    head = store.client.head_object(Bucket=store.bucket, Key=store._key(digest))
    assert new and head["ETag"].strip('"').endswith("-3") and head["Metadata"]["sha256"] == digest
    assert store.check(digest) == "ok" and store.stale_uploads(0) == []


def test_two_writers_of_one_blob_never_overwrite_each_other(s3, tmp_path, monkeypatch):
    first = open_store(s3)
    monkeypatch.setenv("PORTFOLIO_CACHE", str(tmp_path / "host-b"))
    second = open_store(s3)
    a, b = first.stage(b"same bytes"), second.stage(b"same bytes")
    assert first.commit(a) is True
    # the second writer checked before the first committed: its conditional put is refused
    assert second._put_single(second._key(b.digest), b) is False
    assert second.commit(second.stage(b"same bytes")) is False
    assert list(first.digests()) == [a.digest]


def test_a_staged_file_damaged_before_upload_is_never_sent(s3):
    store = open_store(s3)
    staged = store.stage(b"the real bytes")
    Path(staged.tmp).write_bytes(b"flipped on disk")
    with pytest.raises(IntegrityFailure, match="is damaged"):
        store.commit(staged)
    assert list(store.digests()) == [] and not Path(staged.tmp).exists()


def test_reads_go_through_a_bounded_cache(s3, tmp_path, monkeypatch):
    writer = open_store(s3)
    d1, _ = writer.put_bytes(b"x" * 4000)
    d2, _ = writer.put_bytes(b"y" * 4000)
    monkeypatch.setenv("PORTFOLIO_CACHE", str(tmp_path / "reader"))
    reader = open_store(s3)
    gets = _gets(reader)
    for _ in range(3):
        assert reader.read_bytes(d1) == b"x" * 4000
    assert len(gets) == 1  # one download, then the cache
    again = open_store(s3)  # another process on the same machine shares the cache
    assert again.verified_path(d1).read_bytes() == b"x" * 4000 and _gets(again) == []
    corrupt = reader._cached(d1)
    corrupt.chmod(0o644)
    corrupt.write_bytes(b"bit rot")
    assert reader.read_bytes(d1) == b"x" * 4000 and len(gets) == 2  # a damaged cache is fetched again
    monkeypatch.setenv("PORTFOLIO_CACHE_GB", str(6000 / 1024**3))  # room for one blob
    reader.read_bytes(d2)
    assert reader._cached(d2).exists() and not reader._cached(d1).exists()


def test_the_server_going_away_mid_upload_records_nothing_and_gc_finds_the_rest(s3, moto_endpoint, tmp_path, tiny_base, monkeypatch):
    from tests.netfault import CutProxy

    proxy = CutProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("PORTFOLIO_S3_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("PORTFOLIO_S3_MULTIPART_BYTES", str(6 * MIB))
    monkeypatch.setenv("PORTFOLIO_S3_PART_BYTES", str(5 * MIB))
    monkeypatch.setenv("PORTFOLIO_S3_ATTEMPTS", "1")
    reg = Registry.open(f"sqlite:///{tmp_path / 'r.db'}", s3)
    try:
        reg.bases.add("tiny", tiny_base)
        big = tmp_path / "big.jsonl"
        big.write_text("".join(json.dumps({"text": f"row {i} " + "w" * 100}) + "\n" for i in range(110_000)))
        assert big.stat().st_size > 12 * MIB
        proxy.cut_after(7 * MIB)  # part one arrives, part two is cut off
        with pytest.raises(StoreError, match="cannot reach the S3 store .* to upload a part") as exc:
            reg.data.add("big", [big], "text")
        assert "\n" not in str(exc.value)
        proxy.restore()
        assert reg.data.list() == []
        leftovers = reg.gc(dry_run=True, min_age=0).items
        assert [i["type"] for i in leftovers] == ["upload"]
        reg.gc(min_age=0)
        assert reg.store.stale_uploads(0) == [] and reg.gc(dry_run=True, min_age=0).items == []
        snap, _ = reg.data.add("big", [big], "text")  # the server is back: it works
        assert reg.verify().problems == [] and snap.row_count == 110_000
    finally:
        reg.close()
        proxy.close()


def test_a_missing_bucket_is_one_line_and_nothing_is_recorded(moto_endpoint, tmp_path, monkeypatch, write_jsonl):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PORTFOLIO_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("PORTFOLIO_CACHE", str(tmp_path / "cache"))
    db = f"sqlite:///{tmp_path / 'r.db'}"
    invoke = cli_invoker(db, "s3://no-such-bucket-here/p")
    result = invoke("data", "add", "d", write_jsonl("d.jsonl", [{"text": "a"}]), "--domain", "x", ok=False)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "bucket 'no-such-bucket-here' does not exist" in result.stderr
    assert json.loads(invoke("data", "list", "--json").output) == []


def test_bad_credentials_are_one_line_and_nothing_is_recorded(tmp_path, monkeypatch, write_jsonl, moto_endpoint):
    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # this server checks keys
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("PORTFOLIO_S3_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("PORTFOLIO_CACHE", str(tmp_path / "cache"))
        invoke = cli_invoker(f"sqlite:///{tmp_path / 'r.db'}", "s3://some-bucket/p")
        result = invoke("data", "add", "d", write_jsonl("d.jsonl", [{"text": "a"}]), "--domain", "x", ok=False)
        assert result.exit_code == 1 and result.stderr.count("\n") == 1
        assert "refused the credentials" in result.stderr and "AWS_ACCESS_KEY_ID" in result.stderr
        assert json.loads(invoke("data", "list", "--json").output) == []
    finally:
        proc.terminate()
        proc.wait(10)


def test_store_copy_moves_a_registry_to_s3_resumably_and_verified(s3, tmp_path, lora_dir, tiny_base, write_jsonl):
    local = tmp_path / "local-store"
    reg = Registry.open(f"sqlite:///{tmp_path / 'r.db'}", local)
    try:
        reg.bases.add("tiny", tiny_base)
        reg.data.add("docs", [write_jsonl("docs.jsonl", [{"text": f"row {i}"} for i in range(20)])], "python")
        reg.import_adapter("py", lora_dir, "tiny", data=["docs@1"])
        run = reg.runs.start("train", "py", {"adapter": "py"})  # an unfinished run with a checkpoint
        ckpt = reg.store.work_dir(run.id) / "checkpoint.safetensors"
        ckpt.write_bytes(b"resume me")
        reg.runs.update(run.id, status="interrupted")
        n = len(list(reg.store.digests()))

        def stop_after_two(done, total):
            if done == 2:
                raise KeyboardInterrupt  # the copy is cut off
        with pytest.raises(KeyboardInterrupt):
            reg.copy_store(s3, stop_after_two)
        report = reg.copy_store(s3)
        assert (report.copied, report.skipped, report.verified, report.problems) == (n - 2, 2, n, [])
        assert report.checkpoints == 1
        again = reg.copy_store(s3)
        assert (again.copied, again.skipped) == (0, n)
    finally:
        reg.close()
    moved = Registry.open(f"sqlite:///{tmp_path / 'r.db'}", s3)  # the same registry, now on S3
    try:
        assert moved.verify().problems == [] and moved.data.rows("docs@1")[0]["data"] == {"text": "row 0"}
        assert moved.store.pull_work(run.id, "checkpoint.safetensors") or (moved.store.work_dir(run.id) / "checkpoint.safetensors").exists()
        assert (moved.store.work_dir(run.id) / "checkpoint.safetensors").read_bytes() == b"resume me"
        export_version(moved, "py@1", tmp_path / "export")
    finally:
        moved.close()
    invoke = cli_invoker(f"sqlite:///{tmp_path / 'r.db'}", local)
    out = invoke("store", "copy", "--to", s3, "--no-progress").output
    assert f"{n} already there" in out and f"verified {n} blob(s)" in out and "PORTFOLIO_STORE=" in out
    same = invoke("store", "copy", "--to", str(local), ok=False)
    assert same.exit_code == 1 and "is the store in use" in same.stderr
