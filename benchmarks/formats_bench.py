"""Source formats at scale: merit's streamed readers vs loading the whole file, and what a format costs
the tokenize-once stage.

The rows are real: every training example of ``../shared/data/bigbench-mix`` (48 BIG-bench tasks),
repeated to ``--rows``, written as merit's chat JSONL, a ShareGPT JSON array and a Parquet file (chat
layout, row groups of 1,000). Each measurement is a child process; its peak RSS (VmHWM) less its RSS
after imports is the memory the reading itself took.

1. Reading every record as a validated chat example: ``merit.data.formats`` (streamed) vs the whole-file
   way (``json.loads`` of the file, as ``convert-llava`` did; ``pyarrow.parquet.read_table().to_pylist()``).
2. Tokenizing into the token cache (one process, the tiny preset's tokenizer) from each format.

    python benchmarks/formats_bench.py --rows 200000

Results are appended to benchmarks/formats_results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data" / "bigbench-mix"


def write_sources(root: Path, rows: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = [json.loads(line) for p in sorted((SHARED / "train").glob("*.jsonl")) for line in p.open() if line.strip()]
    root.mkdir(parents=True, exist_ok=True)
    examples = [{"messages": base[i % len(base)]["messages"], "id": str(i)} for i in range(rows)]
    out = {"chat-jsonl": root / "chat.jsonl", "sharegpt-json": root / "sharegpt.json", "parquet": root / "chat.parquet"}
    with open(out["chat-jsonl"], "w") as f:
        for e in examples:
            f.write(json.dumps(e) + "\n")
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    with open(out["sharegpt-json"], "w") as f:
        f.write("[\n")
        for i, e in enumerate(examples):
            rec = {"id": e["id"], "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in e["messages"]]}
            f.write((",\n" if i else "") + json.dumps(rec, indent=1))
        f.write("\n]\n")
    writer = None
    for a in range(0, rows, 1000):
        table = pa.Table.from_pylist(examples[a:a + 1000])
        writer = writer or pq.ParquetWriter(str(out["parquet"]), table.schema)
        writer.write_table(table)
    writer.close()
    return out


CHILD = r"""
import json, sys, time
from pathlib import Path

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

mode, kind, path = sys.argv[1], sys.argv[2], Path(sys.argv[3])
from merit.data import formats, tokens
from merit.data.formats import layouts
from merit.data.jsonl import check_example
import pyarrow.parquet as pq
base = rss("VmRSS")
t0 = time.perf_counter()
n = 0
if mode == "streamed":
    for _ in formats.examples(formats.open_reader(formats.ReadSpec(path))):
        n += 1
elif mode == "whole":
    layout = "sharegpt" if kind == "sharegpt-json" else "chat"
    cols = layouts.column_map(layout, {})
    if kind == "parquet":
        records = pq.read_table(str(path)).to_pylist()
    elif kind == "sharegpt-json":
        records = json.loads(path.read_bytes())
    else:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, r in enumerate(records):
        ex = layouts.to_example(layout, r, str(i), cols)
        check_example(ex, str(i))
        n += 1
else:  # tokenize into the token cache
    from merit.models.loading import load_tokenizer
    tok = load_tokenizer(sys.argv[4])
    reader = formats.open_reader(formats.ReadSpec(path))
    req = tokens.request("s", reader, Path(sys.argv[5]), tokens.tokenizer_identity(tok), kind, 256, None)
    tokens.build([req], tok, num_proc=1)
    n = tokens.read_index(req)["rows"]
print(json.dumps({"rows": n, "seconds": time.perf_counter() - t0, "peak_mb": rss("VmHWM") - base}))
"""


def child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(HERE.parent / "src"), "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tiny_tokenizer(folder: Path) -> Path:
    from merit.models.tiny import build_model, build_tokenizer, save_checkpoint

    tok = build_tokenizer(["user\nassistant\nsystem\n abcdefghijklmnopqrstuvwxyz 0123456789 .,?!"] * 20, vocab_size=300)
    save_checkpoint(build_model(tok, seed=0, hidden=32, layers=1), tok, folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--tokenize-rows", type=int, default=50_000)
    args = ap.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = write_sources(tmp / "big", args.rows)
        sizes = {k: p.stat().st_size / 2**20 for k, p in big.items()}
        lines += ["", f"### Reading {args.rows:,} examples (bigbench-mix rows repeated)", "",
                  "| format | file MB | reader | rows/s | peak RSS over imports (MB) |", "|---|---:|---|---:|---:|"]
        for kind, path in big.items():
            for mode in ("whole", "streamed"):
                r = child(mode, kind, str(path))
                assert r["rows"] == args.rows, r
                row = (f"| {kind} | {sizes[kind]:.0f} | {'merit.data.formats (streamed)' if mode == 'streamed' else 'whole file'} "
                       f"| {r['rows'] / r['seconds']:,.0f} | {r['peak_mb']:.0f} |")
                print(row, flush=True)
                lines.append(row)
        small = write_sources(tmp / "small", args.tokenize_rows)
        checkpoint = tiny_tokenizer(tmp / "tok")
        lines += ["", f"### Tokenizing {args.tokenize_rows:,} examples into the token cache (1 process)", "",
                  "| format | seconds | rows/s | peak RSS over imports (MB) |", "|---|---:|---:|---:|"]
        for kind, path in small.items():
            r = child("tokenize", kind, str(path), str(checkpoint), str(tmp / f"cache-{kind}"))
            row = f"| {kind} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | {r['peak_mb']:.0f} |"
            print(row, flush=True)
            lines.append(row)
    header = [f"## {time.strftime('%Y-%m-%d %H:%M')} — `python benchmarks/formats_bench.py --rows {args.rows} "
              f"--tokenize-rows {args.tokenize_rows}`", "", f"Machine: {machine()}"]
    results = HERE / "formats_results.md"
    if not results.exists():
        results.write_text("# Source formats: streamed readers vs whole-file loading\n\n"
                           "Written by `benchmarks/formats_bench.py` (its docstring says what is measured).\n")
    with open(results, "a") as f:
        f.write("\n" + "\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
