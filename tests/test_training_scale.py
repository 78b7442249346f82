"""Training settings for scale on the tiny model: gradient accumulation equals one big batch,
the base's weights in bfloat16 with a float32 adapter, gradient checkpointing keeping fewer
activations, each recorded on the run and the lineage and resumable."""

import pytest
import torch

from portfolio.data.tokenize import Example
from portfolio.training.config import TrainConfig
from portfolio.training.loop import accumulate_gradients
from tests.test_training import FAST, assert_trained_alike, quiet, train, weights


def test_accumulated_steps_equal_one_big_batch(trainable):
    # with replay and KL too: every term weighted by its share of the step's positions
    start = train(trainable, adapter="w", base="tiny", data="words@1", steps=6)
    big = train(trainable, adapter="big", data="numbers@1", from_ref="w@1", replay_ratio=0.25, steps=6, batch_size=8)
    small = train(trainable, adapter="acc", data="numbers@1", from_ref="w@1", replay_ratio=0.25, steps=6, batch_size=2, grad_accum=4)
    a, b = weights(trainable, big.version.ref), weights(trainable, small.version.ref)
    assert_trained_alike(a, b, weights(trainable, start.version.ref))
    assert big.metrics["loss_curve"] == pytest.approx(small.metrics["loss_curve"], abs=1e-4)
    # the same data: the same rows trained on and replayed
    assert [(d.snapshot, d.role, d.row_ids) for d in trainable.lineage(big.version.ref).data] == \
           [(d.snapshot, d.role, d.row_ids) for d in trainable.lineage(small.version.ref).data]
    recipe = trainable.lineage(small.version.ref).parents[0].recipe
    assert recipe["batch"] == 8 and recipe["grad_accum"] == 4
    assert trainable.runs.get(small.run_id).config["grad_accum"] == 4


