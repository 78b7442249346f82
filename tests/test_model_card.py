"""Every export carries a model card: Hugging Face's YAML header with the base, the relation,
the datasets and their sha256; evaluations; the lineage in short."""

import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from portfolio.training.config import TrainConfig
from portfolio.training.train import train_adapter
from portfolio.export import export_version

FAST = dict(batch_size=4, seq_len=32, lr=2e-2, checkpoint_every=100)


def test_export_writes_a_model_card_peft_ignores(trainable, tiny_base, tmp_path):
    quiet = dict(log=lambda *_: None, progress=False)
    train_adapter(trainable, TrainConfig(**FAST, adapter="w", base="tiny", data="words@1", steps=3), **quiet)
    train_adapter(trainable, TrainConfig(**FAST, adapter="w", data="numbers@1", steps=3, replay_ratio=0.5), **quiet)
    out = export_version(trainable, "w@2", tmp_path / "w2")
    text = (out / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    header = yaml.safe_load(front)
    assert header["base_model"] == trainable.bases.get("tiny").model_id and header["base_model_relation"] == "adapter"
    assert header["library_name"] == "peft" and {"words@1", "numbers@1"} <= set(header["datasets"])
    data = {(d["snapshot"], d["role"], d["used_by"]): d for d in header["portfolio"]["data"]}
    assert data[("numbers@1", "train", "w@2")]["sha256"] == trainable.data.get("numbers@1").sha256
    assert data[("words@1", "train", "w@1")]["sha256"] == trainable.data.get("words@1").sha256
    assert header["portfolio"]["artifact_sha256"] == trainable.get_version("w@2").artifact_digest
    assert "# w@2" in body and "## Evaluations" in body and "| numbers@1 |" in body
    assert "w@2 ← w@1 (finetune) ← base tiny" in body
    # the folder still loads in PEFT, card and all
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
    # internal exports (serving, warm starts) skip the card
    assert not (export_version(trainable, "w@1", tmp_path / "w1", card=False) / "README.md").exists()
