"""Rows of the files a source is stored in, streamed, and the shards they are cut into.

Four containers: JSON Lines (one record per line), JSON (an array of records, decoded incrementally: the
file is never loaded whole), Parquet (row groups, read with pyarrow) and Arrow IPC streams (the
``data-*.arrow`` files of ``datasets.save_to_disk``, memory-mapped). Each yields ``(where, record)``:
``where`` names the file and the line (text files) or the row (Parquet, Arrow, JSON arrays), so any
error about the record can point at it.

A :class:`Shard` is a part of one file the token cache tokenizes as a unit: a byte range starting at a
record for the text containers, a row range (whole row groups) for Parquet and Arrow.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from merit.errors import DataError

SHARD_BYTES = 8 << 20  # source bytes per shard: the unit of parallel work and of resume
CONTAINERS = ("jsonl", "json", "parquet", "arrow")
_READ = 1 << 20  # bytes read at a time from a JSON array


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    file: int  # index into the reader's files
    start: int  # bytes (jsonl, json; at a record start) or rows (parquet, arrow)
    end: int
    first: int  # the line (jsonl) or row (json, parquet, arrow) number at ``start``: errors name the file's own
    first_line: int = 1  # json: the line at ``start`` as well

    @property
    def stem(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"


def container_of(path: Path) -> str | None:
    """The container a data file is, by its name; None for a file merit does not read."""
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}.get(suffix)


# ----------------------------------------------------------------------------------------------- reading


def rows(path: Path, container: str, start: int = 0, end: int | None = None, first: int | None = None,
         first_line: int = 1) -> Iterator[tuple[str, object]]:
    """``(where, record)`` for each record of ``path`` (in ``[start, end)`` of a shard's units)."""
    if container == "jsonl":
        for lineno, raw in jsonl_lines(path, start, end, first or 1):
            yield f"{path}:{lineno}", decode_json_line(raw, f"{path}:{lineno}")
    elif container == "json":
        for row, line, record, _ in json_records(path, start, end, first or 0, first_line):
            yield f"{path}: row {row} (line {line})", record
    elif container == "parquet":
        yield from parquet_rows(path, start, end)
    elif container == "arrow":
        yield from arrow_rows(path, start, end)
    else:
        raise ValueError(f"unknown container {container!r}")


def jsonl_lines(path: Path, start: int = 0, end: int | None = None, first_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of each non-blank line in the byte range ``[start, end)`` (``start`` at a line start)."""
    with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 is named by its number
        f.seek(start)
        pos = start
        for lineno, raw in enumerate(f, first_line):
            if end is not None and pos >= end:
                break
            pos += len(raw)
            if raw.strip():
                yield lineno, raw


def decode_json_line(raw: bytes, where: str) -> object:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                        "re-encode the file as UTF-8") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def is_json_array(path: Path) -> bool:
    """A ``.json`` file holds an array of records (else it is JSON Lines under another name)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def json_records(path: Path, start: int = 0, end: int | None = None, first_row: int = 0,
                 first_line: int = 1) -> Iterator[tuple[int, int, object, int]]:
    """(row, line, record, byte offset) of each element of a JSON array, decoded incrementally.

    ``start`` is 0 (the file's beginning: the array's ``[`` is expected) or the byte offset of an element
    found by an earlier pass; reading stops at the array's end or at the first element at or after ``end``.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos = "", 0  # decoded text not consumed yet, and the read position in it
    byte_at_pos, line = start, first_line  # file offset and line number of buf[pos]
    row = first_row
    eof = False
    with open(path, "rb") as f:
        f.seek(start)

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            data = f.read(_READ)
            try:
                text = utf8.decode(data, final=not data)
            except UnicodeDecodeError as e:
                at = f.tell() - len(data) + e.start
                raise DataError(f"{path}:{line + _lines_before(path, byte_at_pos, at)}: not UTF-8 text (byte "
                                f"{data[e.start]:#04x}); re-encode the file as UTF-8") from None
            buf, pos = buf[pos:] + text, 0
            eof = not data
            return True

        def advance(to: int) -> None:  # consume buf[pos:to], keeping byte offset and line in step
            nonlocal pos, byte_at_pos, line
            piece = buf[pos:to]
            byte_at_pos += len(piece.encode("utf-8"))
            line += piece.count("\n")
            pos = to

        def skip(chars: str) -> str:  # skip ``chars``; the next character ('' at the end of the file)
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    advance(pos + 1)
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        if start == 0:
            if skip(" \t\r\n\ufeff") != "[":
                raise DataError(f"{path}:{line}: expected a JSON array of records ('[' ...)")
            advance(pos + 1)
        while True:
            c = skip(" \t\r\n,")
            if c == "]":
                return
            if c == "":
                raise DataError(f"{path}:{line}: the JSON array is not closed (a truncated file?)")
            if end is not None and byte_at_pos >= end:
                return
            while True:
                try:
                    record, stop = decoder.raw_decode(buf, pos)
                    if stop == len(buf) and not eof:  # a number or literal may go on in the next block
                        raise json.JSONDecodeError("incomplete", buf, stop)
                    break
                except json.JSONDecodeError as e:
                    if not more():
                        col = e.pos - buf.rfind("\n", 0, e.pos)
                        raise DataError(f"{path}:{line + buf.count(chr(10), pos, e.pos)}: not valid JSON "
                                        f"({e.msg} at column {col})") from None
            offset, at_line = byte_at_pos, line
            advance(stop)
            yield row, at_line, record, offset
            row += 1
            if pos > _READ:  # drop what is consumed, so the buffer stays about one block
                buf, pos = buf[pos:], 0


def _lines_before(path: Path, start: int, stop: int) -> int:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(max(0, stop - start)).count(b"\n")


def parquet_rows(path: Path, start: int = 0, end: int | None = None) -> Iterator[tuple[str, dict]]:
    pf = _parquet(path)
    end = pf.metadata.num_rows if end is None else end
    groups, first = _row_groups(pf, start, end)
    row = first
    for batch in pf.iter_batches(batch_size=256, row_groups=groups, use_threads=False):
        for record in batch.to_pylist():
            if row >= end:
                return
            if row >= start:
                yield f"{path}: row {row}", record
            row += 1


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(str(path))
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def _row_groups(pf, start: int, end: int) -> tuple[list[int], int]:
    """The row groups that hold rows ``[start, end)`` and the first row of the first of them."""
    groups, row, first = [], 0, None
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row + n > start and row < end:
            groups.append(g)
            first = row if first is None else first
        row += n
    return groups, first or 0


def arrow_table(path: Path):
    """An Arrow IPC stream (or file) memory-mapped as one table: reading it copies nothing."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except Exception as e:
        raise DataError(f"{path}: not a readable Arrow file ({type(e).__name__}: {e})") from None


def arrow_rows(path: Path, start: int = 0, end: int | None = None) -> Iterator[tuple[str, dict]]:
    table = arrow_table(path)
    end = table.num_rows if end is None else min(end, table.num_rows)
    row = start
    for batch in table.slice(start, end - start).to_batches(max_chunksize=256):
        for record in batch.to_pylist():
            yield f"{path}: row {row}", record
            row += 1


def column_values(path: Path, container: str, names: list[str]) -> dict[str, list] | None:
    """Whole columns of a Parquet or Arrow file (for a filter: only the columns it tests are read);
    None for the text containers, whose records are read whole anyway."""
    if container == "parquet":
        pf = _parquet(path)
        present = set(pf.schema_arrow.names)
        table = pf.read(columns=[n for n in names if n in present], use_threads=False)
    elif container == "arrow":
        table = arrow_table(path)
        present = set(table.column_names)
    else:
        return None
    return {n: table.column(n).to_pylist() if n in present else None for n in names}


def column_names(path: Path, container: str) -> list[str] | None:
    """The columns of a Parquet or Arrow file from its schema alone; None for the text containers."""
    if container == "parquet":
        return list(_parquet(path).schema_arrow.names)
    if container == "arrow":
        return list(arrow_table(path).column_names)
    return None


# ---------------------------------------------------------------------------------------------- planning


def plan(path: Path, container: str, file_index: int, keep: Callable[[object, str], bool] | None, limit: int | None,
         shard_bytes: int) -> tuple[list[tuple[int, int, int, int, int]], int]:
    """Shards of one file as ``(file, start, end, first, first_line)`` and the number of records they keep.

    ``keep`` (a filter; None: every record) and ``limit`` (records kept at most) decide where the last
    shard ends: the file is read up to the ``limit``-th kept record, no further.
    """
    if container == "jsonl":
        return _plan_jsonl(path, file_index, keep, limit, shard_bytes)
    if container == "json":
        return _plan_json(path, file_index, keep, limit, shard_bytes)
    return _plan_rows(path, container, file_index, keep, limit, shard_bytes)


def _plan_jsonl(path, file_index, keep, limit, shard_bytes):
    size = os.path.getsize(path)
    kept = 0
    with open(path, "rb") as f:
        if limit is not None or keep is not None:  # up to the byte just after the limit-th kept record
            for lineno, raw in enumerate(iter(f.readline, b""), 1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                if keep is None or keep(decode_json_line(raw, where), where):  # parsed only to filter
                    kept += 1
                    if limit is not None and kept >= limit:
                        size = f.tell()
                        break
        else:
            kept = sum(1 for raw in f if raw.strip())
        cuts = [0]
        for target in range(shard_bytes, size, shard_bytes):
            f.seek(target - 1)
            f.readline()  # to the end of the line that holds byte target-1: the next cut is a line start
            cut = min(f.tell(), size)
            if cut > cuts[-1]:
                cuts.append(cut)
        if cuts[-1] < size or size == 0:
            cuts.append(size)
        lines = [1]  # line number at each shard's start (the bytes after the last start are not read)
        f.seek(0)
        for a, b in zip(cuts, cuts[1:-1]):
            lines.append(lines[-1] + _newlines(f, b - a))
    return [(file_index, cuts[i], cuts[i + 1], lines[i], lines[i]) for i in range(len(cuts) - 1)], kept


def _newlines(f, nbytes: int, block: int = 1 << 20) -> int:
    count = 0
    while nbytes > 0:
        data = f.read(min(block, nbytes))
        if not data:
            break
        count += data.count(b"\n")
        nbytes -= len(data)
    return count


def _plan_json(path, file_index, keep, limit, shard_bytes):
    """One pass over the array: shard boundaries at the first record past every ``shard_bytes``."""
    shards, kept = [], 0
    begin = None  # (offset, row, line) of the open shard's first record
    last_end = 0
    for row, line, record, offset in json_records(path):
        if begin is None:
            begin = (offset, row, line)
        elif offset - begin[0] >= shard_bytes:
            shards.append((file_index, begin[0], offset, begin[1], begin[2]))
            begin = (offset, row, line)
        last_end = offset + 1  # any byte past the record's start ends the range after it
        if keep is None or keep(record, f"{path}: row {row} (line {line})"):
            kept += 1
            if limit is not None and kept >= limit:
                break
    if begin is not None:
        shards.append((file_index, begin[0], last_end, begin[1], begin[2]))
    return shards, kept


def _plan_rows(path, container, file_index, keep, limit, shard_bytes):
    """Row ranges of whole row groups (Parquet) or of about ``shard_bytes`` (Arrow)."""
    if container == "parquet":
        meta = _parquet(path).metadata
        sizes = [(meta.row_group(g).num_rows, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]
    else:
        table = arrow_table(path)
        per_row = table.nbytes / max(1, table.num_rows)
        step = max(1, int(shard_bytes / max(per_row, 1)))
        sizes = [(min(step, table.num_rows - a), step * per_row) for a in range(0, table.num_rows, step)]
    total = sum(n for n, _ in sizes)
    end = total
    if keep is not None or limit is not None:
        end, kept = _kept_end(path, container, keep, limit, total)
    else:
        kept = total
    shards, row, begin, acc = [], 0, 0, 0
    for n, nbytes in sizes:
        if row >= end:
            break
        row += n
        acc += nbytes
        if acc >= shard_bytes or row >= end:
            shards.append((file_index, begin, min(row, end), begin, 1))
            begin, acc = row, 0
    return shards, kept


def _kept_end(path, container, keep, limit, total) -> tuple[int, int]:
    """The row just after the ``limit``-th kept row (``total`` if fewer), and the kept count."""
    fields = getattr(keep, "columns", None)
    if fields is not None:  # a column filter: read only the columns it tests
        values = column_values(path, container, list(fields))
        missing = [f for f in fields if values[f] is None]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} to filter on (columns: "
                            f"{', '.join(column_names(path, container)[:8])}); fix the source's filter")
        records = ({f: (None if values[f] is None else values[f][i]) for f in fields} for i in range(total))
    else:
        records = (r for _, r in rows(path, container))
    kept = 0
    for i, record in enumerate(records):
        if keep is None or keep(record, f"{path}: row {i}"):
            kept += 1
            if limit is not None and kept >= limit:
                return i + 1, kept
    return total, kept
