"""Reading chat-format JSON Lines sources, with errors that name the file and line.

One example per line: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``.
Other fields (``choices``, ``answer_index``, ``targets``, ``id``, ``source``, ...) are kept as they are.
For vision-language models a ``content`` may be a list of parts (``{"type": "image"}``,
``{"type": "text", "text": str}``) with the image files in ``images`` (``merit.data.vision``); their paths
come back absolute.
"""

from __future__ import annotations

import json
from pathlib import Path

from merit.errors import DataError

ROLES = ("system", "user", "assistant")


def read_examples(path: str | Path, limit: int | None = None) -> list[dict]:
    """All examples of one JSONL file (the first ``limit`` if given), validated.

    Raises:
        DataError: missing file, a line that is not a JSON object, a malformed ``messages`` list,
            or an example with no assistant turn (nothing to train on) — naming ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            check_example(ex, where)
            if "images" in ex or any(not isinstance(m["content"], str) for m in ex["messages"]):
                from merit.data.vision import check_parts, resolve_images

                resolve_images(ex, path, where, check_parts(ex["messages"], where))
            examples.append(ex)
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise DataError(f"{path}: no examples (expected one JSON object per line)")
    return examples


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


def write_examples(path: str | Path, examples: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    tmp.replace(path)
