"""Property-based tests: generated names, references, numbers, JSONL lines and adapter
configs driven through the real CLI and the parsers. The contract, whatever the input:
either success, or exactly one `error:` line with a non-zero exit, no traceback, and nothing
written (the database and the store are as they were)."""

from __future__ import annotations

import contextlib
import json
import re
import math
import shutil
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from portfolio.cli import cli
from portfolio.errors import InvalidAdapter, InvalidDataset, InvalidReference, PortfolioError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# Text a person (or an attacker) might type: names, odd Unicode, line breaks, huge numbers.
ODD = st.sampled_from(["", " ", "\n", "a\n", "py\n", "x" * 201, "x" * 5000, "١٢", "²", "99999999999999999999", "0", "-1",
                       "../x", "a/b", "a@b@c", "@", "py@", "@1", "py@0", "py@١", "py@99999999999999999999", "\u2028",
                       "\x00", "nan", "inf", "-inf", "1e308", "py@production", "py@1", "py", "docs@1", "tiny"])
NAMES = st.one_of(ODD, st.text(min_size=0, max_size=30), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True))
NUMBERS = st.one_of(st.sampled_from(["nan", "inf", "-inf", "1e308", "-1e308", "0", "-0", "1e-320", "3", "0.5", "abc", ""]),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10**25, 10**25).map(str))


def snapshot_state(db_url: str, store: Path) -> tuple:
    """Everything a failed command must leave unchanged: every table's rows, every file."""
    engine = sa.create_engine(db_url)
    rows = {}
    with engine.connect() as conn:
        for table in sorted(sa.inspect(engine).get_table_names()):
            rows[table] = sorted(map(repr, conn.execute(sa.text(f'SELECT * FROM "{table}"')).all()))
    engine.dispose()
    files = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()) if store.exists() else []
    return rows, files


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base, lora_dir):
    """One SQLite registry with a base, a dataset, an adapter version and an alias, shared by
    every example (a fresh one per example would cost seconds each)."""
    root = tmp_path_factory.mktemp("props")
    db_url, store = f"sqlite:///{root / 'registry.db'}", root / "store"
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, ["--db", db_url, "--store", str(store), *map(str, args)])

    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(6)))
    for args in (("base", "add", "tiny", tiny_base), ("data", "add", "docs", data, "--domain", "python"),
                 ("adapter", "import", "py", lora_dir, "--base", "tiny"), ("alias", "set", "py", "production", "1")):
        assert invoke(*args).exit_code == 0, args
    return {"invoke": invoke, "db": db_url, "store": store, "root": root, "lora": lora_dir}


def check_contract(world, *args) -> object:
    """Run one command; assert success, or a clean one-line refusal that wrote nothing."""
    before = snapshot_state(world["db"], world["store"])
    result = world["invoke"](*args)
    if result.exit_code == 0:
        return result
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    stderr = result.stderr
    assert "Traceback" not in result.output + stderr, (args, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, stderr)
    assert "internal error" not in lines[0], (args, lines[0])
    assert snapshot_state(world["db"], world["store"]) == before, (args, "a refused command changed the registry")
    return result


# -- the CLI -------------------------------------------------------------------------------

@SETTINGS
@given(ref=NAMES)
def test_reading_any_reference(world, ref):
    for command in (("show", ref), ("lineage", ref), ("data", "show", ref), ("alias", "history", ref)):
        check_contract(world, *command)


@SETTINGS
@given(name=NAMES, alias=NAMES, version=NAMES)
def test_setting_any_alias(world, name, alias, version):
    check_contract(world, "alias", "set", name, alias, version, "--reason", "prop")


@SETTINGS
@given(router=NAMES, when=st.one_of(NAMES, st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["tenant", "task", "risk", "x"]), NAMES)),
       to=NAMES, priority=NUMBERS, tenant=NAMES)
