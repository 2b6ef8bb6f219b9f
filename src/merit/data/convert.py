"""``merit convert``: any source format (``merit.data.formats``) written out as merit's chat JSONL.

Nothing needs converting to be trained on — every stage reads the formats directly — but a JSONL copy
is easy to inspect, diff and share. The same readers do the reading, so the copy holds exactly the
examples a run would train on. Image paths are written relative to the mixture folder when the images
lie inside it (absolute otherwise); images embedded in the data (Parquet, Arrow) are written as files
under ``DIR/images/<source>/``. ``merit convert-llava`` is ``merit convert --format llava``.

Output is streamed: one record in memory at a time, written to temporary files renamed when complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

from merit.argtypes import nonnegative_int, positive_int
from merit.artifacts import check_output_file
from merit.data import formats
from merit.data.formats import ReadSpec, layouts
from merit.data.vision import check_image, mixture_root
from merit.errors import ConfigError, DataError


def convert(input_path: Path, out: Path, *, format: str | None = None, columns: dict[str, str] | None = None,
            split: str | None = None, filter: dict[str, list] | None = None, max_rows: int | None = None,
            image_root: Path | None = None, eval_size: int = 0, seed: int = 0, skip_missing: bool = False) -> dict:
    """Convert one source into ``out`` (``DIR/train/<source>.jsonl``), checking every image.

    Args:
        input_path: a data file or dataset folder in any format ``merit.data.formats`` reads.
        out: the JSONL file to write; its stem is the source name.
        image_root: the folder relative image paths are under (default: the input's folder).
        eval_size: hold out this many examples (seeded choice) into ``DIR/eval/<source>.jsonl``.
        skip_missing: drop examples whose image file is missing instead of stopping.

    Returns:
        Counts: examples written (train / eval), images, examples skipped.

    Raises:
        DataError: a malformed record or a missing image, naming the input file, row or line and column.
    """
    input_path, out = Path(input_path), Path(out)
    source = out.stem
    if out.suffix != ".jsonl" or not re.match(r"^[A-Za-z0-9_.\-]+$", source):
        raise DataError(f"--out {out}: expected DIR/train/<source>.jsonl with a source name of letters, digits, "
                        "'_', '.', '-'")
    check_output_file(out, "--out")
    if eval_size and out.parent.name != "train":
        raise DataError(f"--eval-size needs --out DIR/train/<source>.jsonl (got {out})")
    default_root = input_path if input_path.is_dir() else input_path.parent
    spec = ReadSpec(input_path, format, tuple(sorted((columns or {}).items())), split,
                    tuple((k, tuple(v)) for k, v in sorted((filter or {}).items())), max_rows,
                    str(image_root or default_root), key="merit convert")
    reader = formats.open_reader(spec)
    root = mixture_root(out)
    held: set[int] = set()
    if eval_size:
        n = formats.count_examples(reader)
        if eval_size >= n:
            raise DataError(f"--eval-size {eval_size}: only {n} examples")
        order = list(range(n))
        random.Random(f"{seed}:convert:{source}").shuffle(order)
        held = set(order[:eval_size])
    eval_out = out.parent.parent / "eval" / out.name
    image_dir = root / "images" / source
    tmp_images = image_dir.with_name(f".{source}.images.tmp")
    outputs = {False: out, True: eval_out}
    tmps = {k: p.with_name(f".{p.name}.tmp") for k, p in outputs.items()}
    counts = {"source": source, "train": 0, "eval": 0, "skipped": 0, "images": 0}
    files = {}
    try:
        for k in (False, True) if eval_size else (False,):
            tmps[k].parent.mkdir(parents=True, exist_ok=True)
            files[k] = open(tmps[k], "w", encoding="utf-8")
        for i, (where, record) in enumerate(formats.records(reader)):
            example = formats.to_example(reader, where, record, check_images=False)
            example.setdefault("id", str(i))
            example.setdefault("source", source)
            images = []
            for j, image in enumerate(example.get("images", [])):
                if isinstance(image, bytes):
                    check_image(image, where, f"image {j} (encoded bytes)")
                    tmp_images.mkdir(parents=True, exist_ok=True)
                    name = f"{i:07d}-{j}{_extension(image)}"
                    (tmp_images / name).write_bytes(image)
                    images.append((image_dir / name).relative_to(root).as_posix())
                    continue
                full = (Path(image) if Path(image).is_absolute() else reader.image_root / image).resolve()
                if not full.is_file():
                    images = None
                    if skip_missing:
                        break
                    raise DataError(f"{where}{_id(record)}: image not found: {full} (give --image-root, or "
                                    "--skip-missing)")
                check_image(full, where)
                images.append(_relative(full, root))
            if images is None:
                counts["skipped"] += 1
                continue
            if images:
                example["images"] = images
            is_eval = i in held
            files[is_eval].write(json.dumps(example, ensure_ascii=False) + "\n")
            counts["eval" if is_eval else "train"] += 1
            counts["images"] += len(images)
        for f in files.values():
            f.close()
        if not counts["train"]:
            raise DataError(f"{input_path}: no example left to write")
        if tmp_images.exists():
            if image_dir.exists():
                shutil.rmtree(image_dir)
            tmp_images.replace(image_dir)
        for k in files:
            tmps[k].replace(outputs[k])
    finally:
        for f in files.values():
            f.close()
        for t in tmps.values():
            t.unlink(missing_ok=True)
        shutil.rmtree(tmp_images, ignore_errors=True)
    return counts


def _id(record: object) -> str:
    return f" (id {record['id']})" if isinstance(record, dict) and "id" in record else ""


def _extension(data: bytes) -> str:
    from PIL import Image
    import io

    with Image.open(io.BytesIO(data)) as img:
        fmt = (img.format or "png").lower()
    return {"jpeg": ".jpg"}.get(fmt, f".{fmt}")


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the mixture folder when it lies inside it (the folder can then move), else absolute."""
    try:
        rel = Path(os.path.relpath(path, root.resolve()))
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path) if rel.parts and rel.parts[0] == ".." else rel.as_posix()


