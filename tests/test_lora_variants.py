"""LoRA variants on the tiny model: DoRA trained, stored with its magnitude vectors, imported,
reloaded in PEFT, scored in batches beside plain LoRA adapters, served, and refused by merges
and vLLM; PiSSA/OLoRA trained over the moved base and stored converted to a plain LoRA that
gives the same outputs over the original base; EVA initialised from the data."""

import tempfile
from pathlib import Path

import pytest
import torch

from portfolio.training.config import InvalidTrainConfig, TrainConfig
from tests.conftest import cli_invoker
from tests.test_training import FAST, quiet, straight_and_resumed, train, weights


def _dora_folder(base_dir: Path, out: Path, seed: int = 3) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_dora_is_trained_stored_with_its_magnitudes_and_reloads_in_peft(trainable, tiny_base):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from portfolio.export import export_version

    out = train(trainable, adapter="d", base="tiny", data="words@1", steps=6, use_dora=True, rank=4)
    stored = weights(trainable, out.version.ref)
    magnitudes = [k for k in stored if k.endswith("lora_magnitude_vector")]
    assert magnitudes and len(magnitudes) == len([k for k in stored if k.endswith("lora_A.weight")])
    assert out.version.lora_config["use_dora"] is True and out.metrics["loss_curve"][-1] < out.metrics["loss_curve"][0]
    assert out.version.n_params == sum(t.numel() for t in stored.values())
    folder = export_version(trainable, out.version.ref, Path(tempfile.mkdtemp()) / "d", card=False)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), folder).eval()
    loaded = {n: p for n, p in model.named_parameters() if "magnitude" in n}
    assert loaded and all(torch.equal(p.detach(), stored[n.replace(".default.weight", "")]) for n, p in loaded.items())
    # a warm start keeps the variant; --use-dora there is refused
    child = train(trainable, adapter="d", data="numbers@1", steps=3)
    assert child.version.lora_config["use_dora"] is True
    assert any(k.endswith("lora_magnitude_vector") for k in weights(trainable, child.version.ref))
    with pytest.raises(InvalidTrainConfig, match="--use-dora: a warm start keeps d@2's LoRA variant"):
        train(trainable, adapter="d", data="numbers@1", steps=3, use_dora=True)


def test_a_peft_dora_folder_imports_shows_its_variant_and_is_refused_by_merge_and_vllm(trainable, tiny_base, tmp_path,
                                                                                       sqlite_url, store_dir):
    from portfolio.compose.merge import MergeRecipe, merge_adapters
    from portfolio.errors import InvalidState

    run = cli_invoker(sqlite_url, store_dir)
    folder = _dora_folder(tiny_base, tmp_path / "dora")
    out = run("adapter", "import", "imp", str(folder), "--base", "tiny")
    assert "imported imp@1 [candidate]: dora r=4" in out.stdout
    assert "variant" in run("show", "imp@1").stdout and "dora" in run("show", "imp@1").stdout
    plain = train(trainable, adapter="p", base="tiny", data="words@1", steps=2, rank=4, targets=["q_proj", "v_proj"])
    with pytest.raises(InvalidState, match="no merge of DoRA adapters is exact"):
        merge_adapters(trainable, "m", ["imp@1", plain.version.ref], MergeRecipe("linear"), log=quiet)
    bad = run("merge", "m", "--from", "imp@1", "--from", plain.version.ref, "--method", "cat", ok=False)
    assert bad.exit_code == 1 and bad.stderr.startswith("error: imp@1 is a DoRA adapter")
    bad = run("stack", "s", "--from", "imp@1", "--from", plain.version.ref, ok=False)
    assert bad.exit_code == 1 and "DoRA" in bad.stderr and "Traceback" not in bad.output
    from portfolio.engines.vllm import VllmClient

    with pytest.raises(InvalidState, match="vLLM has no DoRA"):  # refused before any request goes out
        VllmClient("http://127.0.0.1:9").load("x", folder)


