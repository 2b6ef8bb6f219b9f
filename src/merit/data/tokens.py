"""The token cache: every source tokenized once, into memory-mapped Apache Arrow shards.

A source is tokenized once per (content, how it is read — format, columns, slice —, tokenizer and chat
template, ``mixture.max_length``, ``mixture.max_train_per_source``) into its own folder under the cache
root (``mixture.cache_dir``, by default ``<run>/mixture/tokens``). Every stage that needs training
tokens — the mixture's counts, the gradient stage's calibration rows, each branch, the joint run — reads
that folder memory-mapped through Hugging Face ``datasets``: no stage holds a whole source as Python
lists, and none tokenizes it again.

One source's folder (named by its key)::

    shard-00000-of-00003.arrow   Arrow IPC stream (the format of datasets' own cache): one row per kept example
    shard-00000-of-00003.json    the shard's rows, bytes and counts, written after the shard is renamed into place
    index.json                   the source's totals, written once every shard is whole

A shard is a part of one of the source's files (``merit.data.formats.plan_shards``): a byte range cut
at record starts for JSON Lines and JSON, whole row groups for Parquet, row ranges for Arrow. Shards are tokenized by worker processes
when the work is large (``mixture.num_proc``) and written under a temporary name, then renamed, so a
killed tokenization resumes with the shards not yet written. A shard whose file size differs from its
record (a truncated copy, a disk that filled up) is rebuilt with a notice and never read as data.

Rows: ``input_ids`` and ``labels`` (int32 lists; labels are ``IGNORE`` outside assistant turns),
``length``, ``loss_tokens``, ``truncated``; for a vision-language θ(0) also ``images`` (absolute paths:
pixels are decoded by the training collator, never stored), ``image_bytes`` (images embedded in a
Parquet or Arrow source, kept encoded here so the collator reads them memory-mapped, not by re-reading
the source's row groups), ``image_tokens`` and the processor's other
per-token fields (``extra_keys`` / ``extra_values``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from merit import artifacts
from merit.data import formats
from merit.data.chat import Tokenized
from merit.data.formats import Reader, Shard
from merit.errors import notice

CACHE_VERSION = 1  # bump when the rows written for the same inputs change (every cache is then rebuilt)
PARALLEL_BYTES = 4 << 20  # below this much work in all, worker processes would cost more than they save
BATCH_ROWS = 1024  # rows per Arrow record batch: what a writer holds in memory
INDEX = "index.json"


@dataclass(frozen=True)
class TokenRequest:
    """One source file to tokenize (or find tokenized) under ``folder``."""

    name: str
    reader: Reader  # the source's training side (file or folder, format)
    folder: Path  # <cache root>/<key>
    key: str
    max_length: int
    limit: int | None  # the first ``limit`` examples (mixture.max_train_per_source)

    @property
    def path(self) -> Path:
        return self.reader.path


def tokenizer_identity(tokenizer) -> str:
    """What of a tokenizer decides token ids: its vocabulary and chat template, and for a VLM processor
    its image processor's settings (resolution decides the number of image placeholder tokens)."""
    processor = getattr(tokenizer, "processor", None)
    image = getattr(processor, "image_processor", None)
    image_settings = image.to_dict() if image is not None and hasattr(image, "to_dict") else None
    return artifacts.fingerprint(tokenizer.chat_template, tokenizer.get_vocab(), image_settings)


def request(name: str, reader: Reader, root: Path, identity: str, content_sha256: str, max_length: int,
            limit: int | None) -> TokenRequest:
    # How the bytes are read (format, columns, slice) is part of what they tokenize to; plain chat JSONL
    # has no such settings, so its keys are those of caches made before other formats were read.
    settings = reader.spec.settings()
    key = artifacts.fingerprint("tokens", CACHE_VERSION, identity, content_sha256, max_length, limit,
                                *([settings] if settings else []))
    return TokenRequest(name, reader, Path(root) / f"{name}-{key}", key, max_length, limit)


# ------------------------------------------------------------------------------------------------ shards


