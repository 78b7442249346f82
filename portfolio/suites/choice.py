"""Scoring a choice case's options from one pass over its prompt.

A case of ``k`` options is packed into one row: the prompt once, then every option after it,

    [ prompt p_1..p_P | option 1 | option 2 | ... | option k ]

with an attention mask that lets each option's tokens see the prompt and the earlier tokens of
their own option only (never another option), and position ids that restart at ``P`` for every
option — so each option is scored exactly as if it followed the prompt alone. The
log-probability of option ``j`` with tokens ``o_1..o_m`` is

    log p(o_1 | prompt) + Σ_{t=2..m} log p(o_t | prompt, o_1..o_{t-1})

where the first term is read at the prompt's last position (shared by every option) and the
others at the option's own positions. The prompt is read once instead of ``k`` times: a 14-way
case of a 180-token prompt and 2-token options is 208 tokens instead of 2,548.
"""

from __future__ import annotations

from dataclasses import dataclass

from portfolio import mixed_batch


@dataclass(frozen=True)
class PackedRow:
    """One case packed: token ids, position ids, which segment each token is in (0: the
    prompt, j: option j), and for each option the (predictor positions, target tokens)."""

    ids: list[int]
    positions: list[int]
    segments: list[int]
    spans: list[tuple[list[int], list[int]]]


def pack(prompt: list[int], options: list[list[int]]) -> PackedRow:
    """Pack one prompt and its options (each non-empty) into a row (see the module docstring)."""
    if not prompt or any(not o for o in options):
        raise ValueError("a choice case needs a non-empty prompt and non-empty options")
    n = len(prompt)
    ids, positions, segments, spans = list(prompt), list(range(n)), [0] * n, []
    for j, option in enumerate(options, start=1):
        start = len(ids)
        ids += option
        positions += range(n, n + len(option))
        segments += [j] * len(option)
        # o_1 is predicted at the prompt's last token, o_t (t > 1) at the option's own o_{t-1}
        spans.append(([n - 1] + list(range(start, start + len(option) - 1)), list(option)))
    return PackedRow(ids, positions, segments, spans)


def attention_mask(rows: list[PackedRow], width: int, dtype):
    """The additive 4-D mask ``[rows, 1, width, width]``: 0 where query i may see key j (j ≤ i,
    and j in the prompt or in i's own option), the dtype's minimum elsewhere. Padding sees
    only itself, so no softmax row is empty."""
    import torch

    allowed = torch.zeros((len(rows), width, width), dtype=torch.bool)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    for r, row in enumerate(rows):
        seg = torch.tensor(row.segments)
        n = len(row.ids)
        same = (seg[:, None] == seg[None, :]) | (seg[None, :] == 0)
        allowed[r, :n, :n] = same & causal[:n, :n]
        allowed[r, n:, n:] = torch.eye(width - n, dtype=torch.bool)
    mask = torch.zeros((len(rows), 1, width, width), dtype=dtype)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def score_packed(model, rows: list[PackedRow], pad_id: int, device, adapter_names: list[str] | None = None) -> list[list[float]]:
    """One forward pass over packed rows (right-padded); for each row, the summed
    log-probability of each option's tokens."""
    import torch

    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row.ids)] = torch.tensor(row.ids)
        positions[i, :len(row.ids)] = torch.tensor(row.positions)
    dtype = next(model.parameters()).dtype
    # only positions from the earliest prompt end on are scored: project just those onto the
    # vocabulary (the lm_head and its log-softmax over 49k tokens dominate otherwise)
    first = min(at[0] for row in rows for at, _ in row.spans)
    logits = mixed_batch.forward(model, adapter_names, input_ids=ids.to(device), position_ids=positions.to(device),
                                 attention_mask=attention_mask(rows, width, dtype).to(device), logits_to_keep=width - first).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for i, row in enumerate(rows):
        scores = []
        for at, targets in row.spans:
            picked = logp[i, torch.tensor(at, device=logp.device) - first, torch.tensor(targets, device=logp.device)]
            scores.append(float(picked.sum()))
        out.append(scores)
    return out


def score_separately(model, items: list[tuple[list[int], list[list[int]]]], pad_id: int, device,
                     adapter_names: list[str] | None = None, batch_size: int = 16) -> list[list[float]]:
    """The option-by-option scoring the packed scorer replaced (and is tested and benchmarked
    against): each option as its own ``prompt + option`` sequence, so the prompt is read once
    per option; sequences of similar length batched together."""
    import torch

    seqs = [(n, prompt + option, len(prompt)) for n, (prompt, options) in enumerate(items) for option in options]
    scores = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][1]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(seqs[i][1]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :len(seqs[i][1])] = torch.tensor(seqs[i][1])
            mask[row, :len(seqs[i][1])] = 1
        names = [adapter_names[seqs[i][0]] for i in idx] if adapter_names else None
        logp = torch.log_softmax(mixed_batch.forward(model, names, input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(),
                                 dim=-1)
        for row, i in enumerate(idx):
            _, seq, start = seqs[i]
            targets = torch.tensor(seq[start:], device=logp.device)
            scores[i] = float(logp[row, start - 1:len(seq) - 1].gather(1, targets[:, None]).sum())
    out: list[list[float]] = [[] for _ in items]
    for (n, _, _), score in zip(seqs, scores):
        out[n].append(score)
    return out
