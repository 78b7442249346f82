"""Export for llama.cpp / Ollama (`portfolio export --format gguf`) and parity with the
engine: the GGUF adapter is checked exactly against PEFT's dense update on the tiny base, and
a real llama.cpp (llama-cpp-python) loads it over the shipped Q4_1 SmolLM2 and answers like
`portfolio generate`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import cli_invoker, make_lora
from portfolio.gguf_lora import permute_rows

REQUIRE = os.environ.get("PORTFOLIO_REQUIRE_ENGINES") == "1"


@pytest.fixture
def run(db_url, store_dir):
    return cli_invoker(db_url, store_dir)


def _read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, f in reader.fields.items():
        if name.startswith(("general.", "adapter.")):
            value = f.parts[f.data[0]]
            fields[name] = bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else float(value[0])
    # numpy shape is the reverse of GGUF's ne order
    tensors = {t.name: np.array(t.data).reshape(list(reversed([int(n) for n in t.shape]))) for t in reader.tensors}
    return fields, tensors


def test_gguf_adapter_is_the_exact_update_in_llama_cpps_layout(registry_with_base, tiny_base, tmp_path, run):
    from safetensors.numpy import load_file

    reg = registry_with_base
    lora = make_lora(tiny_base, tmp_path / "lora", r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    reg.import_adapter("g", lora, "tiny")
    result = run("export", "g@1", str(tmp_path / "out"), "--format", "gguf")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "adapter.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert "ADAPTER ./adapter.gguf" in modelfile and f"FROM {tiny_base.resolve()}" in modelfile
    fields, tensors = _read_gguf(out / "adapter.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    peft = load_file(str(lora / "adapter_model.safetensors"))
    config = json.loads((tiny_base / "config.json").read_text())
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "down_proj": "ffn_down"}
    assert len(tensors) == 2 * 5 * config["num_hidden_layers"]
    for layer in range(config["num_hidden_layers"]):
        for module, name in names.items():
            sub = "mlp" if module == "down_proj" else "self_attn"
            a = peft[f"base_model.model.model.layers.{layer}.{sub}.{module}.lora_A.weight"]
            b = peft[f"base_model.model.model.layers.{layer}.{sub}.{module}.lora_B.weight"]
            ga, gb = tensors[f"blk.{layer}.{name}.weight.lora_a"], tensors[f"blk.{layer}.{name}.weight.lora_b"]
            dense = b @ a  # PEFT's ΔW / s, rows in Hugging Face order
            expected = permute_rows(dense, heads[module]) if module in heads else dense
            np.testing.assert_allclose(gb @ ga, expected, rtol=1e-6, atol=1e-6)
            if module in heads:  # the rows really moved: a wrong permutation would not pass the line above
                assert not np.allclose(expected, dense)


def test_rows_permutation_matches_llama_cpps_rotary_order():
    # head_dim 4: llama.cpp wants, per head, rows (0, 2, 1, 3) of the HF order
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    out = permute_rows(w, 2)
    assert [int(r[0]) // 3 for r in out] == [0, 2, 1, 3, 4, 6, 5, 7]


def test_gguf_export_refuses_what_llama_cpp_cannot_load(registry_with_base, tiny_base, tmp_path, run):
    reg = registry_with_base
    reg.import_adapter("g", make_lora(tiny_base, tmp_path / "lora"), "tiny")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    result = run("export", "g@1", str(tmp_path / "full"), "--format", "gguf", ok=False)
    assert result.exit_code == 1 and "is not empty" in result.output
    result = run("export", "g@1", str(tmp_path / "o"), "--format", "onnx", ok=False)
    assert result.exit_code == 2 and "onnx" in result.output


@pytest.fixture(scope="module")
def llama_cpp_ok():
    from portfolio.engines.llamacpp import available

    problem = available()
    if problem and REQUIRE:
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def smollm2_world(llama_cpp_ok, tmp_path_factory):
    """A registry (SQLite) with the embedded base, a random rank-8 adapter version on every
    linear layer and a small suite of generated and choice cases."""
    import torch
    from peft import LoraConfig, get_peft_model

    from portfolio import Registry
    from portfolio.modeling import load_base

    root = tmp_path_factory.mktemp("smollm2")
    db, store = f"sqlite:///{root}/r.db", root / "store"
    with Registry.open(db, store) as reg:
        base, _ = reg.bases.add("smollm2-135m")
        model, _ = load_base(base, log=lambda *_: None)
        torch.manual_seed(3)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        peft_model.save_pretrained(root / "adapter", safe_serialization=True)
        reg.import_adapter("noisy", root / "adapter", base="smollm2-135m")
        lines = [{"suite": {"max_new_tokens": 12}}]
        lines += [{"id": f"gen-{i}", "prompt": p, "checks": [{"kind": "contains", "value": v}]} for i, (p, v) in enumerate([
            ("What is the capital of France?", "Paris"), ("Name a primary color.", "red"), ("What is 2 + 2?", "4"),
            ("Say hello.", "ello"), ("What language is spoken in Spain?", "Spanish"), ("Name a planet.", "Mars")])]
        lines += [{"id": f"choice-{i}", "prompt": q, "checks": [{"kind": "choice", "options": o, "answer": 0}]} for i, (q, o) in enumerate([
            ("Is the sky blue on a clear day?", ["yes", "no"]), ("Is fire cold?", ["no", "yes"]),
            ("Which is a fruit?", ["apple", "chair"]), ("Which is bigger?", ["the sun", "a pea"])])]
        (root / "suite.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        reg.suites.add("sanity", root / "suite.jsonl")
    return {"db": db, "store": store, "run": cli_invoker(db, store)}


def test_suites_run_on_llama_cpp_and_are_stored_beside_the_reference(smollm2_world):
    run = smollm2_world["run"]
    served = json.loads(run("eval", "noisy@1", "base:smollm2-135m", "--suite", "sanity@1", "--engine", "llamacpp", "--json").stdout)
    reference = json.loads(run("eval", "noisy@1", "--suite", "sanity@1", "--json").stdout)
    [ref_noisy] = reference["suites"]
    assert {r["engine"] for r in served["suites"]} == {"llamacpp:Q4_1"} and ref_noisy["engine"] is None
    assert not any(r["reused"] for r in served["suites"])
    noisy = next(r for r in served["suites"] if r["model"] == "noisy@1")
    assert noisy["metrics"]["overall"]["n"] == 10 and 0 <= noisy["metrics"]["overall"]["pass_rate"] <= 1
    # the engine gave choice log-probabilities too: every choice case has a prediction
    cases = json.loads(run("suite", "results", "noisy@1", "--suite", "sanity@1", "--engine", "llamacpp", "--json").stdout)
    assert cases["engine"] == "llamacpp:Q4_1"
    assert all(c["choice"] and abs(sum(c["choice"]["probs"]) - 1) < 1e-6 for c in cases["cases"] if c["id"].startswith("choice"))
    assert all(c["output"] for c in cases["cases"] if c["id"].startswith("gen"))
    # identical inputs on the same engine are reused; the reference result is still its own
    again = json.loads(run("eval", "noisy@1", "--suite", "sanity@1", "--engine", "llamacpp:Q4_1", "--json").stdout)
    assert again["suites"][0]["reused"] and again["suites"][0]["metrics"] == noisy["metrics"]
    version = run("show", "noisy@1").output
    assert "sanity@1 pass" in version and "on llamacpp:Q4_1" in version
    shown = run("suite", "show", "sanity@1").output
    assert "noisy@1 on llamacpp:Q4_1" in shown and "base:smollm2-135m on llamacpp:Q4_1" in shown
    matrix = json.loads(run("matrix", "--metric", "pass_rate", "--json").stdout)
    assert "noisy@1" in matrix["rows"] and "noisy@1 on llamacpp:Q4_1" in matrix["rows"]
    diff = json.loads(run("diff", "noisy@1", "noisy@1", "--suite", "sanity@1", "--engine", "llamacpp", "--json").stdout)
    assert diff["b_engine"] == "llamacpp:Q4_1" and diff["b"] == "noisy@1 on llamacpp:Q4_1"
    refused = run("eval", "noisy@1", "--suite", "sanity@1", "--engine", "llamacpp:Q9_X", ok=False)
    assert refused.exit_code == 1 and "no quantisation type 'Q9_X'" in refused.output and "Q2_K" in refused.output


def test_a_coarser_quantisation_is_made_by_llama_cpp_and_judged_as_its_own_engine(smollm2_world):
    from portfolio import Registry
    from portfolio.engines.llamacpp import quantization, target

    run = smollm2_world["run"]
    coarse = json.loads(run("eval", "noisy@1", "--suite", "sanity@1", "--engine", "llamacpp:Q2_K", "--json").stdout)
    [row] = coarse["suites"]
    assert row["engine"] == "llamacpp:Q2_K" and not row["reused"]
    with Registry.open(smollm2_world["db"], smollm2_world["store"]) as reg:
        served = target(reg.bases.get("smollm2-135m"), "llamacpp:Q2_K", log=lambda *_: None)
    assert quantization(served.base_file) == "Q2_K" and served.identity["requantized_from"] == "Q4_1"
    assert served.identity["file_sha256"] != served.identity["base_sha256"]  # keyed by the file it served
    both = json.loads(run("matrix", "--metric", "pass_rate", "--json").stdout)["rows"]
    assert "noisy@1 on llamacpp:Q2_K" in both


def test_promotion_runs_the_parity_gate_on_the_engine(smollm2_world):
    run = smollm2_world["run"]
    out = run("gate", "set", "noisy", "--suite", "sanity@1", "--allow-critical-failures", "--parity", "llamacpp",
              "--max-parity-drop", "1.0").output
    assert "served pass rate ≤100% below the reference model's (on llamacpp)" in out
    promoted = run("promote", "noisy@1", ok=False)
    [row] = [line for line in promoted.output.splitlines() if line.startswith("parity")]
    assert "sanity@1 on llamacpp:Q4_1" in row and "n=10" in row and "drop ≤ 100%" in row and row.rstrip().endswith("pass")
    bad = run("gate", "set", "noisy", "--suite", "sanity@1", "--parity", "ollama", "--max-parity-drop", "0.1", ok=False)
    assert bad.exit_code == 1 and "--parity 'ollama'" in bad.output


def test_llama_cpp_answers_like_portfolio_generate_over_the_q4_1_base(smollm2_world):
    from portfolio import Registry
    from portfolio.engines.parity import llamacpp_parity

    quiet = lambda *_: None  # noqa: E731
    with Registry.open(smollm2_world["db"], smollm2_world["store"]) as reg:
        adapted = llamacpp_parity(reg, "noisy@1", max_new_tokens=16, log=quiet)
        plain = llamacpp_parity(reg, "base:smollm2-135m", max_new_tokens=16, log=quiet)
    # measured (docs/benchmarks.md): 89% and 55% of tokens before the first difference; a wrong
    # Q/K permutation or scale in the adapter would send the adapted answers off at once
    assert adapted.token_share >= 0.6, adapted.to_dict()
    assert plain.token_share >= 0.35, plain.to_dict()
    assert sum(p.first_difference != 0 for p in adapted.prompts) >= 0.75 * len(adapted.prompts)
    # the adapter changes what portfolio answers, and llama.cpp follows it
    changed = sum(a.reference != p.reference for a, p in zip(adapted.prompts, plain.prompts))
    moved = sum(a.engine != p.engine for a, p in zip(adapted.prompts, plain.prompts))
    assert changed >= len(adapted.prompts) // 2 and moved >= changed // 2


def test_gguf_export_refuses_a_base_llama_cpp_adapters_are_not_written_for(registry_with_base, tokenizer_dir, tmp_path, run):
    """A LoRA of another architecture (a tiny Qwen2): one error naming it, nothing written."""
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path / "qwen"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    run("base", "add", "qwen", str(folder))
    lora = tmp_path / "lora"
    from peft import LoraConfig, get_peft_model

    get_peft_model(Qwen2ForCausalLM.from_pretrained(folder), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(lora)
    run("adapter", "import", "q", str(lora), "--base", "qwen")
    result = run("export", "q@1", str(tmp_path / "out"), "--format", "gguf", ok=False)
    assert result.exit_code == 1 and "Qwen2ForCausalLM base has no GGUF adapter export" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1 and not (tmp_path / "out").exists()


def test_suites_on_llama_cpps_own_openai_server_equal_portfolio_driving_llama_cpp(smollm2_world, tmp_path):
    """`--engine openai:URL` against a real `python -m llama_cpp.server` with the exported
    adapter: the same answers and choice probabilities as `--engine llamacpp`."""
    import subprocess
    import sys
    import time

    import httpx

    from conftest import free_port
    from portfolio import Registry
    from portfolio.basemodel import resolve_source

    run = smollm2_world["run"]
    run("export", "noisy@1", str(tmp_path / "gguf"), "--format", "gguf")
    with Registry.open(smollm2_world["db"], smollm2_world["store"]) as reg:
        base = reg.bases.get("smollm2-135m")
        base_file = resolve_source(base.source) / base.gguf_file
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(base_file), "--lora_path",
                               str(tmp_path / "gguf" / "adapter.gguf"), "--model_alias", "noisy@1", "--host", "127.0.0.1",
                               "--port", str(port), "--interrupt_requests", "False"], stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "llama-server.log", "w"))  # a pipe would fill with its log and stall it
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, (tmp_path / "llama-server.log").read_text()[-2000:]
                time.sleep(0.5)
        run("eval", "noisy@1", "--suite", "sanity@1", "--engine", f"openai:{url}")
        via_server = json.loads(run("suite", "results", "noisy@1", "--suite", "sanity@1", "--engine", f"openai:{url}", "--json").stdout)
    finally:
        server.terminate()
        server.wait(timeout=30)
    run("eval", "noisy@1", "--suite", "sanity@1", "--engine", "llamacpp")
    direct = json.loads(run("suite", "results", "noisy@1", "--suite", "sanity@1", "--engine", "llamacpp", "--json").stdout)
    by_id = {c["id"]: c for c in direct["cases"]}
    assert len(via_server["cases"]) == len(direct["cases"]) == 10  # nothing skipped: the server echoes log-probabilities
    for case in via_server["cases"]:
        assert case["output"] == by_id[case["id"]]["output"], case["id"]
        if case["choice"]:
            assert case["choice"]["probs"] == pytest.approx(by_id[case["id"]]["choice"]["probs"], abs=1e-3)
