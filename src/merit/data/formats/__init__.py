"""Mixture sources read in the formats they come in, streamed, as merit's chat examples.

A source is a file or a folder, read by a :class:`Reader`: a container (JSON Lines, JSON, Parquet, Arrow;
``containers``) holding records of one layout (chat, ShareGPT, LLaVA, Alpaca, The Cauldron; ``layouts``).
``format`` names either, the other comes from the files:

==============  ===============================================================================
format          what it reads
==============  ===============================================================================
``chat-jsonl``  merit's own JSONL (``{"messages": [...]}`` per line)
``parquet``     Parquet file(s), any layout (told by the columns)
``hf-dataset``  a ``datasets.save_to_disk`` folder (Dataset or DatasetDict) or a local Hub-layout folder
``sharegpt``    ``conversations`` of ``from`` / ``value`` turns, in any container
``alpaca``      ``instruction`` / ``input`` / ``output``, in any container
``llava``       ShareGPT with ``image`` paths and ``<image>`` markers, in any container
``cauldron``    ``texts`` (user / assistant pairs) with an ``images`` column of encoded images
==============  ===============================================================================

Without a ``format`` the container comes from the file type (a folder is ``hf-dataset``) and the layout
from the first record's fields. A source may be a slice of a larger dataset: ``split`` (of a DatasetDict
or a Hub-layout folder), ``filter`` (keep rows whose column has one of the given values) and ``max_rows``
(the first rows kept). Every example is validated as chat JSONL is (``merit.data.jsonl``), and errors
name the file, the line or row, and the column.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from merit.data.formats import containers, layouts
from merit.data.formats.containers import Shard
from merit.errors import ConfigError, DataError

FORMATS = ("chat-jsonl", "parquet", "hf-dataset", "sharegpt", "alpaca", "llava", "cauldron")
_LAYOUT_FORMATS = {"chat-jsonl": "chat", "sharegpt": "sharegpt", "alpaca": "alpaca", "llava": "llava",
                   "cauldron": "cauldron"}
EXTENSIONS = (".jsonl", ".json", ".parquet")  # a source file in a mixture folder (a folder: hf-dataset)


@dataclass(frozen=True)
class ReadSpec:
    """How to read one side (train or eval) of a source: the config's words, not yet checked."""

    path: Path
    format: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    split: str | None = None
    filter: tuple[tuple[str, tuple], ...] = ()
    max_rows: int | None = None
    image_root: str | None = None
    key: str = "mixture.sources[]"  # the config entry, for errors

    def settings(self) -> dict:
        """The reading settings that are not defaults (empty for plain chat JSONL): what a stage key and
        the mixture manifest record, so that every reading of the same bytes the same way has one key."""
        out = {"format": self.format, "columns": dict(self.columns) or None, "split": self.split,
               "filter": {k: list(v) for k, v in self.filter} or None, "max_rows": self.max_rows,
               "image_root": self.image_root}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_settings(cls, path: str | Path, settings: dict | None, key: str = "mixture.sources[]") -> ReadSpec:
        s = settings or {}
        return cls(Path(path), s.get("format"), tuple(sorted((s.get("columns") or {}).items())), s.get("split"),
                   tuple((k, tuple(v)) for k, v in sorted((s.get("filter") or {}).items())), s.get("max_rows"),
                   s.get("image_root"), key)


@dataclass(frozen=True)
class DataFile:
    path: Path
    container: str


@dataclass(frozen=True)
class Reader:
    """A source side resolved: its data files, the layout of their records, the column names used."""

    spec: ReadSpec
    layout: str
    files: tuple[DataFile, ...]
    cols: tuple[tuple[str, str], ...]
    image_root: Path
    filter: Filter | None = field(default=None)

    @property
    def path(self) -> Path:
        return self.spec.path

    @property
    def plain_jsonl(self) -> bool:
        """merit's own chat JSONL, read as it always was (no mapping, filter or slice)."""
        return self.layout == "chat" and all(f.container == "jsonl" for f in self.files) and not self.spec.settings()

    def describe(self) -> str:
        kinds = sorted({f.container for f in self.files})
        return f"{'/'.join(kinds)}, {self.layout} layout"


