"""Rows -> token examples for causal-LM training and evaluation.

- ``text`` rows are packed: every row's tokens plus EOS go into one stream, cut into
  ``seq_len`` blocks, so no position is padding (only a short tail block can be).
- ``prompt_completion`` and chat ``messages`` rows go through the base's chat template, one
  example per row, with the loss on the assistant tokens only (labels -100 elsewhere).

Each example remembers which (source, row id) pairs it holds, so the exact rows a training
run used can be recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from portfolio.errors import InvalidDataset

IGNORE = -100
MIN_TAIL = 16  # a packed tail shorter than this is dropped, unless it is all there is


@dataclass
class Example:
    """One training/evaluation sequence."""

    input_ids: list[int]
    labels: list[int]
    rows: list[tuple[int, int]] = field(default_factory=list)  # (source index, row id)
    cut: bool = False  # a row longer than seq_len whose prompt's start was cut to keep its answer

    @property
    def n_targets(self) -> int:
        """Positions that carry a loss (labels shifted by one, as in causal LM)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def _pack_text(rows: list[dict[str, Any]], source: int, tokenizer: Any, seq_len: int) -> list[Example]:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    owners: list[int] = []
    for row in rows:
        ids = tokenizer(row["data"]["text"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        stream.extend(ids)
        owners.extend([row["row"]] * len(ids))
    examples = []
    for start in range(0, len(stream), seq_len):
        block = stream[start : start + seq_len]
        if len(block) < MIN_TAIL and examples:
            break
        rows_in = sorted(set(owners[start : start + seq_len]))
        examples.append(Example(block, list(block), [(source, r) for r in rows_in]))
    return examples


def _chat(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _chat_example(messages: list[dict[str, str]], tokenizer: Any, seq_len: int) -> tuple[list[int], list[int], bool]:
    """Token ids and labels (the assistant's tokens; -100 elsewhere) of one conversation in
    at most ``seq_len`` tokens, and whether its start was cut to keep the last answer."""
    ids = _chat(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # the assistant's tokens are what the template adds between the prompt for this
        # turn and the conversation including it
        start = len(_chat(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_chat(tokenizer, messages[: i + 1]))
        labels[start:end] = ids[start:end]
    end = next((i + 1 for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE), 0)  # past the last answer
    if end > seq_len:
        # the answer lies past seq_len: keep the window that ends with it, so the row still
        # teaches its answer (cutting the end would keep a prompt without one, and the row
        # would be dropped for want of targets)
        return ids[end - seq_len : end], labels[end - seq_len : end], True
    return ids[:seq_len], labels[:seq_len], False


def encode_rows(rows: list[dict[str, Any]], fmt: str, tokenizer: Any, seq_len: int, source: int = 0,
                pack: bool = True) -> list[Example]:
    """Tokenise a snapshot's rows (stored form ``{"row", "sha", "data"}``) into examples.
    ``pack=False`` keeps one example per text row (truncated to ``seq_len``), so that each
    row's score stands alone (the retention set compares models row by row)."""
    if not rows:
        return []
    if fmt == "text" and pack:
        return _pack_text(rows, source, tokenizer, seq_len)
    if fmt == "text":
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        out = []
        for row in rows:
            ids = (tokenizer(row["data"]["text"], add_special_tokens=False)["input_ids"] + eos)[:seq_len]
            if len(ids) >= 2:
                out.append(Example(ids, list(ids), [(source, row["row"])]))
        return out
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidDataset(
            f"{fmt} rows need a chat template, and this base's tokenizer has none; use text rows or a chat model"
        )
    examples = []
    for row in rows:
        data = row["data"]
        messages = data["messages"] if fmt == "messages" else [
            {"role": "user", "content": data["prompt"]},
            {"role": "assistant", "content": data["completion"]},
        ]
        ids, labels, cut = _chat_example(messages, tokenizer, seq_len)
        example = Example(ids, labels, [(source, row["row"])], cut)
        if example.n_targets:
            examples.append(example)
    return examples


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation with the assistant's turn opened (without a chat template:
    the messages' contents, one per line)."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(enc["input_ids"])
    return list(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of prompts left-padded to the longest, as generation with
    the KV cache wants them (every row's last token at the same position)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of examples into ``input_ids``, ``attention_mask``, ``labels``."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def shifted_labels(labels: Any) -> Any:
    """Labels moved one position left (position t scores token t+1), ignored at the end.
    Shifting the labels rather than slicing the logits avoids copying a [B, T, vocab] tensor."""
    import torch.nn.functional as F

    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)