def _shard_whole(folder: Path, shard: Shard) -> dict | None:
    """The shard's record when its Arrow file is there at the recorded size; None otherwise."""
    record_path = folder / f"{shard.stem}.json"
    arrow = folder / f"{shard.stem}.arrow"
    if not record_path.exists():
        return None
    try:
        record = artifacts.read_json(record_path)
        ok = arrow.stat().st_size == record["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        ok, record = False, None
    if not ok:
        notice(f"{arrow}: damaged or incomplete token shard; tokenizing it again")
        record_path.unlink(missing_ok=True)
        return None
    return record


def _schema(vision: bool):
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    fields = [("input_ids", ids), ("labels", ids), ("length", pa.int32()), ("loss_tokens", pa.int32()),
              ("truncated", pa.bool_())]
    if vision:
        # An image is a path (image_bytes "") or encoded bytes embedded in the source (images "").
        fields += [("images", pa.list_(pa.string())), ("image_bytes", pa.list_(pa.binary())), ("image_tokens", pa.int32()),
                   ("extra_keys", pa.list_(pa.string())), ("extra_values", pa.list_(ids))]
    return pa.schema(fields)


def tokenize_shard(tokenizer, req: TokenRequest, shard: Shard) -> dict:
    """Tokenize one shard of a source into its Arrow file and record; the record (counts)."""
    import pyarrow as pa

    from merit.data.mixture import tokenize_example

    vision = getattr(tokenizer, "processor", None) is not None
    schema = _schema(vision)
    req.folder.mkdir(parents=True, exist_ok=True)
    arrow = req.folder / f"{shard.stem}.arrow"
    tmp = arrow.with_name(f".{arrow.name}.{os.getpid()}.tmp")
    counts = {"examples": 0, "rows": 0, "tokens": 0, "loss_tokens": 0, "truncated": 0, "skipped": 0}
    if vision:
        counts.update(image_tokens=0, images=0)
    columns: dict[str, list] = {f.name: [] for f in schema}

    def flush(writer) -> None:
        if columns["input_ids"]:
            writer.write_batch(pa.record_batch([pa.array(columns[f.name], type=f.type) for f in schema],
                                               schema=schema))
            for v in columns.values():
                v.clear()

    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for where, ex in formats.shard_examples(req.reader, shard):
                counts["examples"] += 1
                t = tokenize_example(tokenizer, ex, req.max_length, where)
                if t.loss_tokens == 0:  # truncation cut every assistant token: it would train on nothing
                    counts["skipped"] += 1
                    continue
                counts["rows"] += 1
                counts["tokens"] += len(t.input_ids)
                counts["loss_tokens"] += t.loss_tokens
                counts["truncated"] += t.truncated
                columns["input_ids"].append(t.input_ids)
                columns["labels"].append(t.labels)
                columns["length"].append(len(t.input_ids))
                columns["loss_tokens"].append(t.loss_tokens)
                columns["truncated"].append(t.truncated)
                if vision:
                    counts["image_tokens"] += t.image_tokens
                    counts["images"] += len(t.images)
                    columns["images"].append([p if isinstance(p, str) else "" for p in t.images])
                    columns["image_bytes"].append([p if isinstance(p, bytes) else b"" for p in t.images])
                    columns["image_tokens"].append(t.image_tokens)
                    columns["extra_keys"].append(list(t.extra))
                    columns["extra_values"].append(list(t.extra.values()))
                if len(columns["input_ids"]) >= BATCH_ROWS:
                    flush(writer)
            flush(writer)
        tmp.replace(arrow)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record = {**counts, "bytes": arrow.stat().st_size, "source_bytes": [shard.start, shard.end]}
    artifacts.write_json(req.folder / f"{shard.stem}.json", record)
    return record


# ----------------------------------------------------------------------------------------------- building

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str, trust_remote_code: bool) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from merit.models.loading import load_tokenizer

    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)


def _worker_shard(req: TokenRequest, shard: Shard) -> dict:
    return tokenize_shard(_WORKER_TOKENIZER, req, shard)


def workers_for(num_proc: int | None, work_bytes: int) -> int:
    """Worker processes for ``work_bytes`` of source text: ``mixture.num_proc``, else (auto) one per core
    (at most 8) when the work is large enough to pay for starting them, else none (in this process)."""
    if num_proc is not None:
        return num_proc
    if work_bytes < PARALLEL_BYTES:
        return 1
    return max(1, min(8, os.cpu_count() or 1))


def build(requests: Sequence[TokenRequest], tokenizer, *, num_proc: int | None = None,
          tokenizer_path: Path | None = None, trust_remote_code: bool = False) -> int:
    """Tokenize every shard of ``requests`` that is not whole yet, then write each source's index.

    With more than one worker process (see :func:`workers_for`; they need ``tokenizer_path``, the θ(0)
    folder to load the same tokenizer from), shards of all sources are spread over them. A bad line
    raises its one-line DataError here, whichever process met it. Returns the number of shards tokenized.
    """
    from tqdm.auto import tqdm

    plans = {r.folder: formats.plan_shards(r.reader, r.limit) for r in requests if open_tokens(r) is None}
    todo = [(r, s) for r in requests if r.folder in plans for s in plans[r.folder] if _shard_whole(r.folder, s) is None]
    workers = workers_for(num_proc, sum(_shard_bytes(r, s) for r, s in todo)) if tokenizer_path else 1
    bar = tqdm(total=len(todo), desc="tokenizing", unit="shard", disable=None) if todo else None
    try:
        if workers <= 1 or len(todo) <= 1:
            for r, s in todo:
                tokenize_shard(tokenizer, r, s)
                bar.update()
        else:
            import multiprocessing

            # spawn, not fork: the parent may hold torch's thread pool, which a forked child can deadlock on.
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(str(tokenizer_path), trust_remote_code)) as pool:
                futures = [pool.submit(_worker_shard, r, s) for r, s in todo]
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    bar.update(len(finished))
                    for f in finished:
                        if f.exception() is not None:
                            for p in pending:
                                p.cancel()
                            raise f.exception()
    finally:
        if bar is not None:
            bar.close()
    for r in requests:
        if r.folder in plans:
            _write_index(r, plans[r.folder])
    return len(todo)


