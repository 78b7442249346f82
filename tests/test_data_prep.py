"""Tokenising, held-out splits, the replay reservoir and the data schedule."""

import pytest
from transformers import AutoTokenizer

from portfolio.data.formats import row_sha
from portfolio.data.replay import replay_counts, reservoir_sample
from portfolio.data.splits import is_heldout, split_rows
from portfolio.data.tokenize import IGNORE, MIN_TAIL, encode_rows
from portfolio.training.config import TrainConfig, get_lr
from portfolio.training.loop import make_schedule


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def stored(records):
    return [{"row": i, "sha": row_sha(r), "data": r} for i, r in enumerate(records)]


def test_text_is_packed_into_full_blocks(tok):
    rows = stored([{"text": "word " * 50}, {"text": "other " * 50}])
    examples = encode_rows(rows, "text", tok, seq_len=32)
    assert all(len(e.input_ids) == 32 for e in examples[:-1])
    total = sum(len(tok(r["data"]["text"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    assert total - MIN_TAIL < sum(len(e.input_ids) for e in examples) <= total  # only a short tail may be dropped
    assert examples[0].labels == examples[0].input_ids
    assert {r for e in examples for _, r in e.rows} == {0, 1}


def test_prompt_completion_puts_loss_on_the_answer_only(tok):
    [example] = encode_rows(stored([{"prompt": "What is 2+2?", "completion": "Four."}]), "prompt_completion", tok, 256)
    trained = tok.decode([t for t in example.labels if t != IGNORE])
    assert "Four." in trained and "2+2" not in trained
    assert "2+2" in tok.decode(example.input_ids)


def test_a_row_longer_than_seq_len_keeps_its_answer_and_loses_the_prompt_start(tok):
    long = {"prompt": "Passage: " + "the river runs north " * 40 + "Question: does it run north?", "completion": "True"}
    short = {"prompt": "Is it?", "completion": "False"}
    whole = encode_rows(stored([long]), "prompt_completion", tok, 4096)[0]
    cut, kept = encode_rows(stored([long, short]), "prompt_completion", tok, 48)
    assert len(whole.input_ids) > 48 and len(cut.input_ids) == 48 and cut.cut and not whole.cut
    # the window ends where the whole row's answer ends: the same answer tokens, trained
    assert [t for t in cut.labels if t != IGNORE] == [t for t in whole.labels if t != IGNORE]
    assert cut.input_ids == whole.input_ids[len(whole.input_ids) - len(cut.input_ids) - _after_answer(whole):][:48]
    assert "True" in tok.decode([t for t in cut.labels if t != IGNORE]) and "Question: does it run north?" in tok.decode(cut.input_ids)
    # a row that fits is untouched
    assert not kept.cut and kept.input_ids == encode_rows(stored([short]), "prompt_completion", tok, 4096)[0].input_ids


def _after_answer(example) -> int:
    """Tokens after the last trained one (a template's trailing newline, if any)."""
    last = max(i for i, t in enumerate(example.labels) if t != IGNORE)
    return len(example.labels) - 1 - last


def test_chat_messages_train_every_assistant_turn_and_nothing_else(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye now"},
    ]
    [example] = encode_rows(stored([{"messages": messages}]), "messages", tok, 512)
    trained = tok.decode([t for t in example.labels if t != IGNORE])
    assert "Hello there" in trained and "Goodbye now" in trained
    assert "Be brief" not in trained and "Bye" not in trained.replace("Goodbye", "")


def test_held_out_split_is_fixed_by_row_content():
    rows = stored([{"text": f"row {i}"} for i in range(200)])
    train, held = split_rows(rows)
    assert 5 < len(held) < 40 and len(train) + len(held) == 200
    again = split_rows(list(reversed(rows)))[1]
    assert {r["sha"] for r in again} == {r["sha"] for r in held}
    assert all(is_heldout(r["sha"]) for r in held)


def test_tiny_snapshot_still_holds_one_row_out():
    train, held = split_rows(stored([{"text": "a"}, {"text": "b"}]))
    assert len(held) == 1 and len(train) == 1


def test_reservoir_is_seeded_and_uniformish():
    assert reservoir_sample(range(1000), 10, seed=1) == reservoir_sample(range(1000), 10, seed=1)
    assert reservoir_sample(range(1000), 10, seed=1) != reservoir_sample(range(1000), 10, seed=2)
    assert reservoir_sample(range(5), 10, seed=0) == [0, 1, 2, 3, 4]
    hits = sum(x >= 500 for s in range(200) for x in reservoir_sample(range(1000), 10, seed=s))
    assert 800 < hits < 1200  # about half of 2000 draws from the second half


@pytest.mark.parametrize("ratio, batch, steps", [(0.05, 8, 100), (0.25, 4, 10), (0.5, 8, 7), (0.0, 8, 5)])
def test_replay_counts_hit_the_ratio_exactly(ratio, batch, steps):
    counts = list(replay_counts(steps, batch, ratio))
    assert sum(counts) == int(ratio * batch * steps + 1e-9)
    assert all(0 <= c < batch for c in counts)


def test_schedule_depends_on_the_seed_only():
    cfg = TrainConfig(adapter="a", data="d@1", steps=20, batch_size=4, replay_ratio=0.25)
    one, two = make_schedule(30, 10, cfg), make_schedule(30, 10, cfg)
    assert one.batches == two.batches and one.steps == 20
    assert all(len(f) + len(r) == 4 for f, r in one.batches)
    other = make_schedule(30, 10, TrainConfig(adapter="a", data="d@1", steps=20, batch_size=4, replay_ratio=0.25, seed=1))
    assert other.batches != one.batches


def test_epochs_set_the_number_of_steps():
    cfg = TrainConfig(adapter="a", data="d@1", epochs=2.0, batch_size=4, replay_ratio=0.0)
    assert make_schedule(40, 0, cfg).steps == 20


def test_lr_warms_up_then_decays_to_the_floor():
    lrs = [get_lr(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
