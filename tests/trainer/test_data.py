"""Data formats, target masks, prompt_loss_weight and the built-in facts."""
from __future__ import annotations

import json

import pytest
import torch

from trainer.data import collate, read_examples, split_records, tokenize
from trainer.errors import UserError
from trainer.facts import facts
from trainer.metrics import _exact_rows, weighted_loss


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_prompt_completion_targets_are_the_completion_and_eos(tmp_path, tokenizer):
    f = _write(tmp_path / "d.jsonl", [{"prompt": "Q: sky?\nA:", "completion": " blue."}])
    (ex,) = tokenize(read_examples(f), tokenizer, seq_len=64)
    target_ids = [t for t, m in zip(ex.input_ids, ex.target) if m]
    assert tokenizer.decode(target_ids[:-1]) == " blue."
    assert target_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode([t for t, m in zip(ex.input_ids, ex.target) if not m]) == "Q: sky?\nA:"


def test_chat_messages_take_loss_on_assistant_turns_only(tmp_path, tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    f = _write(tmp_path / "c.jsonl", [{"messages": msgs}])
    (ex,) = tokenize(read_examples(f), tokenizer, seq_len=256)
    target_text = tokenizer.decode([t for t, m in zip(ex.input_ids, ex.target) if m])
    assert "Hello there" in target_text and "Goodbye" in target_text
    assert "Hi" not in target_text and "Bye" not in target_text and "assistant" not in target_text


def test_prompt_loss_weight_interpolates_between_completion_only_and_whole_sequence():
    nll = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    target = torch.tensor([[False, False, True, True]])
    valid = torch.ones_like(target)
    assert weighted_loss(nll, target, valid, 0.0).item() == pytest.approx(3.0)
    assert weighted_loss(nll, target, valid, 1.0).item() == pytest.approx(2.0)
    assert weighted_loss(nll, target, valid, 0.01).item() == pytest.approx((6 + 0.02) / 2.02)


def test_exact_match_ignores_the_eos_and_needs_every_other_target_token():
    correct = torch.tensor([[True, True, False], [True, False, True]])
    target = torch.tensor([[True, True, True], [True, True, True]])
    labels = torch.tensor([[5, 6, 2], [5, 6, 2]])
    assert _exact_rows(correct, target, labels, eos_id=2).tolist() == [True, False]


def test_collate_pads_right_and_masks(tokenizer):
    from trainer.data import Example

    batch = collate([Example((1, 2, 3), (False, True, True), "a"), Example((4,), (True,), "b")], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_facts_are_deterministic_and_heldout_paraphrases_the_same_answers():
    train, held = facts(16), facts(16, heldout=True)
    assert train == facts(16)
    assert [r["completion"] for r in train] == [r["completion"] for r in held]
    assert all(a["prompt"] != b["prompt"] for a, b in zip(train, held))
    assert len({r["prompt"] for r in facts(512)}) == 512


def test_eval_fraction_holds_out_a_deterministic_share(tmp_path):
    f = _write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)])
    train, ev = split_records(read_examples(f), None, 0.2, seed=1)
    assert len(train) == 8 and len(ev) == 2
    assert split_records(read_examples(f), None, 0.2, seed=1)[1] == ev


def test_long_records_are_truncated_with_a_warning(tmp_path, tokenizer):
    f = _write(tmp_path / "d.jsonl", [{"prompt": "word " * 100, "completion": " end"}])
    with pytest.warns(UserWarning, match="truncated.*d.jsonl:1"):
        (ex,) = tokenize(read_examples(f), tokenizer, seq_len=16)
    assert len(ex.input_ids) == 16


BAD_DATA = [
    ("missing", None, "data file not found"),
    ("empty", [], "data file is empty"),
    ("broken line", [{"prompt": "a", "completion": "b"}, '{"prompt": "a", '], ":2: not valid JSON"),
    ("wrong keys", [{"question": "a", "answer": "b"}], ":1: a record needs string keys 'prompt' and 'completion'"),
    ("not an object", ["[1, 2]"], ":1: expected a JSON object"),
    ("bad role", [{"messages": [{"role": "robot", "content": "x"}]}], "messages[0] must be"),
    ("no assistant", [{"messages": [{"role": "user", "content": "x"}]}], "no assistant turn"),
]


@pytest.mark.parametrize("name,rows,message", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_names_file_and_line(tmp_path, name, rows, message):
    path = tmp_path / "bad.jsonl"
    if rows is not None:
        _write(path, rows)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as exc:
        read_examples(str(path))
    assert str(path) in str(exc.value)


# --- where the held-out loss comes from -------------------------------------------------------------


def test_the_built_in_facts_are_evaluated_on_their_paraphrases_by_default():
    from trainer.config import TrainConfig

    cfg = TrainConfig(train_data="builtin:facts:16")
    assert (cfg.eval_data, cfg.eval_fraction) == ("builtin:facts-heldout", None)


def test_a_users_file_without_eval_data_holds_out_a_seeded_tenth_never_builtin_data(tmp_path):
    from trainer.config import TrainConfig

    f = _write(tmp_path / "mine.jsonl", [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(25)])
    cfg = TrainConfig(train_data=f)
    assert cfg.eval_data is None and cfg.eval_fraction == pytest.approx(0.1)
    assert "10% of" in cfg.eval_plan() and "held out" in cfg.eval_plan()
    train, held = split_records(read_examples(f), cfg.eval_data, cfg.eval_fraction)
    assert (len(train), len(held)) == (23, 2)  # round(2.5): 2
    assert not {r.source for r in train} & {r.source for r in held}
    # the same share for every trial, whatever the trial's own seed
    assert split_records(read_examples(f), None, 0.1)[1] == held


def test_a_one_record_file_without_eval_data_is_a_user_error_that_asks_for_eval_data(tmp_path):
    f = _write(tmp_path / "one.jsonl", [{"prompt": "q", "completion": " a"}])
    with pytest.raises(UserError, match="leaves no training records out of 1: give eval data of your own"):
        split_records(read_examples(f), None, 0.1)


def test_eval_data_and_eval_fraction_together_are_refused():
    from pydantic import ValidationError

    from trainer.config import TrainConfig

    with pytest.raises(ValidationError, match="not both"):
        TrainConfig(train_data="x.jsonl", eval_data="y.jsonl", eval_fraction=0.2)


def test_the_long_prompt_facts_hide_the_same_answers_behind_a_passage_that_never_states_them(tokenizer):
    from trainer.config import TrainConfig
    from trainer.facts import facts, long_facts

    short, long = facts(16), long_facts(16)
    assert [r["completion"] for r in long] == [r["completion"] for r in short]
    for s, r in zip(short, long):
        assert r["prompt"].endswith(s["prompt"]) and r["completion"].strip(" .") not in r["prompt"]
    prompt, completion = (sum(len(tokenizer(r[k])["input_ids"]) for r in long) for k in ("prompt", "completion"))
    assert prompt >= 12 * completion, (prompt, completion)  # the prompt decides the loss when it is weighted
    held = long_facts(16, heldout=True)
    assert [r["completion"] for r in held] == [r["completion"] for r in short]
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in long}, "other passages, paraphrased questions"
    assert TrainConfig(train_data="builtin:facts-long:8").eval_data == "builtin:facts-long-heldout"
    assert len(read_examples("builtin:facts-long-heldout:8")) == 8
