"""A base quantised by bitsandbytes while the adapter trains over it (QLoRA), on the CPU:
nf4 and int8 train a float32 adapter that is scored on the float32 base, resume to the same
weights, are recorded; what cannot run is refused with one clear error before any work."""

import importlib.metadata

import pytest
import torch

from portfolio.training.config import InvalidTrainConfig, TrainConfig
from tests.conftest import save_tiny_model
from tests.test_training import straight_and_resumed, train, weights

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'portfolio[qlora]')")


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory, tokenizer_dir):
    """The tiny model at width 64: bitsandbytes' 4-bit blocks need layers of 64 inputs."""
    return save_tiny_model(tmp_path_factory.mktemp("wide-base"), tokenizer_dir=tokenizer_dir, hidden_size=64, intermediate_size=128)


@pytest.fixture
def wide(trainable, wide_base):
    trainable.bases.add("wide", wide_base)
    return trainable


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantised_base_trains_a_float32_adapter_scored_on_the_float32_base(wide, kind, monkeypatch):
    from portfolio import modeling

    loaded = []
    original = modeling.load_base

    def spy(base, *args, **kw):
        model, tok = original(base, *args, **kw)
        loaded.append((kw.get("quantize"), type(model.model.layers[0].self_attn.q_proj).__name__))
        return model, tok

    monkeypatch.setattr(modeling, "load_base", spy)
    out = train(wide, adapter=f"q{kind}", base="wide", data="words@1", steps=8, quantize_base=kind)
    plain = train(wide, adapter="plain", base="wide", data="words@1", steps=8)
    layer = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[kind]
    assert (kind, layer) in loaded and (None, "Linear") in loaded  # trained over the quantised base, scored on the float32 one
    w, p = weights(wide, out.version.ref), weights(wide, plain.version.ref)
    assert all(t.dtype == torch.float32 for t in w.values()) and w.keys() == p.keys()
    assert not all(torch.allclose(w[k], p[k]) for k in w)  # the quantised forward pass changed what was learnt
    assert out.evaluations[0]["new_loss"] < out.evaluations[0]["parent_loss"]
    assert wide.runs.get(out.run_id).config["quantize_base"] == kind


def test_an_interrupted_nf4_run_resumes_to_the_same_weights(wide):
    a, b = straight_and_resumed(wide, base="wide", data="words@1", steps=8, seed=1, quantize_base="nf4", checkpoint_every=2)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_what_cannot_be_quantised_is_refused_before_any_work(wide, monkeypatch, sqlite_url, store_dir):
    from tests.conftest import cli_invoker

    with pytest.raises(InvalidTrainConfig, match="not a multiple of bitsandbytes' 4-bit block of 64; use --quantize-base int8"):
        train(wide, adapter="t", base="tiny", data="words@1", steps=2, quantize_base="nf4")  # the 32-wide tiny base
    with pytest.raises(InvalidTrainConfig, match="--quantize-base must be nf4 or int8"):
        TrainConfig(adapter="x", data="d@1", quantize_base="fp4")
    with pytest.raises(InvalidTrainConfig, match="--init pissa rewrites the base's weights"):
        TrainConfig(adapter="x", data="d@1", quantize_base="nf4", init="pissa")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name))
                        if name == "bitsandbytes" else real(name))
    run = cli_invoker(sqlite_url, store_dir)
    bad = run("train", "x", "--base", "wide", "--data", "words@1", "--quantize-base", "nf4", ok=False)
    assert bad.exit_code == 1 and bad.stderr.startswith("error: --quantize-base nf4: bitsandbytes is not installed: pip install")
    assert not [r for r in wide.runs.list() if r.adapter == "x"]  # refused before a run was recorded


def test_a_quantised_run_from_the_cli_prints_only_portfolio_lines(wide, sqlite_url, store_dir):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PORTFOLIO_DB": sqlite_url, "PORTFOLIO_STORE": str(store_dir), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "portfolio", "train", "cli", "--base", "wide", "--data", "words@1", "--steps", "3",
                          "--quantize-base", "nf4", "--batch-size", "4", "--seq-len", "32", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "registered cli@1" in out.stdout
    noise = [line for line in out.stderr.splitlines() if not line.startswith(("run ", "no earlier"))]
    assert noise == [], out.stderr
