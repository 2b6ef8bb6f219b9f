"""Reading chat JSONL with file:line errors, and assistant-only loss masks."""

from __future__ import annotations

import re

import pytest

from merit.data.chat import IGNORE, tokenize_conversation
from merit.data.jsonl import read_examples
from merit.errors import DataError

from conftest import chat, write_jsonl


def test_read_examples_keeps_extra_fields(tmp_path):
    row = dict(chat("q", "a"), choices=["a", "b"], answer_index=0, targets=["a"], id="x-1", source="x")
    p = write_jsonl(tmp_path / "x.jsonl", [row])
    assert read_examples(p) == [row]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [', "x.jsonl:2: not valid JSON"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "x.jsonl:2: no assistant turn"),
        ('{"messages": [{"role": "robot", "content": "q"}]}', "x.jsonl:2: messages[0] must be"),
        ('[1, 2]', "x.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    p = tmp_path / "x.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                 + line + "\n")
    with pytest.raises(DataError, match=re.escape(message)):
        read_examples(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_examples(tmp_path / "nope.jsonl")


def test_assistant_mask_covers_exactly_the_assistant_turns(tiny_checkpoint):
    from merit.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint)
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "HELLO"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "WORLD"},
    ]
    t = tokenize_conversation(tok, msgs, max_length=512)
    kept = [i for i, x in zip(t.input_ids, t.labels) if x != IGNORE]
    text = tok.decode(kept)
    # Both assistant answers with their end-of-turn tokens, and nothing of the prompts.
    assert text.replace("\n", "") == "HELLO<|im_end|>WORLD<|im_end|>"
    assert all(x == IGNORE or x == i for i, x in zip(t.input_ids, t.labels))
    assert not t.truncated


def test_truncation_cuts_the_end_and_reports_it(tiny_checkpoint):
    from merit.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint)
    t = tokenize_conversation(tok, chat("x" * 50, "y" * 50)["messages"], max_length=20)
    assert t.truncated and len(t.input_ids) == 20 and t.loss_tokens == 0