def test_routing_with_any_rule(world, router, when, to, priority, tenant):
    check_contract(world, "route", "set", router, "--when", when, "--to", to, "--priority", priority, "--reason", "prop")
    for command in (("route", "resolve", router, "--tenant", tenant), ("route", "show", router), ("route", "history", router),
                    ("route", "rollback", router)):
        check_contract(world, *command)


@SETTINGS
@given(ref=NAMES, key=NAMES, value=st.one_of(NAMES, st.just("v" * 1001)))
def test_tagging_with_any_key_and_value(world, ref, key, value):
    check_contract(world, "tag", ref, f"{key}={value}")


LINES = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=20)}).map(json.dumps),
    st.fixed_dictionaries({"text": st.text(alphabet="a\u2028\u0085\u2029\r\x0b", min_size=1, max_size=8)}).map(lambda r: json.dumps(r, ensure_ascii=False)),
    st.just('{"text": "lone \\ud800 surrogate"}'),
    st.just("[" * 100_000 + "]" * 100_000),
    st.just('{"text": ' + "[" * 5000 + "]" * 5000 + "}"),
    st.fixed_dictionaries({"prompt": st.text(max_size=5), "completion": st.one_of(st.text(max_size=5), st.integers())}).map(json.dumps),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "robot"]), "content": st.text(max_size=5)}), max_size=3)}).map(json.dumps),
    st.text(max_size=30),
    st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3)).map(json.dumps),
)


@SETTINGS
@given(name=NAMES, domain=NAMES, source=st.one_of(st.none(), NAMES, st.just("s" * 2001)), license=st.one_of(st.none(), NAMES),
       lines=st.lists(LINES, min_size=0, max_size=4), suffix=st.sampled_from([".jsonl", ".txt", ".csv"]))
def test_adding_any_dataset(world, name, domain, source, license, lines, suffix):
    path = world["root"] / f"gen-{uuid.uuid4().hex}{suffix}"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    args = ["data", "add", name, path, "--domain", domain]
    if source is not None:
        args += ["--source", source]
    if license is not None:
        args += ["--license", license]
    result = check_contract(world, *args)
    if result.exit_code == 0:  # what was stored can be read back, row for row
        from portfolio import Registry

        with Registry.open(world["db"], world["store"]) as reg:
            snap = reg.data.list(name)[-1]
            assert len(reg.data.rows(snap.ref)) == snap.row_count


@SETTINGS
@given(weights=st.lists(NUMBERS, min_size=1, max_size=3), rank=st.one_of(st.none(), NUMBERS),
       density=st.one_of(st.none(), NUMBERS), method=st.sampled_from(["linear", "svd", "ties", "cat", "bogus"]),
       sources=st.lists(st.sampled_from(["py@1", "py@production", "py", "py@9", "nope"]), min_size=1, max_size=3))
def test_merging_with_any_numbers(world, weights, rank, density, method, sources):
    args = ["merge", f"m{uuid.uuid4().hex[:8]}", "--method", method, "--weights", ",".join(weights)]
    for ref in sources:
        args += ["--from", ref]
    if rank is not None:
        args += ["--rank", rank]
    if density is not None:
        args += ["--density", density]
    check_contract(world, *args)


@SETTINGS
@given(lr=NUMBERS, rank=NUMBERS, steps=NUMBERS, replay=NUMBERS, kl=NUMBERS)
def test_training_settings_are_checked_before_any_work(world, lr, rank, steps, replay, kl):
    # steps above 2 would be real training: keep successes cheap by capping them
    try:
        assume(not 0 < float(steps) or float(steps) > 10**6 or float(steps) != int(float(steps)))
    except (ValueError, OverflowError):
        pass
    check_contract(world, "train", f"t{uuid.uuid4().hex[:8]}", "--data", "docs@1", "--base", "tiny", "--lr", lr,
                   "--rank", rank, "--steps", steps, "--replay-ratio", replay, "--kl-weight", kl, "--seq-len", "16")


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=8), st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "x"]), max_size=3))


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type", "rank_pattern", "use_dora"]),
                               JSON_VALUES, max_size=3),
       whole=st.one_of(st.none(), st.sampled_from(["[]", "[1, 2]", "null", "3", '"LORA"', "{", "\ufeff{}"])),
       strip_prefix=st.booleans())