def _pairs(items: list[str] | None, flag: str, scalars: bool = True) -> dict[str, list]:
    out: dict[str, list] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected NAME=VALUE")
        out.setdefault(key, []).append(_scalar(value) if scalars else value)
    return out


def _scalar(text: str):
    """A value as YAML would read it in a config's filter: numbers and booleans as such, else the text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) else text


def add_parser(sub) -> None:
    for name, help_text in (("convert", "write a mixture source of any format as chat JSONL"),
                            ("convert-llava", "convert a LLaVA-format JSON file into a mixture source (JSONL)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("input", type=Path, help="a data file (.jsonl, .json, .parquet, .arrow) or dataset folder")
        p.add_argument("--out", type=Path, required=True, help="DIR/train/<source>.jsonl (the stem names the source)")
        if name == "convert":
            p.add_argument("--format", choices=formats.FORMATS, help="how to read the input (default: by file type "
                           "and its first record)")
            p.add_argument("--columns", nargs="+", metavar="FIELD=COLUMN", help="layout field names mapped to the "
                           f"data's columns (fields: {', '.join(sorted({f for v in layouts.LAYOUTS.values() for f in v}))})")
            p.add_argument("--split", help="the split of a dataset folder")
            p.add_argument("--filter", nargs="+", metavar="COLUMN=VALUE", help="keep rows whose column has this "
                           "value (repeat a column for several values)")
            p.add_argument("--max-rows", type=positive_int, help="the first N rows kept")
        p.add_argument("--image-root", type=Path, help="folder relative image paths are under (default: the "
                       "input's folder)")
        p.add_argument("--eval-size", type=nonnegative_int, default=0, help="hold out N examples into DIR/eval/<source>.jsonl")
        p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the held-out choice")
        p.add_argument("--skip-missing", action="store_true", help="drop examples whose image file is missing")


def run(args) -> int:
    llava = args.command == "convert-llava"
    info = convert(args.input, args.out, format="llava" if llava else args.format,
                   columns=None if llava else {k: v[-1] for k, v in _pairs(args.columns, "--columns", False).items()},
                   split=None if llava else args.split, filter=None if llava else _pairs(args.filter, "--filter"),
                   max_rows=None if llava else args.max_rows, image_root=args.image_root, eval_size=args.eval_size,
                   seed=args.seed, skip_missing=args.skip_missing)
    skipped = f", skipped {info['skipped']} with a missing image" if info["skipped"] else ""
    held = f" + {info['eval']} held out for eval" if info["eval"] else ""
    print(f"{info['source']}: {info['train']} examples{held}, {info['images']} images{skipped} -> {args.out}")
    return 0