class Filter:
    """Keep a record when each named column holds one of the given values."""

    def __init__(self, conditions: tuple[tuple[str, tuple], ...]):
        self.conditions = conditions
        self.columns = tuple(c for c, _ in conditions)

    def __call__(self, record: object, where: str = "") -> bool:
        if not isinstance(record, dict):
            return False
        for column, values in self.conditions:
            if column not in record:
                raise DataError(f"{where or 'a record'}: no column {column!r} to filter on (columns: "
                                f"{', '.join(list(record)[:8])}); fix the source's filter")
            if record[column] not in values:
                return False
        return True

    def __eq__(self, other) -> bool:
        return isinstance(other, Filter) and other.conditions == self.conditions

    def __hash__(self) -> int:
        return hash(self.conditions)


# ------------------------------------------------------------------------------------------------- opening


def open_reader(spec: ReadSpec) -> Reader:
    """Resolve a source side: its files (a folder's split), its layout, its column names.

    Raises:
        DataError: no such file or folder, no data files, an unknown split, or records of no known
            layout — naming the path and the config entry.
        ConfigError: a ``columns`` key the layout does not have.
    """
    path = Path(spec.path)
    if spec.format is not None and spec.format not in FORMATS:
        raise ConfigError(f"{spec.key}.format: {spec.format!r} is not a format; known: {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if spec.split is not None and not path.is_dir():
        raise DataError(f"{path}: {spec.key} names split {spec.split!r}, but a file has no splits; splits are "
                        "for dataset folders (leave split / eval_split out)")
    files = _folder_files(spec) if path.is_dir() else (_file(path, spec),)
    if spec.format == "parquet" and any(f.container != "parquet" for f in files):
        raise DataError(f"{path}: {spec.key}.format is parquet but the file is not .parquet")
    if spec.format == "chat-jsonl" and any(f.container != "jsonl" for f in files):
        raise DataError(f"{path}: {spec.key}.format is chat-jsonl but the file is not JSON Lines (.jsonl)")
    layout = _LAYOUT_FORMATS.get(spec.format or "") or _sniff(files, spec)
    columns = dict(spec.columns)
    unknown = sorted(set(columns) - set(layouts.fields_of(layout)))
    if unknown:
        raise ConfigError(f"{spec.key}.columns: {unknown} are not fields of the {layout} layout; its fields: "
                          f"{', '.join(layouts.fields_of(layout))}")
    from merit.data.vision import mixture_root

    root = Path(spec.image_root).expanduser() if spec.image_root else mixture_root(path)
    return Reader(spec, layout, files, tuple(sorted(layouts.column_map(layout, columns).items())), root,
                  Filter(spec.filter) if spec.filter else None)


def _file(path: Path, spec: ReadSpec) -> DataFile:
    container = containers.container_of(path)
    if container == "json" and not containers.is_json_array(path):
        container = "jsonl"  # JSON Lines under a .json name
    if container is None:
        if spec.format in (None, "chat-jsonl"):  # merit has always read any file name as chat JSONL
            container = "jsonl"
        else:
            raise DataError(f"{path}: cannot tell the file type; use .jsonl, .json, .parquet or .arrow")
    return DataFile(path, container)


def _folder_files(spec: ReadSpec) -> tuple[DataFile, ...]:
    """A folder's data files for the split: a ``save_to_disk`` Dataset or DatasetDict, else a Hub-layout
    folder resolved with ``datasets``' own data-file patterns (``data/train-00000-of-00002.parquet``, ...)."""
    folder = Path(spec.path)
    if spec.format not in (None, "hf-dataset", "parquet", *_LAYOUT_FORMATS):
        raise DataError(f"{folder}: a folder is read as an hf-dataset (or Parquet files); {spec.key}.format is "
                        f"{spec.format}")
    if (folder / "dataset_dict.json").is_file():
        splits = _json(folder / "dataset_dict.json").get("splits") or sorted(
            p.name for p in folder.iterdir() if (p / "state.json").is_file())
        return _saved_dataset(folder / _pick_split(spec, splits, folder))
    if (folder / "state.json").is_file():
        state = _json(folder / "state.json")
        if spec.split is not None and state.get("_split") not in (None, spec.split):
            raise DataError(f"{folder}: a saved Dataset of split {state.get('_split')!r}, not {spec.key}.split "
                            f"{spec.split!r}")
        return _saved_dataset(folder)
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
        found = {k: list(v) for k, v in DataFilesDict.from_patterns(patterns, base_path=str(folder)).items()}
    except Exception as e:  # datasets raises EmptyDatasetError and friends
        raise DataError(f"{folder}: no data files found ({type(e).__name__}); expected a save_to_disk folder or "
                        "Hub-layout files such as data/train-00000-of-00001.parquet") from None
    split = _pick_split(spec, sorted(found), folder)
    out = []
    for f in found[split]:
        container = containers.container_of(Path(f))
        if container is None:
            raise DataError(f"{f}: data file type not read by merit; use .jsonl, .json, .parquet or .arrow")
        out.append(_file(Path(f), spec) if container == "json" else DataFile(Path(f), container))
    return tuple(out)


def _pick_split(spec: ReadSpec, splits: list[str], folder: Path) -> str:
    if spec.split is not None:
        if spec.split not in splits:
            raise DataError(f"{folder}: no split {spec.split!r} ({spec.key}.split); splits: {', '.join(splits)}")
        return spec.split
    if len(splits) == 1:
        return splits[0]
    if "train" in splits:
        return "train"
    how = "list it under mixture.sources with a split" if spec.key == "mixture" else f"say which with {spec.key}.split"
    raise DataError(f"{folder}: splits {', '.join(splits)}; {how}")


def _saved_dataset(folder: Path) -> tuple[DataFile, ...]:
    state = _json(folder / "state.json")
    names = [f["filename"] for f in state.get("_data_files", [])] or sorted(p.name for p in folder.glob("*.arrow"))
    if not names:
        raise DataError(f"{folder}: a saved Dataset without data files")
    return tuple(DataFile(folder / n, "arrow") for n in names)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None


def _sniff(files: tuple[DataFile, ...], spec: ReadSpec) -> str:
    """The layout of the first record (or the columns of a Parquet / Arrow file)."""
    first = files[0]
    names = containers.column_names(first.path, first.container)
    if names is not None:
        record: object = dict.fromkeys(names)
        where = f"{first.path}: columns"
    else:
        where, record = next(iter(containers.rows(first.path, first.container)), (str(first.path), None))
    layout = layouts.sniff(record)
    if layout is None and (first.container == "jsonl" or record is None):
        return "chat"  # merit's own JSONL: its checks then say what a line lacks
    if layout is None:
        shown = ", ".join(list(record)[:8]) if isinstance(record, dict) else type(record).__name__
        how = ("list it under mixture.sources with a format and columns" if spec.key == "mixture"
               else f"set {spec.key}.format and {spec.key}.columns")
        raise DataError(f"{where}: fields ({shown}) of no known layout (messages, conversations, instruction/"
                        f"output, texts); {how}")
    return layout


# ------------------------------------------------------------------------------------------------- reading


def examples(reader: Reader, limit: int | None = None) -> Iterator[tuple[str, dict]]:
    """(where, validated example) for each record kept (the filter, then ``max_rows`` / ``limit``), streamed."""
    cap = _cap(reader, limit)
    if cap == 0:
        return
    count = 0
    for f in reader.files:
        for where, example in _examples(reader, f):
            yield where, example
            count += 1
            if cap is not None and count >= cap:
                return


def shard_examples(reader: Reader, shard: Shard) -> Iterator[tuple[str, dict]]:
    """The kept examples of one shard (its end already cut at the limit by :func:`plan_shards`)."""
    f = reader.files[shard.file]
    yield from _examples(reader, f, shard.start, shard.end, shard.first, shard.first_line)


def _examples(reader: Reader, f: DataFile, start: int = 0, end: int | None = None, first: int | None = None,
              first_line: int = 1) -> Iterator[tuple[str, dict]]:
    from merit.data.jsonl import parse_line

    if reader.plain_jsonl:  # today's chat JSONL: the lines as they are
        for lineno, raw in containers.jsonl_lines(f.path, start, end, first or 1):
            yield f"{f.path}:{lineno}", parse_line(raw, f.path, f"{f.path}:{lineno}")
        return
    for where, record in _file_records(reader, f, start, end, first, first_line):
        yield where, to_example(reader, where, record)


def _file_records(reader: Reader, f: DataFile, start: int = 0, end: int | None = None, first: int | None = None,
                  first_line: int = 1) -> Iterator[tuple[str, object]]:
    for where, record in containers.rows(f.path, f.container, start, end, first, first_line):
        if reader.filter is None or reader.filter(record, where):
            yield where, record


def records(reader: Reader, limit: int | None = None) -> Iterator[tuple[str, object]]:
    """(where, record) of each record kept, as stored (not converted): what ``merit convert`` walks."""
    cap = _cap(reader, limit)
    count = 0
    for f in reader.files:
        for item in _file_records(reader, f):
            if cap is not None and count >= cap:
                return
            yield item
            count += 1


def to_example(reader: Reader, where: str, record: object, check_images: bool = True) -> dict:
    """One record as a validated chat example; image paths made absolute and every image checked
    (``check_images=False``: paths left as given, for a caller that checks them itself)."""
    from merit.data.jsonl import check_example

    example = layouts.to_example(reader.layout, record, where, dict(reader.cols))
    check_example(example, where)
    if "images" in example or any(not isinstance(m["content"], str) for m in example["messages"]):
        from merit.data.vision import check_parts, resolve_images

        parts = check_parts(example["messages"], where)
        if check_images:
            resolve_images(example, reader.image_root, where, parts)
        elif len(example.get("images", [])) != parts:
            raise DataError(f"{where}: {parts} image part(s) in 'messages' but {len(example.get('images', []))} "
                            "image(s)")
    return example


def _cap(reader: Reader, limit: int | None) -> int | None:
    caps = [c for c in (limit, reader.spec.max_rows) if c is not None]
    return min(caps) if caps else None


def read_examples(reader: Reader, limit: int | None = None) -> list[dict]:
    """All kept examples of a source side, in memory (evaluation's held-out sets, a plan's sample)."""
    out = [ex for _, ex in examples(reader, limit)]
    if not out:
        raise DataError(f"{reader.path}: no examples ({reader.describe()})")
    return out


def plan_shards(reader: Reader, limit: int | None = None, shard_bytes: int | None = None) -> list[Shard]:
    """The shards the token cache tokenizes: each file cut into parts of about ``shard_bytes``, the last
    one ending at the ``limit``-th (or ``max_rows``-th) kept record."""
    cap = _cap(reader, limit)
    parts, kept = [], 0
    for i, f in enumerate(reader.files):
        if cap is not None and kept >= cap:
            break
        found, n = containers.plan(f.path, f.container, i, reader.filter, None if cap is None else cap - kept,
                                   shard_bytes or containers.SHARD_BYTES)
        parts += found
        kept += n
    return [Shard(j, len(parts), *p) for j, p in enumerate(parts)]


def count_examples(reader: Reader, limit: int | None = None) -> int:
    """How many examples a source side has (kept, capped) without validating them: line counts for
    JSON Lines, row counts for Parquet and Arrow (a filter reads the columns it tests)."""
    cap = _cap(reader, limit)
    kept = 0
    for f in reader.files:
        if cap is not None and kept >= cap:
            break
        kept += containers.plan(f.path, f.container, 0, reader.filter, None if cap is None else cap - kept,
                                1 << 62)[1]
    return kept


def content_sha256(path: Path) -> str:
    """The sha256 of a source's bytes: the file's, or for a folder of every data file under it (names
    and contents, in name order; hidden files and datasets' cache files left out)."""
    from merit.artifacts import file_sha256

    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts) or f.name.startswith("cache-"):
            continue
        h.update(f"{rel}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def source_path(folder: Path, name: str) -> Path | None:
    """The data of source ``name`` in a mixture's ``train/`` or ``eval/`` folder: ``<name>.jsonl``,
    ``.json``, ``.parquet`` or a ``<name>/`` dataset folder; None when absent."""
    found = [folder / f"{name}{ext}" for ext in EXTENSIONS if (folder / f"{name}{ext}").is_file()]
    if (folder / name).is_dir():
        found.append(folder / name)
    if len(found) > 1:
        raise DataError(f"{folder}: source {name!r} is there more than once ({', '.join(p.name for p in found)}); "
                        "keep one")
    return found[0] if found else None


def source_names(folder: Path) -> list[str]:
    """The sources of a mixture's ``train/`` (or ``eval/``) folder: data files and dataset folders."""
    names = {p.name if p.is_dir() else p.stem for p in Path(folder).iterdir()
             if not p.name.startswith(".") and (p.is_dir() or p.suffix in EXTENSIONS)}
    return sorted(names)