def test_importing_any_adapter_config(world, changes, whole, strip_prefix):
    folder = world["root"] / f"lora-{uuid.uuid4().hex}"
    shutil.copytree(world["lora"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(whole if whole is not None else json.dumps(config))
    if strip_prefix:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "adapter_model.safetensors")
        save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    result = check_contract(world, "adapter", "import", "gen", folder, "--base", "tiny")
    if result.exit_code == 0:  # accepted: the config must describe the tensors, and export must load in PEFT
        assert not strip_prefix and whole is None
        assert isinstance(config["r"], int) and math.isfinite(config["lora_alpha"])


# -- the parsers, directly -----------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(text=st.one_of(NAMES, st.text()))
def test_parse_ref_accepts_or_refuses(text):
    from portfolio.registry.refs import MAX_VERSION, parse_ref

    try:
        ref = parse_ref(text)
    except InvalidReference as exc:
        assert "\n" not in str(exc).strip("\n") or "\n" in text
        return
    assert ref.name.isascii() and "\n" not in text
    assert ref.selector is None or isinstance(ref.selector, str) or 1 <= ref.selector <= MAX_VERSION


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINES, min_size=1, max_size=5))
def test_dataset_parser_accepts_or_refuses(tmp_path, lines):
    from portfolio.data import formats

    path = tmp_path / f"{uuid.uuid4().hex}.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    records = []
    try:
        parsed, _ = formats.parse_files([path], records.append)
    except InvalidDataset:
        return
    # every accepted record survives the store's round trip unchanged
    import io

    buffer = io.BytesIO()
    writer = formats.RowWriter(buffer)
    for r in records:
        writer(r)
    assert [row["data"] for row in formats.read_rows(buffer.getvalue())] == records
    assert parsed[0].n_rows == len(records)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern"]), JSON_VALUES, max_size=3))
def test_adapter_config_parser_accepts_or_refuses(tmp_path, lora_dir, changes):
    from portfolio.adapter_files import read_lora_folder

    folder = tmp_path / uuid.uuid4().hex
    shutil.copytree(lora_dir, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    try:
        lora = read_lora_folder(folder)
    except (InvalidAdapter, PortfolioError):
        return
    assert all(rank == lora.rank for rank, _, _ in lora.modules.values()) or config.get("rank_pattern")


CHECK_SPECS = st.one_of(
    st.fixed_dictionaries({"kind": st.sampled_from(["exact", "contains", "not_contains", "json", "json_schema", "refusal", "max_words",
                                                    "min_words", "regex", "choice", "telepathy", ""])}),
    st.fixed_dictionaries({"kind": st.just("regex"), "pattern": st.text(max_size=8)}),
    st.fixed_dictionaries({"kind": st.just("json_schema"), "schema": st.one_of(JSON_VALUES, st.dictionaries(st.sampled_from(["type", "required", "minimum"]), JSON_VALUES, max_size=2))}),
    st.fixed_dictionaries({"kind": st.sampled_from(["max_words", "min_words"]), "value": JSON_VALUES}),
    st.fixed_dictionaries({"kind": st.just("choice"), "options": st.lists(st.text(max_size=4), max_size=4), "answer": JSON_VALUES}),
    st.fixed_dictionaries({"kind": st.just("refusal"), "expected": JSON_VALUES}),
)
VALID_CHECKS = st.sampled_from([
    {"kind": "json"}, {"kind": "contains", "value": "a"}, {"kind": "not_contains", "value": "zz", "case_sensitive": True},
    {"kind": "exact", "value": "x"}, {"kind": "regex", "pattern": "^s", "flags": "i"}, {"kind": "max_words", "value": 3},
    {"kind": "min_words", "value": 0}, {"kind": "refusal", "expected": False}, {"kind": "refusal", "expected": True, "patterns": ["no"]},
    {"kind": "json_schema", "schema": {"type": "object", "required": ["a"]}},
    {"kind": "choice", "options": ["yes", "no"], "answer": "no"},
])
VALID_CASES = st.fixed_dictionaries({
    "id": st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True), "prompt": st.text(min_size=1, max_size=12).filter(str.strip),
    "checks": st.lists(VALID_CHECKS, min_size=1, max_size=3).filter(lambda cs: sum(c["kind"] == "choice" for c in cs) <= 1),
}, optional={"slice": st.dictionaries(st.sampled_from(["risk", "tenant"]), st.sampled_from(["high", "low", "acme"]), max_size=2),
             "critical": st.booleans()}).map(json.dumps)
