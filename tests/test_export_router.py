"""export-router for vLLM and LoRAX, its rank constraint, and the vLLM LoRA resolver plugin
(exercised against its interface: vLLM itself needs a GPU machine)."""

import asyncio
import json

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import cli_invoker, make_lora
from portfolio.compose.stack import stack_adapters
from portfolio.errors import InvalidState
from portfolio.server import export as E


@pytest.fixture
def routed(registry_with_base, lora_dir, tiny_base, tmp_path):
    reg = registry_with_base
    reg.import_adapter("general", lora_dir, base="tiny")
    reg.import_adapter("acme", make_lora(tiny_base, tmp_path / "acme", seed=5), base="tiny")
    reg.set_alias("general", "production", 1)
    reg.set_alias("acme", "production", 1)
    stack_adapters(reg, "duo", ["general@1", "acme@1"])
    reg.routes.set("support", "general@production")
    reg.routes.set("support", "acme@production", {"tenant": "acme"})
    reg.routes.set("support", "duo@1", {"task": "both"})
    return reg


def test_export_for_vllm_writes_loadable_folders_and_the_routing_table(routed, tiny_base, tmp_path, db_url, store_dir):
    out = E.export_router(routed, "support", tmp_path / "vllm", "vllm")
    assert out.adapters == {"general-v1": "general@1", "acme-v1": "acme@1", "duo-v1": "duo@1"}
    assert out.max_lora_rank == 8  # the stack exports at 4 + 4; vLLM allows 1, 8, 16, ...
    args = (tmp_path / "vllm" / "vllm-args.txt").read_text()
    assert args.startswith("--enable-lora --max-lora-rank 8 --max-loras 3 --lora-modules ") and "acme-v1=" in args
    bodies = json.loads((tmp_path / "vllm" / "vllm-load-lora-adapter.json").read_text())
    assert {b["lora_name"] for b in bodies} == {"general-v1", "acme-v1", "duo-v1"}
    table = json.loads((tmp_path / "vllm" / "routes.json").read_text())
    assert [(r["when"], r["adapter"]) for r in table["rules"]] == [({"tenant": "acme"}, "acme-v1"), ({"task": "both"}, "duo-v1"),
                                                                   ({}, "general-v1")]
    for body in bodies:
        assert (tmp_path / "vllm" / "adapters" / body["lora_name"] / "README.md").is_file()  # each with its model card
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), body["lora_path"])
    lorax = cli_invoker(db_url, store_dir)("export-router", "support", tmp_path / "lorax", "--for", "lorax")
    assert "wrote 3 adapters" in lorax.output
    ids = json.loads((tmp_path / "lorax" / "lorax-adapters.json").read_text())
    assert all(i["adapter_source"] == "local" for i in ids)


def test_ranks_vllm_cannot_load_are_named_and_nothing_is_written(routed, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "VLLM_LORA_RANKS", (1, 4))  # stand-in for 512: the stack's 8 exceeds it
    with pytest.raises(InvalidState, match=r"too large: duo@1 \(rank 8\).*sum of its ranks"):
        E.export_router(routed, "support", tmp_path / "out", "vllm")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidState, match="not an empty folder"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        E.export_router(routed, "support", tmp_path / "full", "lorax")


def test_the_vllm_resolver_follows_promotions(routed, lora_dir, tmp_path):
    reg = routed
    base = reg.bases.get("tiny")
    resolver = E.PortfolioLoRAResolver(reg, tmp_path / "cache")
    first = asyncio.run(resolver.resolve_lora(base.model_id, "acme@production"))
    assert first.lora_name == "acme@production" and (tmp_path / "cache").exists()
    assert json.loads((tmp_path / "cache" / reg.get_version("acme@1").artifact_digest / "adapter_config.json").read_text())
    reg.import_adapter("acme", lora_dir, base="tiny")
    reg.set_alias("acme", "production", 2)
    second = asyncio.run(resolver.resolve_lora(base.model_id, "acme@production"))
    assert second.lora_path != first.lora_path and second.lora_int_id != first.lora_int_id
    again = asyncio.run(resolver.resolve_lora("tiny", "acme@2"))
    assert again.lora_path == second.lora_path  # cached by digest: exported once
    assert asyncio.run(resolver.resolve_lora(base.model_id, "nope@production")) is None
    assert asyncio.run(resolver.resolve_lora("some/other-base", "acme@2")) is None
