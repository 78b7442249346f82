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
from portfolio.export import export_version
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


def test_llama_cpp_answers_like_portfolio_generate_over_the_q4_1_base(llama_cpp_ok, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from portfolio import Registry
    from portfolio.engines.parity import llamacpp_parity
    from portfolio.modeling import load_base

    with Registry.open(f"sqlite:///{tmp_path}/r.db", tmp_path / "store") as reg:
        base, _ = reg.bases.add("smollm2-135m")
        model, _ = load_base(base, log=lambda *_: None)
        torch.manual_seed(3)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
        v = reg.import_adapter("noisy", tmp_path / "adapter", base="smollm2-135m")
        quiet = lambda *_: None  # noqa: E731
        adapted = llamacpp_parity(reg, v.ref, max_new_tokens=16, log=quiet)
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