def test_micro_batches_weight_their_losses_by_scored_positions():
    """Uneven rows: the accumulated gradient is the big batch's mean, not a mean of means."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.inner(input_ids)})()

    net = Wrapped()
    examples = [Example(list(range(1, n + 1)), list(range(1, n + 1))) for n in (3, 9, 4, 12)]
    grads = []
    for batch_size in (4, 1, 3):
        net.zero_grad()
        cfg = TrainConfig(adapter="x", data="d@1", batch_size=batch_size, replay_ratio=0.0)
        accumulate_gradients(net, examples, 0, cfg, 0, "cpu", torch.autocast("cpu", enabled=False), None)
        grads.append([p.grad.clone() for p in net.parameters()])
    for other in grads[1:]:
        assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(grads[0], other))


def test_bfloat16_base_weights_with_a_float32_adapter(trainable):
    out = train(trainable, adapter="bf", base="tiny", data="words@1", steps=4, dtype="bfloat16")
    w = weights(trainable, out.version.ref)
    assert all(t.dtype == torch.float32 for t in w.values())  # the adapter is stored in float32
    assert trainable.runs.get(out.run_id).config["dtype"] == "bfloat16"
    assert out.metrics["loss_curve"][-1] < out.metrics["loss_curve"][0]
    from portfolio.training.config import InvalidTrainConfig

    with pytest.raises(InvalidTrainConfig, match="--dtype must be one of"):
        TrainConfig(adapter="x", data="d@1", dtype="float8")
    with pytest.raises(InvalidTrainConfig, match="--grad-accum must be at least 1"):
        TrainConfig(adapter="x", data="d@1", grad_accum=0)


def test_gradient_checkpointing_keeps_fewer_activations_and_the_same_gradients(tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from portfolio.training.model import enable_checkpointing

    def saved_tensors_and_grads(checkpointing: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM.from_pretrained(tiny_base)
        if checkpointing:
            enable_checkpointing(model)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).train()
        ids = torch.randint(0, 1000, (4, 64))
        saved = [0]

        def pack(t):
            saved[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return saved[0], {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, g1 = saved_tensors_and_grads(False)
    checkpointed, g2 = saved_tensors_and_grads(True)
    # tensors autograd keeps for the backward pass (measured: 72 -> 12; by bytes the tiny
    # model's 49k-vocabulary logits dominate both, which is why layers are counted)
    assert checkpointed < 0.5 * plain, (checkpointed, plain)
    assert all(torch.allclose(g1[k], g2[k], atol=1e-5) for k in g1)


def test_gradient_checkpointing_trains_and_resumes(trainable):
    out = train(trainable, adapter="gc", base="tiny", data="words@1", steps=4, gradient_checkpointing=True)
    assert trainable.runs.get(out.run_id).config["gradient_checkpointing"] is True
    assert out.metrics["loss_curve"][-1] < out.metrics["loss_curve"][0]


def test_an_interrupted_accumulating_checkpointed_run_resumes_to_the_same_weights(trainable):
    from portfolio.errors import InvalidState
    from portfolio.training.train import train_adapter

    settings = dict(base="tiny", data="words@1", steps=10, seed=2, batch_size=2, grad_accum=2, gradient_checkpointing=True)
    straight = train(trainable, adapter="s", **settings)

    def stop_at_6(step, _stats):
        if step == 6:
            raise KeyboardInterrupt

    cfg = TrainConfig(**{**FAST, "adapter": "r", **settings})
    with pytest.raises(InvalidState, match="--resume"):
        train_adapter(trainable, cfg, log=quiet, progress=False, on_step=stop_at_6)
    [run] = trainable.runs.list(adapter="r")
    resumed = train_adapter(trainable, resume=run.id, log=quiet, progress=False)  # the settings come from the run
    a, b = weights(trainable, straight.version.ref), weights(trainable, resumed.version.ref)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_train_cli_takes_the_scale_settings(trainable, sqlite_url, store_dir):
    import json

    from conftest import cli_invoker

    run = cli_invoker(sqlite_url, store_dir)
    out = run("train", "cli", "--base", "tiny", "--data", "words@1", "--steps", "3", "--batch-size", "2", "--grad-accum", "2",
              "--dtype", "bfloat16", "--gradient-checkpointing", "--seq-len", "32", "--no-progress")
    assert "3 steps of 4×32 (×2 accumulated)" in out.stderr and "registered cli@1" in out.stdout
    [latest] = [r for r in json.loads(run("runs", "--json").stdout) if r["adapter"] == "cli"]
    assert (latest["config"]["grad_accum"], latest["config"]["dtype"], latest["config"]["gradient_checkpointing"]) == (2, "bfloat16", True)
    bad = run("train", "cli", "--data", "words@1", "--grad-accum", "0", ok=False)
    assert bad.exit_code == 1 and bad.stderr.startswith("error: --grad-accum must be at least 1")


def test_rank_stabilised_lora_is_trained_stored_and_kept_by_a_warm_start(trainable):
    import json as _json
    import tempfile
    from pathlib import Path

    from portfolio.export import export_version
    from portfolio.training.config import InvalidTrainConfig

    rs = train(trainable, adapter="rs", base="tiny", data="words@1", steps=3, use_rslora=True, rank=16)
    folder = export_version(trainable, rs.version.ref, Path(tempfile.mkdtemp()) / "rs", card=False)
    assert _json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is True
    assert trainable.runs.get(rs.run_id).config["use_rslora"] is True
    child = train(trainable, adapter="rs", data="numbers@1", steps=3)  # from rs@1: the variant comes along
    folder = export_version(trainable, child.version.ref, Path(tempfile.mkdtemp()) / "c", card=False)
    assert _json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is True
    with pytest.raises(InvalidTrainConfig, match="--use-rslora: a warm start keeps rs@2's LoRA variant"):
        train(trainable, adapter="rs", data="numbers@1", steps=3, use_rslora=True)


def test_stages_parse_and_refuse_what_makes_no_sense():
    from portfolio.training.config import InvalidTrainConfig, parse_stages, stage_at

    assert parse_stages("top:4@0,top:12@200,all@400") == [(4, 0), (12, 200), (None, 400)]
    assert [stage_at(parse_stages("top:1@0,all@3"), s) for s in range(5)] == [0, 0, 0, 1, 1]
    for bad, message in (("top:4@5", "first stage must start at step 0"), ("top:4@0,top:2@9", "unfreeze more layers"),
                         ("top:2@0,all@0", "increasing steps"), ("bottom:2@0", "say top:N"), ("top:2", "LAYERS@STEP"),
                         ("all@0,top:3@5", "unfreeze more layers")):
        with pytest.raises(InvalidTrainConfig, match=message):
            TrainConfig(adapter="x", data="d@1", stages=bad)


def test_staged_unfreezing_trains_the_top_layers_first_and_resumes_in_its_stage(trainable):
    from portfolio.errors import InvalidState
    from portfolio.training.train import train_adapter

    # the tiny base has 2 decoder layers: layer 1 alone for 3 steps, then both
    out = train(trainable, adapter="st", base="tiny", data="words@1", steps=6, stages="top:1@0,all@3", seed=1)
    stored = weights(trainable, out.version.ref)
    start = train(trainable, adapter="init", base="tiny", data="words@1", steps=1, lr=1e-12, seed=1)  # ~the initial factors
    init = weights(trainable, start.version.ref)
    assert out.metrics["stage_starts"] == [0, 3]
    assert trainable.lineage(out.version.ref).parents == [] and trainable.runs.get(out.run_id).config["stages"] == "top:1@0,all@3"
    # both layers moved by the end; the bottom one only in the last 3 steps: less than the top one
    moved = {layer: max(float((stored[k] - init[k]).abs().max()) for k in stored if f"layers.{layer}." in k and "lora_B" in k)
             for layer in (0, 1)}
    assert moved[0] > 0 and moved[1] > moved[0]

    def stop_at_4(step, _):
        if step == 4:
            raise KeyboardInterrupt

    cfg = TrainConfig(**{**FAST, "adapter": "st2", "base": "tiny", "data": "words@1", "steps": 6, "stages": "top:1@0,all@3",
                         "seed": 1, "checkpoint_every": 2})
    with pytest.raises(InvalidState):
        train_adapter(trainable, cfg, log=quiet, progress=False, on_step=stop_at_4)
    [run] = trainable.runs.list(adapter="st2")
    resumed = train_adapter(trainable, resume=run.id, log=quiet, progress=False)  # lands in stage 2, at step 4
    again = train(trainable, adapter="st3", base="tiny", data="words@1", steps=6, stages="top:1@0,all@3", seed=1)
    a, b = weights(trainable, resumed.version.ref), weights(trainable, again.version.ref)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed.metrics["stage_starts"] == [0, 3]


def test_a_frozen_stage_gives_its_factors_no_gradient(tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from portfolio.training.loop import apply_stage

    model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    apply_stage(params, 1, model.config.num_hidden_layers)
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    top = model.config.num_hidden_layers - 1
    assert all((p.grad is not None) == (f"layers.{top}." in n) for n, p in params.items())


def test_a_bfloat16_run_is_scored_on_the_float32_base(trainable, monkeypatch):
    """Its stored evaluations are keyed like every float32 result, so they are computed so."""
    from portfolio.evaluation import evaluate

    seen = []
    real = evaluate.Scorer.__init__

    def spy(self, registry, model, *args, **kwargs):
        seen.append(next(model.parameters()).dtype)
        real(self, registry, model, *args, **kwargs)

    monkeypatch.setattr(evaluate.Scorer, "__init__", spy)
    train(trainable, adapter="w", base="tiny", data="words@1", steps=3)
    train(trainable, adapter="w", data="numbers@1", steps=3, dtype="bfloat16")  # with a parent and replay
    assert seen == [torch.float32, torch.float32]
