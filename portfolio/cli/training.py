"""`portfolio train`."""

from __future__ import annotations

import click

from portfolio.cli._base import _registry, _table, cli
from portfolio.training.config import DEFAULT_KL_WEIGHT, DEFAULT_RANK, DEFAULT_REPLAY_RATIO, DEVICES, INITS


@cli.command()
@click.argument("adapter", required=False)
@click.option("--base", default=None, help="Base model (needed for a new adapter).")
@click.option("--data", default=None, metavar="NAME@V", help="Snapshot to train on.")
@click.option("--from", "from_ref", default=None, metavar="REF", help="Warm-start from this version (default: the adapter's latest active).")
@click.option("--replay-ratio", type=float, default=DEFAULT_REPLAY_RATIO, show_default=True, help="Share of each batch replayed from earlier snapshots, in [0, 1).")
@click.option("--replay-from", multiple=True, metavar="NAME@V", help="Replay these snapshots instead of the lineage's (repeatable).")
@click.option("--kl-weight", type=float, default=None, help=f"Weight of KL(parent ‖ new) on replay rows [{DEFAULT_KL_WEIGHT:g} when replaying].")
@click.option("--rank", type=int, default=None, help=f"LoRA rank [{DEFAULT_RANK}, or the parent's].")
@click.option("--alpha", type=float, default=None, help="LoRA alpha [2·rank, or the parent's].")
@click.option("--targets", default=None, metavar="A,B,...", help="Modules to adapt [q_proj,k_proj,v_proj,o_proj].")
@click.option("--steps", type=int, default=None, help="Optimiser steps (default: one epoch).")
@click.option("--epochs", type=float, default=None, help="Passes over the training split.")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate (warm-up, then cosine).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per forward pass.")
@click.option("--use-rslora", is_flag=True, default=None,
              help="Rank-stabilised LoRA: scale alpha/sqrt(rank) instead of alpha/rank (a new adapter; a warm start keeps its parent's).")
@click.option("--use-dora", is_flag=True, default=None,
              help="DoRA: a learned magnitude per output row beside the low-rank direction (a new adapter; serve with `portfolio serve`, "
                   "vLLM and llama.cpp have none).")
@click.option("--init", "init", type=click.Choice(INITS), default=None,
              help="How a new adapter's factors start (PEFT's): default, gaussian, pissa/olora (principal directions of the base; "
                   "stored converted to a plain LoRA of rank 2r), eva (principal directions of the data).")
@click.option("--orthogonal", type=float, default=0.0, metavar="λ",
              help="O-LoRA: keep the parent's factors frozen, train new ones (--rank, default the parent's task rank) with "
                   "λ·Σ‖A_old A_newᵀ‖² pulling them orthogonal; stored as the exact cat of both.")
