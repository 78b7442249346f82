import hashlib

from portfolio.store import LocalStore, sha256_file


def test_identical_bytes_are_stored_once(tmp_path):
    store = LocalStore(tmp_path / "s")
    d1, new1 = store.put_bytes(b"hello")
    d2, new2 = store.put_bytes(b"hello")
    assert d1 == d2 == hashlib.sha256(b"hello").hexdigest()
    assert (new1, new2) == (True, False)
    assert list(store.digests()) == [d1]


def test_put_file_digest_matches_sha256sum(tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(bytes(range(256)) * 5000)
    store = LocalStore(tmp_path / "s")
    digest, _ = store.put_file(src)
    assert digest == sha256_file(src) == hashlib.sha256(src.read_bytes()).hexdigest()
    assert store.read_bytes(digest) == src.read_bytes()


def test_no_temporary_files_left_behind(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.put_bytes(b"a")
    store.put_bytes(b"a")
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_check_detects_corruption_and_loss(tmp_path):
    store = LocalStore(tmp_path / "s")
    good, _ = store.put_bytes(b"good")
    bad, _ = store.put_bytes(b"bad")
    gone, _ = store.put_bytes(b"gone")
    path = store.path(bad)
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    store.delete(gone)
    assert [store.check(d) for d in (good, bad, gone)] == ["ok", "corrupt", "missing"]