def test_dora_rows_score_in_a_batch_beside_plain_lora_rows_as_they_do_alone(tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from portfolio import mixed_batch
    from tests.conftest import make_lora

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), _dora_folder(tiny_base, tmp_path / "d"),
                                      adapter_name="dora")
    model.load_adapter(make_lora(tiny_base, tmp_path / "l", seed=4), adapter_name="plain")
    model.eval()
    ids = torch.randint(0, 1000, (5, 12))
    names = ["dora", "plain", "__base__", "dora", "plain"]
    mixed = mixed_batch.forward(model, names, input_ids=ids).logits
    for row, name in enumerate(names):
        with torch.no_grad(), mixed_batch.only(model, name):
            alone = model(input_ids=ids[row:row + 1]).logits
        assert torch.allclose(mixed[row], alone[0], atol=1e-5), name
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)  # DoRA changes the outputs
    gen = mixed_batch.generate(model, names, 0, input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for row, name in enumerate(names):
        with torch.no_grad(), mixed_batch.only(model, name):
            alone = model.generate(input_ids=ids[row:row + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert gen[row, :alone.shape[1]].tolist() == alone[0].tolist(), name
    assert list(model.active_adapters) == ["dora"]  # what was active before is active again


def test_eval_and_generate_of_a_dora_version_match_peft(trainable, tiny_base, tmp_path, sqlite_url, store_dir):
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from portfolio.serving import generate

    run = cli_invoker(sqlite_url, store_dir)
    run("adapter", "import", "imp", str(_dora_folder(tiny_base, tmp_path / "dora")), "--base", "tiny")
    ours = generate(trainable, "imp@1", "Say hi.", max_new_tokens=6, log=quiet)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), tmp_path / "dora").eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    ids = inputs["input_ids"]
    with torch.no_grad():
        theirs = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    assert ours.token_ids == theirs[0, ids.shape[1]:].tolist()
    assert run("eval", "imp@1", "--data", "words@1").exit_code == 0


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_are_saved_as_a_plain_lora_with_the_trained_outputs(trainable, tiny_base, tmp_path, init):
    """PEFT's conversion: over the original base, the stored rank-2r LoRA gives what the
    trained adapter gave over the base it trained on (principal part moved out)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from portfolio.training.model import fresh_adapter as _fresh_adapter, save_adapter as _save_adapter

    cfg = TrainConfig(**{**FAST, "adapter": "x", "data": "d@1", "rank": 4, "alpha": 4.0, "targets": ["q_proj", "v_proj"], "init": init})
    model = _fresh_adapter(LlamaForCausalLM.from_pretrained(tiny_base), cfg, tmp_path, torch.device("cpu"), None, 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.02 * torch.randn_like(p))  # stands for training
    ids = torch.randint(0, 1000, (2, 10))
    trained = _logits(model.eval(), ids)
    folder = _save_adapter(model, tmp_path, convert=True)
    assert folder.rank == 8 and folder.config["init_lora_weights"] is True
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), folder.path).eval()
    assert torch.allclose(_logits(reloaded, ids), trained, atol=1e-4)
    # through `train`: the version is rank 2r and better than the base on held-out rows
    out = train(trainable, adapter=init, base="tiny", data="words@1", steps=8, rank=4, init=init, replay_ratio=0.0)
    assert out.version.rank == 8 and out.version.lora_config["init_lora_weights"] is True
    assert out.evaluations[0]["new_loss"] < out.evaluations[0]["parent_loss"]
    assert trainable.runs.get(out.run_id).config["init"] == init


def test_eva_starts_from_the_data_and_trains(trainable):
    eva = train(trainable, adapter="eva", base="tiny", data="words@1", steps=4, rank=4, init="eva")
    plain = train(trainable, adapter="plain", base="tiny", data="words@1", steps=4, rank=4)
    a, b = weights(trainable, eva.version.ref), weights(trainable, plain.version.ref)
    assert a.keys() == b.keys() and not all(torch.allclose(a[k], b[k]) for k in a if "lora_A" in k)
    assert eva.evaluations[0]["new_loss"] < eva.evaluations[0]["parent_loss"]


def test_variant_flags_are_refused_with_one_error_line(trainable, sqlite_url, store_dir):
    run = cli_invoker(sqlite_url, store_dir)
    bad = run("train", "x", "--base", "tiny", "--data", "words@1", "--init", "lottery", ok=False)
    assert bad.exit_code != 0 and bad.stderr.startswith("error:") and "lottery" in bad.stderr
    with pytest.raises(InvalidTrainConfig, match="--init must be one of"):
        TrainConfig(adapter="x", data="d@1", init="lottery")
    train(trainable, adapter="w", base="tiny", data="words@1", steps=2)
    with pytest.raises(InvalidTrainConfig, match="--init pissa moves the base's principal directions"):
        train(trainable, adapter="fresh", base="tiny", data="numbers@1", replay_from=["words@1"], init="pissa", steps=2)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_pissa_folder_is_converted_on_import_and_refused_raw(trainable, tiny_base, tmp_path, sqlite_url, store_dir, init):
    """PEFT saves PiSSA/OLoRA factors relative to the base it changed; PEFT itself reloads them
    by changing the base again. Imported, they become the plain LoRA that gives the same
    outputs over the real base; the raw folder is refused by the registry's own import."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    from portfolio.errors import InvalidAdapter
    from portfolio.export import export_version

    torch.manual_seed(5)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "raw")  # as trained, no conversion
    ids = torch.randint(0, 1000, (2, 10))
    peft_reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), tmp_path / "raw").eval()
    with pytest.raises(InvalidAdapter, match=f"init_lora_weights is '{init}'.*`portfolio adapter import` converts it"):
        trainable.import_adapter("raw", tmp_path / "raw", "tiny")
    out = cli_invoker(sqlite_url, store_dir)("adapter", "import", "conv", str(tmp_path / "raw"), "--base", "tiny")
    assert "converting to a plain LoRA of rank 8" in out.stderr and "imported conv@1" in out.stdout
    version = trainable.get_version("conv@1")
    assert version.rank == 8 and version.lora_config["init_lora_weights"] is True
    plain = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base),
                                      export_version(trainable, "conv@1", tmp_path / "export", card=False)).eval()
    assert torch.allclose(_logits(plain, ids), _logits(peft_reloaded, ids), atol=1e-4)


@pytest.mark.parametrize("settings", [{"use_dora": True}, {"init": "pissa", "replay_ratio": 0.0}, {"init": "eva"}],
                         ids=["dora", "pissa", "eva"])
def test_an_interrupted_variant_run_resumes_to_the_same_weights(trainable, settings):
    a, b = straight_and_resumed(trainable, base="tiny", data="words@1", steps=8, seed=3, rank=4, checkpoint_every=2, **settings)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