@click.option("--grad-accum", type=int, default=1, show_default=True,
              help="Forward passes accumulated per optimiser step (effective batch = batch size × this).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="The base's weights while training (auto: bfloat16 on a GPU that has it, else float32); the adapter stays float32.")
@click.option("--quantize-base", type=click.Choice(["nf4", "int8"]), default=None,
              help="Quantise the base's linear layers with bitsandbytes while training (QLoRA; the adapter stays float32; "
                   "needs portfolio[qlora]).")
@click.option("--stages", default=None, metavar="SPEC",
              help='Staged unfreezing, e.g. "top:4@0,top:12@200,all@400": LoRA factors of the top N layers trainable from step S.')
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass: less memory, more time.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for init, data order and replay sampling.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--checkpoint-every", type=int, default=50, show_default=True, help="Steps between checkpoints.")
@click.option("--resume", type=int, default=None, metavar="RUN", help="Continue an interrupted run (other settings come from it).")
@click.option("--full-eval", is_flag=True, help="Score new and parent on every earlier snapshot's held-out split, not the retention set.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def train(ctx: click.Context, adapter: str | None, base, data, from_ref, replay_ratio, replay_from, kl_weight, rank, alpha,
          targets, use_rslora, use_dora, init, orthogonal, steps, epochs, lr, batch_size, grad_accum, dtype, quantize_base, gradient_checkpointing, stages, seq_len, seed, device, checkpoint_every,
          resume, full_eval, progress) -> None:
    """Train a new candidate version of ADAPTER on a snapshot, with replay against forgetting."""
    from portfolio.training.config import TrainConfig
    from portfolio.training.train import train_adapter

    cfg = None
    if resume is None:
        if not adapter or not data:
            raise click.UsageError("give ADAPTER and --data NAME@V (or --resume RUN)")
        cfg = TrainConfig(
            adapter=adapter, data=data, base=base, from_ref=from_ref, replay_ratio=replay_ratio, replay_from=list(replay_from),
            kl_weight=kl_weight, rank=rank, alpha=alpha, targets=targets.split(",") if targets else None,
            use_rslora=use_rslora or None, use_dora=use_dora or None, init=init, orthogonal=orthogonal, steps=steps,
            epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, dtype=dtype, quantize_base=quantize_base,
            gradient_checkpointing=gradient_checkpointing, stages=stages, seq_len=seq_len, seed=seed, device=device, checkpoint_every=checkpoint_every,
            full_eval=full_eval,
        )
    out = train_adapter(_registry(ctx), cfg, resume=resume, progress=progress, log=lambda m: click.echo(m, err=True))
    if out.version is None:  # a process other than rank 0 under torchrun: rank 0 reports
        return
    m = out.metrics
    click.echo(f"registered {out.version.ref} [candidate] from run {out.run_id}: {m['steps']} steps, final loss {m['final_loss']:.4f}, "
               f"{m['tokens_per_s']:.0f} tokens/s, {m['wall_s']:.1f} s")
    click.echo(_table([[e["snapshot"], f"{e['new_loss']:.4f}", f"{e['parent_loss']:.4f}", f"{e['new_loss'] - e['parent_loss']:+.4f}", e["n_tokens"]]
                       for e in out.evaluations], ["HELD-OUT", "NEW LOSS", f"{out.parent} LOSS", "CHANGE", "TOKENS"]))


@cli.command()
@click.argument("adapter")
@click.option("--data", default=None, metavar="NAME@V", help="Snapshot of the new data (not with --show).")
@click.option("--ranks", default="4,8,16,32", show_default=True, help="Ranks to try, comma-separated.")
@click.option("--variants", default="lora", show_default=True, help="LoRA variants to try: lora, rslora, dora (comma-separated).")
@click.option("--budget-steps", type=int, default=None, help="Steps per candidate (default: one epoch).")
@click.option("--base", default=None, help="Base model (needed for a new adapter).")
@click.option("--alias", default="production", show_default=True, help="The incumbent is the version behind this alias (else the base).")
@click.option("--promote", "promote_pick", is_flag=True, help="Send the pick through `promote` (all the gates, suites included).")
@click.option("--plot", "plot_path", default=None, metavar="FILE", help="Draw the gain-vs-forgetting front (.png or .html).")
@click.option("--show", "show_run", type=int, default=None, metavar="RUN", help="Show (and --plot) a finished tune run instead.")
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--progress/--no-progress", default=True, help="Show each candidate's progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.pass_context
def tune(ctx: click.Context, adapter, data, ranks, variants, budget_steps, base, alias, promote_pick, plot_path, show_run, lr,
         batch_size, seq_len, seed, device, progress, as_json) -> None:
    """Choose ADAPTER's rank (and LoRA variant) by evidence: one short candidate per setting,
    gain and forgetting against the incumbent, the smallest setting within noise of the best
    that passes the gates."""
    from portfolio.cli._base import _emit_json
    from portfolio.training.tune import stored_tune, tune_adapter

    reg = _registry(ctx)
    if show_run is not None:
        result = stored_tune(reg, show_run)
    elif not data:
        raise click.UsageError("give --data NAME@V (the new data to tune on), or --show RUN")
    else:
        outcome = tune_adapter(reg, adapter, data, ranks=ranks, variants=variants, budget_steps=budget_steps, base=base, alias=alias,
                               promote=promote_pick, device=device, progress=progress, log=lambda m: click.echo(m, err=True),
                               train_settings={"lr": lr, "batch_size": batch_size, "seq_len": seq_len, "seed": seed})
        result = outcome.to_dict()
    if plot_path:
        from portfolio.evaluation.report import plot_tune_front

        click.echo(f"wrote {plot_tune_front(result, plot_path)}", err=True)
    if as_json:
        return _emit_json(result)

    def pct(v, ci=None):
        return "" if v is None else f"{100 * v:+.2f}%" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")

    click.echo(f"tune run {result['run']}: {adapter} on {result['data']} against {result['incumbent']}")
    click.echo(_table([[c["setting"], c["ref"], f"{c['n_params']:,}", pct(c["gain"], c["gain_ci"]), pct(c["retention"], c["retention_ci"]),
                        "pass" if c["gates_passed"] else "refused", "yes" if c["within_noise"] else "no", "PICK" if c["picked"] else ""]
                       for c in result["candidates"]],
                      ["SETTING", "VERSION", "PARAMS", "GAIN [95% CI]", "RETENTION [95% CI]", "GATES", "NEAR BEST", ""]))
    click.echo(("pick: " + result["pick"] if result["pick"] else "no pick") + f" ({result['reason']})")
    if result.get("promoted"):
        p = result["promoted"]
        click.echo(f"promote {p['ref']} to {alias}: " + ("moved" if p["alias_moved"] else "refused by the gates (see `portfolio gates`)"))