SUITE_LINES = st.one_of(
    VALID_CASES, VALID_CASES,
    st.fixed_dictionaries({"id": NAMES, "prompt": st.one_of(st.text(max_size=10), JSON_VALUES),
                           "checks": st.lists(CHECK_SPECS, max_size=3)},
                          optional={"slice": st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), JSON_VALUES), max_size=2),
                                    "critical": JSON_VALUES}).map(json.dumps),
    st.fixed_dictionaries({"suite": st.dictionaries(st.sampled_from(["max_new_tokens", "refusal_patterns", "x"]), JSON_VALUES, max_size=2)}).map(json.dumps),
    LINES,
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(SUITE_LINES, min_size=1, max_size=5))
def test_suite_parser_accepts_or_refuses_with_a_line_number(lines):
    from portfolio.suites.cases import InvalidSuite, parse_suite

    data = "\n".join(lines).encode("utf-8", errors="surrogatepass")
    try:
        suite = parse_suite(data, "gen.jsonl")
    except InvalidSuite as exc:
        event("refused")
        assert re.match(r"gen\.jsonl( line \d+)?: ", str(exc)), str(exc)
        return
    event("accepted")
    assert suite.cases and len({c.id for c in suite.cases}) == len(suite.cases)
    for case in suite.cases:  # what was accepted can be judged without an error
        from portfolio.suites.checks import judge

        for check in case.checks:
            if check["kind"] != "choice":
                judge(check, "some output {\"a\": 1}", suite.refusal_patterns)


# -- reliability round 3: purge, archive, gc and add interleaved over shared digests ---------

SHARED_OPS = st.lists(st.tuples(st.sampled_from(["dataset", "suite", "import", "purge", "archive", "gc"]),
                                st.integers(0, 2), st.integers(0, 2)), min_size=2, max_size=8)


def _both_file(folder: Path, k: int) -> Path:
    """Bytes that are both a valid dataset and a valid suite (content ``k``)."""
    turns = [{"role": "user", "content": f"say {k}"}, {"role": "assistant", "content": str(k)}, {"role": "user", "content": "again"}]
    path = folder / f"both{k}.jsonl"
    path.write_text(json.dumps({"id": f"c{k}", "messages": turns, "checks": [{"kind": "contains", "value": str(k)}]}) + "\n")
    return path


