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
@click.option("--grad-accum", type=int, default=1, show_default=True,
              help="Forward passes accumulated per optimiser step (effective batch = batch size × this).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="The base's weights while training (auto: bfloat16 on a GPU that has it, else float32); the adapter stays float32.")
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
          targets, use_rslora, use_dora, init, steps, epochs, lr, batch_size, grad_accum, dtype, gradient_checkpointing, stages, seq_len, seed, device, checkpoint_every,
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
            use_rslora=use_rslora or None, use_dora=use_dora or None, init=init, steps=steps,
            epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, dtype=dtype,
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
