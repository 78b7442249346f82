"""O-LoRA (`train --orthogonal λ`) on the tiny model: the penalty is zero for orthogonal
factors and grows with their overlap; a continuation keeps the parent's factors exactly, pulls
the new ones towards orthogonality, and is stored as a plain LoRA (the exact cat) that PEFT
reloads to the trained model's outputs."""

import pytest
import torch

from portfolio.training.config import InvalidTrainConfig
from portfolio.training.loop import orthogonality_penalty
from tests.test_training import train, weights


def test_the_penalty_is_zero_for_orthogonal_factors_and_grows_with_overlap():
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    old, new = q[:4].clone(), q[4:8].clone()  # orthonormal rows, disjoint subspaces
    assert float(orthogonality_penalty([(old, new)])) == pytest.approx(0.0, abs=1e-10)
    values = [float(orthogonality_penalty([(old, (1 - t) * new + t * old)])) for t in (0.0, 0.25, 0.5, 1.0)]
    assert values == sorted(values) and values[-1] == pytest.approx(4.0, rel=1e-5)  # ‖A Aᵀ‖² = r for orthonormal rows
    # summed over modules, and no gradient reaches the kept factors
    old2 = old.clone().requires_grad_(True)
    new2 = (new + old).clone().requires_grad_(True)
    orthogonality_penalty([(old2, new2), (old2, new2)]).backward()
    assert old2.grad is None and new2.grad is not None


def test_an_orthogonal_continuation_keeps_the_parent_and_exports_as_its_exact_cat(trainable, tiny_base):
    import tempfile
    from pathlib import Path

    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from portfolio.export import export_version

    first = train(trainable, adapter="o", base="tiny", data="words@1", steps=6, rank=4)
    loose = train(trainable, adapter="o", data="numbers@1", steps=6, orthogonal=0.0, replay_ratio=0.0, from_ref="o@1")
    tight = train(trainable, adapter="o", data="numbers@1", steps=6, orthogonal=10.0, replay_ratio=0.0, from_ref="o@1")
    assert tight.version.rank == 8 and loose.version.rank == 4  # the parent's 4 kept, 4 new beside them
    parent, cat = weights(trainable, first.version.ref), weights(trainable, tight.version.ref)
    scale = first.version.alpha / first.version.rank
    for key_a in [k for k in parent if "lora_A" in k]:  # the parent's update, exactly, in the first 4 ranks
        key_b = key_a.replace("lora_A", "lora_B")
        kept = cat[key_b][:, :4] @ cat[key_a][:4]
        assert torch.allclose(kept, scale * parent[key_b] @ parent[key_a], atol=1e-6)
    curve = tight.metrics["orthogonality_curve"]
    assert len(curve) == 6 and curve[-1] < curve[0]  # the new factors are pulled out of the parent's subspace
    recipe = trainable.lineage(tight.version.ref).parents[0].recipe
    assert recipe["orthogonal"] == 10.0 and recipe["task_rank"] == 4
    assert tight.evaluations[0]["new_loss"] < tight.evaluations[0]["parent_loss"]
    # the stored cat, reloaded in plain PEFT over the base, is what the registry serves and scores
    folder = export_version(trainable, tight.version.ref, Path(tempfile.mkdtemp()) / "o", card=False)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), folder).eval()
    from portfolio.evaluation.evaluate import evaluate

    [score] = evaluate(trainable, [tight.version.ref], ["numbers@1"], seq_len=32, log=lambda *_: None)
    assert score.metrics["loss"] == pytest.approx(tight.evaluations[0]["new_loss"], abs=1e-5)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    parent_only = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base),
                                            export_version(trainable, first.version.ref, Path(tempfile.mkdtemp()) / "p", card=False))
    with torch.no_grad():
        assert not torch.allclose(ours, parent_only(input_ids=ids).logits, atol=1e-4)  # the new factors count
    # a third task: new factors of the task rank again, not of the parent's grown rank
    third = train(trainable, adapter="o", data="words@1", steps=3, orthogonal=1.0, replay_ratio=0.0, from_ref=tight.version.ref)
    assert third.version.rank == 12


def test_orthogonal_needs_a_plain_lora_parent(trainable):
    with pytest.raises(InvalidTrainConfig, match="--orthogonal keeps a parent's factors"):
        train(trainable, adapter="fresh", base="tiny", data="words@1", steps=2, orthogonal=1.0)
    with pytest.raises(InvalidTrainConfig, match="--orthogonal must be ≥ 0"):
        train(trainable, adapter="fresh", base="tiny", data="words@1", steps=2, orthogonal=-1.0)
    train(trainable, adapter="d", base="tiny", data="words@1", steps=2, use_dora=True)
    with pytest.raises(InvalidTrainConfig, match="is a DoRA adapter"):
        train(trainable, adapter="d", data="numbers@1", steps=2, orthogonal=1.0)
