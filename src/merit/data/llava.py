"""Converting LLaVA-format conversations into merit's chat JSONL (``merit convert-llava``).

LLaVA's format (LLaVA-Instruct, Vision-FLAN's annotation files, ShareGPT4V, ...) is a JSON list of

    {"id": "...", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the man doing?"},
                       {"from": "gpt", "value": "He is ..."}, ...]}

``image`` (a path, or a list of paths) is relative to an image folder; each ``<image>`` marker in a turn
becomes an image part where it stands (LLaVA puts it at the start or end of the first human turn; an
example with an image and no marker gets the image before the first human turn's text). Examples without
``image`` become text-only examples. The output rows are

    {"id", "source", "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", ...}]},
                                  {"role": "assistant", "content": "He is ..."}], "images": ["..."]}

with image paths relative to the mixture folder when the images lie inside it, absolute otherwise.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from merit.artifacts import check_output_file
from merit.argtypes import nonnegative_int
from merit.data.jsonl import write_examples
from merit.data.vision import mixture_root
from merit.errors import DataError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MARKER = "<image>"


def read_records(path: Path) -> list[tuple[str, object]]:
    """A LLaVA file's records, each with where it is (``file: record i`` of a JSON list, ``file:line`` of
    JSON Lines)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); re-encode the file as UTF-8") \
            from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        return [(f"{path}: record {i}", r) for i, r in enumerate(records)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):  # JSON Lines: the error names the file's own line
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return out


def _content(value: str) -> str | list[dict]:
    """A turn's text with its ``<image>`` markers as image parts (a plain string when it has none)."""
    if MARKER not in value:
        return value
    parts: list[dict] = []
    pieces = value.split(MARKER)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
        piece = piece.strip("\n")  # the newline LLaVA puts between the marker and the question
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def convert_record(record: object, where: str, source: str, index: int) -> tuple[dict, list[str]]:
    """One LLaVA record as a merit example (image paths still as given) and its image paths."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise DataError(f"{where}: expected an object with a 'conversations' list")
    image = record.get("image")
    images = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where}: 'image' must be a path or a list of paths")
    messages = []
    for j, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversations[{j}] must be {{'from': ..., 'value': string}}")
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DataError(f"{where}: conversations[{j}].from {turn.get('from')!r}: expected one of "
                            f"{', '.join(sorted(ROLES))}")
        messages.append({"role": role, "content": _content(turn["value"])})
    markers = sum(1 for m in messages if isinstance(m["content"], list)
                  for p in m["content"] if p["type"] == "image")
    if images and markers == 0:  # no marker: the images go before the first human turn's text
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise DataError(f"{where}: an image but no human turn to put it in")
        text = [{"type": "text", "text": first["content"]}] if first["content"].strip() else []
        first["content"] = [{"type": "image"} for _ in images] + text
        markers = len(images)
    if markers != len(images):
        raise DataError(f"{where}: {markers} {MARKER} marker(s) but {len(images)} image(s)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no gpt turn; every example needs an answer to train on")
    example = {"id": str(record.get("id", index)), "source": source, "messages": messages}
    if images:
        example["images"] = list(images)
    return example, images


def convert(input_path: Path, out: Path, image_root: Path | None = None, eval_size: int = 0, seed: int = 0,
            skip_missing: bool = False) -> dict:
    """Convert a LLaVA file into ``out`` (``DIR/train/<source>.jsonl``), checking every image exists.

    Args:
        input_path: the LLaVA JSON (list) or JSON Lines file.
        out: the JSONL file to write; its stem is the source name.
        image_root: the folder LLaVA's ``image`` paths are relative to (default: the input's folder).
        eval_size: hold out this many examples (seeded shuffle) into ``DIR/eval/<source>.jsonl``.
        skip_missing: drop examples whose image is missing instead of stopping.

    Returns:
        Counts: examples written (train / eval), images, examples skipped.

    Raises:
        DataError: a malformed record or a missing image, naming the input file, record and image path.
    """
    input_path, out = Path(input_path), Path(out)
    image_root = Path(image_root) if image_root is not None else input_path.parent
    root = mixture_root(out)
    source = out.stem
    if out.suffix != ".jsonl" or not re.match(r"^[A-Za-z0-9_.\-]+$", source):
        raise DataError(f"--out {out}: expected DIR/train/<source>.jsonl with a source name of letters, digits, "
                        "'_', '.', '-'")
    check_output_file(out, "--out")
    rows, skipped = [], 0
    for i, (at, record) in enumerate(read_records(input_path)):
        where = at + (f" (id {record['id']})" if isinstance(record, dict) and "id" in record else "")
        example, images = convert_record(record, where, source, i)
        resolved = [(Path(p) if Path(p).is_absolute() else image_root / p).resolve() for p in images]
        missing = next((p for p in resolved if not p.is_file()), None)
        if missing is not None:
            if skip_missing:
                skipped += 1
                continue
            raise DataError(f"{where}: image not found: {missing} (give --image-root, or --skip-missing)")
        if images:
            example["images"] = [_relative(p, root) for p in resolved]
        rows.append(example)
    if not rows:
        raise DataError(f"{input_path}: no example left to write")
    held: list[dict] = []
    if eval_size:
        if out.parent.name != "train":
            raise DataError(f"--eval-size needs --out DIR/train/<source>.jsonl (got {out})")
        if eval_size >= len(rows):
            raise DataError(f"--eval-size {eval_size}: only {len(rows)} examples")
        order = list(range(len(rows)))
        random.Random(f"{seed}:llava:{source}").shuffle(order)
        held = [rows[i] for i in sorted(order[:eval_size])]
        rows = [rows[i] for i in sorted(order[eval_size:])]
        write_examples(out.parent.parent / "eval" / out.name, held)
    write_examples(out, rows)
    return {"source": source, "train": len(rows), "eval": len(held), "skipped": skipped,
            "images": sum(len(r.get("images", ())) for r in rows + held)}


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the mixture folder when it lies inside it (the folder can then move), else absolute."""
    try:
        rel = Path(os.path.relpath(path, root.resolve()))
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path) if rel.parts and rel.parts[0] == ".." else rel.as_posix()


def add_parser(sub) -> None:
    p = sub.add_parser("convert-llava", help="convert a LLaVA-format JSON file into a mixture source (JSONL)")
    p.add_argument("input", type=Path, help="LLaVA JSON list (or JSON Lines) with id / image / conversations")
    p.add_argument("--out", type=Path, required=True, help="DIR/train/<source>.jsonl (the stem names the source)")
    p.add_argument("--image-root", type=Path, help="folder the 'image' paths are relative to (default: the "
                   "input's folder)")
    p.add_argument("--eval-size", type=nonnegative_int, default=0, help="hold out N examples into DIR/eval/<source>.jsonl")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the held-out choice")
    p.add_argument("--skip-missing", action="store_true", help="drop examples whose image is missing")


def run(args) -> int:
    info = convert(args.input, args.out, args.image_root, args.eval_size, args.seed, args.skip_missing)
    skipped = f", skipped {info['skipped']} with a missing image" if info["skipped"] else ""
    held = f" + {info['eval']} held out for eval" if info["eval"] else ""
    print(f"{info['source']}: {info['train']} examples{held}, {info['images']} images{skipped} -> {args.out}")
    return 0
