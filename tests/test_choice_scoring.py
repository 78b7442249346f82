"""Choice options scored from one pass over the prompt (`suites.choice`) give the same
log-likelihoods as scoring each ``prompt + option`` on its own: options of different token
lengths, rows of different lengths in one padded batch, a mixed-adapter batch and a stack."""

import pytest
import torch

from conftest import make_lora
from portfolio.suites.choice import attention_mask, pack, score_packed, score_separately

CASES = [([5, 17, 99, 3, 42, 8], [[11], [12, 13], [14, 15, 16, 17]]),
         ([7, 7, 7], [[20, 21], [22], [23, 24, 25], [26], [27, 28]]),
         (list(range(30, 52)), [[60], [61, 62, 63, 64, 65]])]


@pytest.fixture(scope="module")
def models(tiny_base, tmp_path_factory):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("choice")
    base = LlamaForCausalLM.from_pretrained(tiny_base).eval()
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), make_lora(tiny_base, root / "a", seed=2),
                                     adapter_name="a")
    peft.load_adapter(make_lora(tiny_base, root / "b", seed=3, targets=("k_proj", "o_proj")), adapter_name="b")
    return base, peft.eval()


def test_the_mask_keeps_options_apart_and_positions_restart():
    row = pack([1, 2, 3], [[4, 5], [6]])
    assert row.ids == [1, 2, 3, 4, 5, 6] and row.positions == [0, 1, 2, 3, 4, 3]
    assert row.spans == [([2, 3], [4, 5]), ([2], [6])]
    allowed = attention_mask([row], 7, torch.float32)[0, 0] == 0
    assert allowed[5].tolist() == [True, True, True, False, False, True, False]  # option 2 never sees option 1
    assert allowed[4].tolist() == [True, True, True, True, True, False, False]
    assert allowed[6].tolist() == [False] * 6 + [True]  # padding sees only itself
    with pytest.raises(ValueError):
        pack([1], [[2], []])


@torch.no_grad()
def test_packed_scores_equal_option_by_option_scores(models):
    base, _ = models
    packed = score_packed(base, [pack(p, o) for p, o in CASES], pad_id=0, device="cpu")
    separately = score_separately(base, CASES, 0, "cpu", batch_size=4)  # rows of several cases, padded
    for got, want in zip(packed, separately):
        assert got == pytest.approx(want, abs=1e-4)


@torch.no_grad()
def test_packed_scores_in_a_mixed_adapter_batch_and_a_stack(models):
    _, peft = models
    names = ["a", "b", "__base__"]
    packed = score_packed(peft, [pack(p, o) for p, o in CASES], pad_id=0, device="cpu", adapter_names=names)
    for case, name, got in zip(CASES, names, packed):
        if name == "__base__":
            with peft.disable_adapter():
                [want] = score_separately(peft, [case], 0, "cpu")
        else:
            peft.set_adapter(name)
            [want] = score_separately(peft, [case], 0, "cpu")
        assert got == pytest.approx(want, abs=1e-4), name
    for got, want in zip(packed, score_separately(peft, CASES, 0, "cpu", names)):  # a mixed batch both ways
        assert got == pytest.approx(want, abs=1e-4)
    # a stack: both adapters active at once, no adapter_names
    peft.base_model.set_adapter(["a", "b"])
    stacked = score_packed(peft, [pack(p, o) for p, o in CASES], pad_id=0, device="cpu")
    for got, want in zip(stacked, score_separately(peft, CASES, 0, "cpu")):
        assert got == pytest.approx(want, abs=1e-4)
    assert stacked != packed