def _shard_bytes(req: TokenRequest, shard: Shard) -> int:
    """About how many source bytes a shard holds (its byte range; for row shards, the file's share)."""
    f = req.reader.files[shard.file]
    if f.container in ("jsonl", "json"):
        return shard.end - shard.start
    return formats.containers.SHARD_BYTES if shard.count > 1 else os.path.getsize(f.path)


def _write_index(req: TokenRequest, shards: list[Shard]) -> dict:
    records = []
    for s in shards:
        record = _shard_whole(req.folder, s)
        if record is None:
            raise RuntimeError(f"{req.folder}: shard {s.stem} is missing after tokenization")
        records.append({"file": f"{s.stem}.arrow", **record})
    totals = {k: sum(r[k] for r in records) for k in records[0] if k not in ("bytes", "source_bytes", "file")}
    index = {"key": req.key, "version": CACHE_VERSION, "source": str(req.path), "max_length": req.max_length,
             "limit": req.limit, "shards": records, **totals}
    artifacts.write_json(req.folder / INDEX, index)
    return index


def read_index(req: TokenRequest) -> dict | None:
    """The source's index when the cache is complete and whole (every shard at its recorded size)."""
    path = req.folder / INDEX
    if not path.exists():
        return None
    try:
        index = artifacts.read_json(path)
        whole = index.get("key") == req.key and all(
            (req.folder / s["file"]).stat().st_size == s["bytes"] for s in index["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        whole = False
    if not whole:
        notice(f"{req.folder}: token cache damaged or incomplete; tokenizing {req.path} again")
        path.unlink(missing_ok=True)
        return None
    return index


def open_tokens(req: TokenRequest) -> TokenTable | None:
    """The cached tokens of one source, memory-mapped; None when they are not (all) there."""
    index = read_index(req)
    if index is None:
        return None
    return TokenTable.from_files([req.folder / s["file"] for s in index["shards"]])


def load(req: TokenRequest, tokenizer, **build_kwargs) -> TokenTable:
    """The tokens of one source, tokenizing what is missing first (a cache deleted or damaged since the
    mixture stage is rebuilt, never read)."""
    table = open_tokens(req)
    if table is None:
        build([req], tokenizer, **build_kwargs)
        table = open_tokens(req)
    return table


# ------------------------------------------------------------------------------------------------ reading


class TokenTable(Sequence):
    """Tokenized examples backed by memory-mapped Arrow files: ``table[i]`` is a :class:`Tokenized`
    (a :class:`~merit.data.vision.VisionTokenized` for VLM rows), decoded on access; lengths and counts
    come from columns without decoding rows."""

    def __init__(self, dataset):
        self.dataset = dataset  # a datasets.Dataset
        self.vision = "images" in dataset.column_names
        self.embedded = "image_bytes" in dataset.column_names  # caches made before embedded images lack it

    @classmethod
    def from_files(cls, files: Sequence[Path]) -> TokenTable:
        from datasets import Dataset, concatenate_datasets

        parts = [Dataset.from_file(str(f)) for f in files]
        return cls(parts[0] if len(parts) == 1 else concatenate_datasets(parts))

    @classmethod
    def concat(cls, tables: Sequence[TokenTable]) -> TokenTable:
        from datasets import concatenate_datasets

        if len(tables) == 1:
            return tables[0]
        parts = [t.dataset for t in tables]
        if any(t.embedded for t in tables):  # caches from before embedded images: an empty column, same schema
            parts = [d if t.embedded else d.add_column("image_bytes", [[b""] * len(x) for x in d["images"]])
                     for t, d in zip(tables, parts)]
        return cls(concatenate_datasets(parts))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if not isinstance(i, int):
            raise TypeError("TokenTable indices are ints; use select() for several rows")
        row = self.dataset[i]
        if not self.vision:
            return Tokenized(row["input_ids"], row["labels"], row["truncated"])
        from merit.data.vision import VisionTokenized

        images = tuple(row["images"])
        if self.embedded:
            images = tuple(b if b else p for p, b in zip(images, row["image_bytes"]))
        return VisionTokenized(row["input_ids"], row["labels"], row["truncated"], images=images,
                               extra=dict(zip(row["extra_keys"], row["extra_values"])),
                               image_tokens=row["image_tokens"])

    def __iter__(self) -> Iterator[Tokenized]:
        for i in range(len(self)):
            yield self[i]

    def select(self, indices: Sequence[int]) -> TokenTable:
        return TokenTable(self.dataset.select(list(indices)))

    def column(self, name: str):
        """One scalar column as a numpy array (``length``, ``loss_tokens``, ...), read without decoding rows."""
        import numpy as np

        return np.asarray(self.dataset.with_format("numpy")[name]) if len(self) else np.zeros(0, dtype=np.int64)

    def lengths(self) -> list[int]:
        return [int(x) for x in self.column("length")]


def lengths_of(examples: Sequence[Tokenized]) -> list[int]:
    """Each example's token count: from the ``length`` column of a TokenTable, else from its ids."""
    if isinstance(examples, TokenTable):
        return examples.lengths()
    return [len(t.input_ids) for t in examples]