def _apply_shared(reg, folder: Path, lora_dir: Path, config_txt: Path, op: str, k: int, n: int) -> None:
    """One operation; a refusal (`PortfolioError`) is an allowed outcome, a loss is not."""
    from portfolio.errors import PortfolioError

    files = [_both_file(folder, 0), _both_file(folder, 1), config_txt]
    try:
        if op == "dataset":
            reg.data.add(f"d{n}", [files[k]], "x")
        elif op == "suite" and k < 2:
            reg.suites.add(f"s{n}", files[k])
        elif op == "import":
            reg.import_adapter(f"v{n}", lora_dir, "tiny")
        elif op == "purge":
            snaps = [s for s in reg.data.list() if not s.purged]
            if snaps:
                target = snaps[k % len(snaps)]
                if not target.revoked:
                    reg.governance.revoke(target.ref, "property test")
                reg.governance.purge([target.ref])
        elif op == "archive":
            live = [v for v in reg.list_versions() if v.status != "archived"]
            if live:
                target = live[k % len(live)]
                if target.status != "deprecated":
                    reg.deprecate(target.ref, reason="property test")
                reg.archive(target.ref)
        elif op == "gc":
            reg.gc(min_age=0)
    except PortfolioError:
        pass


def _check_references(reg) -> None:
    """Every recorded reference has its bytes, or verify names it: with nothing damaged by
    hand, nothing may be missing at all. The references are read here from the tables
    themselves, not through the code under test."""
    from portfolio.registry.models import AdapterVersionRow, DataEventRow, DatasetSnapshotRow, SuiteSnapshotRow

    with reg._read() as session:
        refs = {d for row in session.execute(sa.select(AdapterVersionRow.artifact_digest, AdapterVersionRow.config_digest)
                                             .where(AdapterVersionRow.status != "archived")) for d in row if d}
        purged = set(session.scalars(sa.select(DataEventRow.snapshot_id).where(DataEventRow.action == "purge")))
        for sid, files, rows in session.execute(sa.select(DatasetSnapshotRow.id, DatasetSnapshotRow.files, DatasetSnapshotRow.rows_digest)):
            if sid not in purged:
                refs |= {f["sha256"] for f in files} | {rows}
        refs |= set(session.scalars(sa.select(SuiteSnapshotRow.sha256)))
    missing = {d for d in refs if not reg.store.exists(d)}
    problems = reg.verify().problems
    assert missing <= {p["digest"] for p in problems}, f"verify does not name lost references {missing}"
    assert missing == set() and problems == [], (missing, problems)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_purge_archive_gc_and_add_interleaved_never_lose_a_reference(backend, tmp_path_factory, tiny_base, lora_dir, pg_ok):
    from portfolio import Registry
    from tests.conftest import pg_schema_url

    if backend == "postgresql" and not pg_ok:
        pytest.skip("PostgreSQL not reachable")

    @settings(max_examples=20 if backend == "sqlite" else 10, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(ops=SHARED_OPS)
    @example(ops=[("dataset", 0, 0), ("suite", 0, 0), ("purge", 0, 0)])  # a suite's bytes are a dataset's
    @example(ops=[("dataset", 2, 0), ("purge", 0, 0), ("gc", 0, 0)])  # a .txt dataset's bytes are a version's config
    @example(ops=[("dataset", 1, 0), ("dataset", 1, 0), ("purge", 0, 0), ("archive", 0, 0), ("dataset", 1, 0), ("gc", 0, 0)])
    def run(ops):
        folder = tmp_path_factory.mktemp("shared")
        with (pg_schema_url() if backend == "postgresql" else contextlib.nullcontext(f"sqlite:///{folder / 'r.db'}")) as url:
            reg = Registry.open(url, folder / "store")
            try:
                reg.bases.add("tiny", tiny_base)
                first = reg.import_adapter("v", lora_dir, "tiny")
                config_txt = folder / "config.txt"  # a .txt dataset whose bytes are a version's stored config
                with reg._read() as session:
                    from portfolio.registry.models import AdapterVersionRow

                    digest = session.scalar(sa.select(AdapterVersionRow.config_digest).where(
                        AdapterVersionRow.artifact_digest == first.artifact_digest))
                config_txt.write_bytes(reg.store.read_bytes(digest))
                for n, (op, k, _) in enumerate(ops):
                    _apply_shared(reg, folder, lora_dir, config_txt, op, k, n)
                    _check_references(reg)
            finally:
                reg.close()

    run()

