"""Reading chat-format JSON Lines sources, with errors that name the file and line.

One example per line: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``.
Other fields (``choices``, ``answer_index``, ``targets``, ``id``, ``source``, ...) are kept as they are.
For vision-language models a ``content`` may be a list of parts (``{"type": "image"}``,
``{"type": "text", "text": str}``) with the image files in ``images`` (``merit.data.vision``); their paths
come back absolute.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from merit.data.formats.containers import decode_json_line, jsonl_lines
from merit.errors import DataError

ROLES = ("system", "user", "assistant")


def read_examples(path: str | Path, limit: int | None = None) -> list[dict]:
    """All examples of one JSONL file (the first ``limit`` if given), validated.

    Raises:
        DataError: missing file, a line that is not a JSON object, a malformed ``messages`` list,
            or an example with no assistant turn (nothing to train on) — naming ``file:line``.
    """
    examples = [ex for _, ex in iter_examples(path, limit)]
    if not examples:
        raise DataError(f"{path}: no examples (expected one JSON object per line)")
    return examples


def iter_examples(path: str | Path, limit: int | None = None, *, start: int = 0, end: int | None = None,
                  first_line: int = 1) -> Iterator[tuple[int, dict]]:
    """(line number, validated example) for each non-blank line, streamed: one line in memory at a time.

    ``start`` / ``end`` restrict the reading to a byte range that begins at a line start (``first_line``
    is that line's number, so errors still name the file's own line), as the token cache's shards do.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    count = 0
    for lineno, raw in jsonl_lines(path, start, end, first_line):
        yield lineno, parse_line(raw, path, f"{path}:{lineno}")
        count += 1
        if limit is not None and count >= limit:
            break


def parse_line(raw: bytes, path: Path, where: str) -> dict:
    """One JSONL line as a validated example (image paths made absolute)."""
    ex = decode_json_line(raw, where)
    check_example(ex, where)
    if "images" in ex or any(not isinstance(m["content"], str) for m in ex["messages"]):
        from merit.data.vision import check_parts, mixture_root, resolve_images

        resolve_images(ex, mixture_root(path), where, check_parts(ex["messages"], where))
    return ex


def count_examples(path: str | Path, limit: int | None = None) -> int:
    """The number of examples of a JSONL file (non-blank lines, at most ``limit``), without parsing them:
    what ``read_examples`` would return the length of for a valid file."""
    with open(path, "rb") as f:
        n = sum(1 for raw in f if raw.strip())
    return n if limit is None else min(n, limit)


def check_example(ex: object, where: str) -> None:
    if not isinstance(ex, dict):
        raise DataError(f"{where}: expected a JSON object with a 'messages' list")
    msgs = ex.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(msgs):
        # A list content (text and image parts) is checked in detail by merit.data.vision.check_parts.
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), (str, list)):
            raise DataError(
                f"{where}: messages[{i}] must be {{'role': one of {'/'.join(ROLES)}, 'content': string}}"
            )
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant turn; every example needs one (the loss is on assistant tokens)")
    check_answer_fields(ex, where)


def check_answer_fields(ex: dict, where: str) -> None:
    """The optional scoring fields, strictly: a wrong type would otherwise be ignored and the example
    silently scored another way (``targets`` as a string, an ``answer_index`` outside ``choices``)."""
    targets = ex.get("targets")
    if targets is not None and (not isinstance(targets, list) or not targets
                                or not all(isinstance(t, str) for t in targets)):
        raise DataError(f"{where}: 'targets' must be a non-empty list of strings (accepted answers), "
                        f"got {json.dumps(targets)[:60]}")
    choices, index = ex.get("choices"), ex.get("answer_index")
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                or not all(isinstance(c, str) for c in choices)):
        raise DataError(f"{where}: 'choices' must be a list of at least two strings")
    if index is not None:
        if choices is None:
            raise DataError(f"{where}: 'answer_index' needs a 'choices' list to index into")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(choices):
            raise DataError(f"{where}: 'answer_index' {json.dumps(index)} is not an index into 'choices' "
                            f"(0..{len(choices) - 1})")
    elif choices is not None:
        raise DataError(f"{where}: 'choices' without 'answer_index'; give the index of the right choice")


def write_examples(path: str | Path, examples: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    tmp.replace(path)
