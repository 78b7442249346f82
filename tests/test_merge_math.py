"""Merge math against dense references, and the elementwise methods against PEFT's own
`merge_utils` applied to the dense ΔW stack."""

from __future__ import annotations

import json

import pytest
import torch
from peft.utils import merge_utils

from portfolio.compose import merge_math as mm
from portfolio.compose.lora_files import LoraSource
from portfolio.compose.merge import MergeRecipe, merge_sources
from portfolio.errors import IncompatibleAdapter, InvalidAdapter, InvalidState

MODULES = {  # module -> (in, out), like a Llama block: square q/o, narrow k/v, wide mlp
    "model.layers.0.self_attn.q_proj": (48, 48),
    "model.layers.0.self_attn.v_proj": (48, 16),
    "model.layers.0.mlp.up_proj": (48, 96),
}


def write_adapter(folder, seed: int, rank: int, alpha: float, rslora: bool = False, modules=MODULES, scale_b: float = 1.0):
    """A real PEFT-format LoRA folder with random (non-zero) A and B."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m, (i, o) in modules.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, i, generator=g)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(o, rank, generator=g) * scale_b
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}), "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return LoraSource(folder.name, folder / "adapter_model.safetensors", config)


def deltas_of(source: LoraSource) -> dict[str, torch.Tensor]:
    """Dense ΔW = s·B·A per module, float64."""
    from safetensors.torch import load_file

    t = load_file(source.weights_path)
    cfg = source.config
    out = {}
    for key in t:
        if key.endswith("lora_A.weight"):
            m = key[len("base_model.model."):-len(".lora_A.weight")]
            a, b = t[key], t[key.replace("lora_A", "lora_B")]
            out[m] = mm.lora_delta(a, b, mm.lora_scale(cfg["lora_alpha"], a.shape[0], cfg.get("use_rslora", False)))
    return out


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


@pytest.fixture
def three(tmp_path):
    """Three adapters with different ranks, alphas and one rsLoRA."""
    return [
        write_adapter(tmp_path / "a", 1, rank=4, alpha=8),
        write_adapter(tmp_path / "b", 2, rank=8, alpha=4),
        write_adapter(tmp_path / "c", 3, rank=2, alpha=16, rslora=True),
    ]


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_one_adapter_with_weight_one_comes_back(tmp_path, three, method):
    stats = merge_sources([three[1]], MergeRecipe(method, (1.0,)), tmp_path / "out")
    merged, original = deltas_of(_out(tmp_path / "out")), deltas_of(three[1])
    for m in MODULES:
        assert rel(merged[m], original[m]) < 1e-5
    assert stats.reconstruction_error < 1e-6


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_weighted_sum_with_negative_weights_is_exact(tmp_path, three, method):
    weights = (1.0, -1.0, 0.5)
    merge_sources(three, MergeRecipe(method, weights), tmp_path / "out")
    merged = deltas_of(_out(tmp_path / "out"))
    refs = [deltas_of(s) for s in three]
    for m in MODULES:
        want = sum(w * r[m] for w, r in zip(weights, refs))
        assert rel(merged[m], want) < 1e-5, m


def test_cat_rank_is_the_sum_of_ranks(tmp_path, three):
    stats = merge_sources(three, MergeRecipe("cat"), tmp_path / "out")
    assert stats.rank == 4 + 8 + 2 and _out(tmp_path / "out").config["r"] == 14


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_at_rank_r_reaches_the_eckart_young_optimum(tmp_path, three, rank):
    weights = (0.7, 0.3, -0.2)
    stats = merge_sources(three, MergeRecipe("svd", weights, rank=rank), tmp_path / "out")
    merged = deltas_of(_out(tmp_path / "out"))
    refs = [deltas_of(s) for s in three]
    errs, norms = 0.0, 0.0
    for m in MODULES:
        want = sum(w * r[m] for w, r in zip(weights, refs))
        s = torch.linalg.svdvals(want)
        best = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
        assert rel(merged[m], want) <= best + 1e-4, m
        errs += float((merged[m] - want).square().sum())
        norms += float(want.square().sum())
    assert stats.reconstruction_error == pytest.approx((errs / norms) ** 0.5, rel=1e-3)


PEFT_METHODS = {
    "ties": lambda d, w, density: merge_utils.ties(list(d), w, density),
    "dare_linear": lambda d, w, density: merge_utils.dare_linear(list(d), w, density),
    "dare_ties": lambda d, w, density: merge_utils.dare_ties(list(d), w, density),
    "magnitude_prune": lambda d, w, density: merge_utils.magnitude_prune(list(d), w, density),
}


@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_elementwise_equals_peft_merge_utils_on_dense_updates(method, density):
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 40, 24, generator=g)
    weights = torch.tensor([0.5, 1.0, -0.3])
    torch.manual_seed(123)
    want = PEFT_METHODS[method](deltas.clone(), weights, density)
    got = mm.ELEMENTWISE[method](deltas.clone(), weights, density, torch.Generator().manual_seed(123))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", sorted(mm.ELEMENTWISE))
def test_elementwise_merge_at_full_rank_equals_the_method_on_delta_w(tmp_path, three, method):
    """Through the files: factoring back at full rank loses nothing."""
    from portfolio.compose.merge import _generator

    weights = (0.6, 0.4, 0.5)
    merge_sources(three, MergeRecipe(method, weights, density=0.4, rank=48, seed=7), tmp_path / "out")
    merged = deltas_of(_out(tmp_path / "out"))
    refs = [deltas_of(s) for s in three]
    for m in MODULES:
        stack = torch.stack([r[m].float() for r in refs])
        want = mm.ELEMENTWISE[method](stack, torch.tensor(weights), 0.4, _generator(7, m))
        assert rel(merged[m], want) < 1e-4, m


def test_factor_dense_randomized_path_is_near_optimal():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(300, 8, generator=g) @ torch.randn(8, 200, generator=g) + 0.01 * torch.randn(300, 200, generator=g)
    a, b, err, norm = mm.factor_dense(m, 8)
    s = torch.linalg.svdvals(m.double())
    best = float(s[8:].square().sum() / s.square().sum())
    assert err / norm <= best * 1.01 + 1e-9
    assert float((m.double() - b @ a).square().sum()) == pytest.approx(err, rel=1e-4)


def test_merge_refuses_different_modules(tmp_path, three):
    other = write_adapter(tmp_path / "q_only", 4, rank=4, alpha=8, modules=dict(list(MODULES.items())[:1]))
    with pytest.raises(IncompatibleAdapter, match="lacks .*stack them instead"):
        merge_sources([three[0], other], MergeRecipe("linear"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_refuses_different_shapes(tmp_path, three):
    other = write_adapter(tmp_path / "wide", 4, rank=4, alpha=8, modules={m: (i, o * 2) for m, (i, o) in MODULES.items()})
    with pytest.raises(IncompatibleAdapter, match="different bases"):
        merge_sources([three[0], other], MergeRecipe("linear"), tmp_path / "out")


def test_non_finite_source_is_named(tmp_path, three):
    bad = write_adapter(tmp_path / "bad", 5, rank=4, alpha=8, scale_b=float("nan"))
    with pytest.raises(InvalidAdapter, match="bad: tensor .* NaN"):
        merge_sources([three[0], bad], MergeRecipe("linear"), tmp_path / "out")


def test_overflowing_result_is_refused(tmp_path):
    # weights are bounded (±1e4), so overflow needs huge sources: the result is still checked
    huge = [write_adapter(tmp_path / n, seed, rank=4, alpha=8, scale_b=1e36) for n, seed in (("a", 1), ("b", 2))]
    with pytest.raises(InvalidAdapter, match="not finite"):
        merge_sources(huge, MergeRecipe("linear", (1e4, 1e4)), tmp_path / "out")


def test_weights_beyond_their_bound_are_refused(tmp_path, three):
    with pytest.raises(InvalidState, match="finite numbers between"):
        merge_sources(three[:2], MergeRecipe("linear", (3e38, 3e38)), tmp_path / "out")


@pytest.mark.parametrize(
    "recipe, message",
    [
        (MergeRecipe("average"), "unknown method"),
        (MergeRecipe("linear", (1.0,)), "1 weights for 3 adapters"),
        (MergeRecipe("linear", density=0.5), "--density applies to"),
        (MergeRecipe("ties", density=1.5), r"density must be in \(0, 1\]"),
        (MergeRecipe("cat", rank=4), "cat is exact"),
        (MergeRecipe("svd", rank=0), "rank must be a positive"),
    ],
    ids=["method", "weights", "density-unused", "density-range", "cat-rank", "rank"],
)
def test_bad_recipes_are_refused(recipe, message):
    with pytest.raises(InvalidState, match=message):
        recipe.check(3)


def _out(folder) -> LoraSource:
    return LoraSource("out", folder / "adapter_model.safetensors", json.loads((folder / "adapter_config.json").read_text()))


def test_every_merge_method_is_one_table_entry():
    """`compose.MERGE_METHODS` is the one list: the CLI's choices, and each dense method has
    its tensor function in `merge_math.ELEMENTWISE`."""
    from portfolio.compose import MERGE_METHODS, METHODS
    from portfolio.compose import merge_math as mm

    assert METHODS == tuple(MERGE_METHODS)
    assert set(mm.ELEMENTWISE) == {name for name, m in MERGE_METHODS.items() if m.dense}
