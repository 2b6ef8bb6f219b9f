"""Conflict estimation at scale: cosines over huge stored vectors, and count-sketching a 1B-entry gradient.

    .venv/bin/python benchmarks/conflict_scale_bench.py [--part cosine,before,sketch] [--work DIR]

Every measurement runs in a child process of its own; its peak resident memory is that child's
``VmHWM`` (/proc/self/status, read by the child at its end). Not ``ru_maxrss``: Linux carries a
process's maximum RSS over fork and exec, so a child's would start at the parent's (which holds the
synthetic data while writing it). Results, with the command,
date and machine, are written to conflict_scale_results.md (temporary name, then renamed).

- cosine: T = 176 sources whose stored vectors have D = 100M float32 entries (400 MB each). 176 × 400 MB
  does not fit the disk, so ``--distinct`` (16) different vectors are written and hard-linked under the
  176 source names round robin: the rows repeat exactly, but every one of the 176 files is read and
  every block product is computed, so compute and reads are those of T = 176 × D. C from scratch
  (``store.update_cosine`` on an empty cache), then the cache of the first T − 8 extended by 8 sources,
  checked bitwise against the from-scratch C.
- before: the previous path (``store.load_vectors`` + the previous ``cosine.py``, read from git at
  ``--before-rev``) against the streamed one at a size the previous path fits in memory
  (T = 24 × D = 20M).
- sketch: count-sketch D = 65536 of a synthetic gradient of ``--sketch-entries`` (1B) float32 entries in
  4 tensors: the previous per-tensor ``torch.randint`` draws (reimplemented here as they were: a CPU
  generator per tensor, chunks of 2^22), the same keeping every draw as the GPU cache did (4 bytes per
  entry), and the index hash. The hash keeps no index of the model's size: only two int64 buffers of
  ``_SKETCH_CHUNK`` entries.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import machine  # noqa: E402

MB = 1 << 20


def log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ children


def child(kind: str, spec: dict) -> dict:
    """Run one measurement in a fresh interpreter; returns its JSON result plus its peak RSS."""
    cmd = [sys.executable, __file__, "--child", kind, "--child-spec", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(cmd, stdout=subprocess.PIPE, env=env, check=True).stdout
    return json.loads(out.decode().strip().splitlines()[-1])


def _self_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM, which starts afresh at exec), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(kind: str, spec: dict) -> None:
    from merit.conflict import store

    res: dict = {"rss_at_start_mb": _self_rss_mb()}
    if kind == "cosine-new":
        folder = Path(spec["store"])
        if spec.get("fresh"):  # from scratch: no cache to extend
            (folder / store.COSINE_CACHE).unlink(missing_ok=True)
        names = spec["names"]
        keys = {n: f"k-{n}" for n in names}
        t0 = time.perf_counter()
        c = store.update_cosine(folder, names, keys)
        res["seconds"] = time.perf_counter() - t0
        if spec.get("save"):
            np.save(spec["save"], c)
        if spec.get("compare"):
            res["bitwise_equal"] = bool(np.array_equal(c, np.load(spec["compare"])))
        period = spec.get("period")
        if period:  # rows i and i + period are the same file: their cosine is 1 up to rounding
            res["duplicate_max_dev"] = float(max(abs(c[i, i + period] - 1) for i in range(len(c) - period)))
    elif kind == "cosine-before":
        import types

        old = types.ModuleType("old_cosine")
        exec(subprocess.check_output(["git", "-C", str(ROOT), "show", f"{spec['rev']}:src/merit/conflict/cosine.py"]),
             old.__dict__)
        t0 = time.perf_counter()
        g = store.load_vectors(Path(spec["store"]), spec["names"])
        t1 = time.perf_counter()
        c = old.cosine_matrix(g)
        res.update(load_s=t1 - t0, cosine_s=time.perf_counter() - t1, seconds=time.perf_counter() - t0)
        np.save(spec["save"], c)
    elif kind.startswith("sketch-"):
        res.update(sketch(kind.removeprefix("sketch-"), spec))
    else:
        raise ValueError(kind)
    res["peak_rss_mb"] = _self_rss_mb()
    print(json.dumps(res), flush=True)


def _old_randint_sketch(named, dim: int, seed: int, keep: bool) -> tuple[np.ndarray, int]:
    """The count-sketch as merit drew it before (METHODS_VERSION 1): per-tensor CPU generators, v ∈ [0, 2D)
    from ``torch.randint`` in chunks of 2^22; ``keep`` holds every draw as the GPU bucket cache did."""
    import torch

    from merit.conflict.compress import tensor_seed

    chunk = 1 << 22
    acc = torch.zeros(2 * dim)
    used: set[int] = set()
    kept = []
    for name, g in named:
        s = tensor_seed(name, seed)
        while s in used:
            s = (s + 1) & 0xFFFFFFFF
        used.add(s)
        gen = torch.Generator().manual_seed(s)
        flat = g.reshape(-1)
        for a in range(0, flat.numel(), chunk):
            m = min(chunk, flat.numel() - a)
            v = torch.randint(0, 2 * dim, (m,), generator=gen, dtype=torch.int32)
            if keep:
                kept.append(v)
            acc.index_add_(0, v, flat[a : a + m])
    return (acc[dim:] - acc[:dim]).numpy(), sum(v.numel() * 4 for v in kept)


def sketch(kind: str, spec: dict) -> dict:
    import torch

    from merit.conflict.compress import _SKETCH_CHUNK, CompressionSpec, compress

    torch.manual_seed(0)
    parts = 4
    per = spec["entries"] // parts
    named = [(f"layer{i}.weight", torch.randn(per // 1000, 1000)) for i in range(parts)]
    out = {"rss_with_gradient_mb": _self_rss_mb(), "entries": per // 1000 * 1000 * parts}
    t0 = time.perf_counter()
    if kind == "hash":
        compress(named, CompressionSpec("countsketch", sketch_dim=spec["dim"], seed=0))
        out["index_bytes_kept"] = 0
        out["temporary_index_bytes"] = 2 * 8 * _SKETCH_CHUNK
    else:
        _, kept = _old_randint_sketch(named, spec["dim"], 0, keep=kind == "randint-cache")
        out["index_bytes_kept"] = kept
    out["seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------- parts


def write_pool(folder: Path, count: int, dim: int, seed: int) -> list[Path]:
    """``count`` stored vectors of ``dim`` float32 entries: a shared direction plus independent noise, so
    the cosines are not all near zero."""
    import torch

    from merit.conflict import store

    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(dim, dtype=np.float32)
    paths = []
    for k in range(count):
        name = f"pool{k:02d}"
        if not store.vector_path(folder, name).exists():
            v = rng.standard_normal(dim, dtype=np.float32)
            v += float(rng.uniform(0.2, 1.0)) * shared
            store.save_vector(folder, name, torch.from_numpy(v), f"pool-{k}")
            del v
        paths.append(store.vector_path(folder, name))
        log(f"pool vector {k + 1}/{count} ({dim / 1e6:.0f}M entries)")
    return paths


def link_sources(pool: list[Path], folder: Path, count: int) -> list[str]:
    """Source names task000.. hard-linked to the pool files round robin."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"task{i:03d}" for i in range(count)]
    for i, n in enumerate(names):
        target = folder / f"{n}.safetensors"
        if not target.exists():
            os.link(pool[i % len(pool)], target)
    return names


def cosine_part(args) -> dict:
    pool = write_pool(args.work / "pool", args.distinct, args.dim, seed=1)
    folder = args.work / "store"
    names = link_sources(pool, folder, args.sources)
    out: dict = {"sources": args.sources, "dim": args.dim, "distinct": args.distinct,
                 "stored_gb": args.sources * args.dim * 4 / 1e9}
    scratch = str(args.work / "c_scratch.npy")
    log(f"cosine from scratch: T={args.sources} × D={args.dim}")
    out["scratch"] = child("cosine-new", {"store": str(folder), "names": names, "fresh": True, "save": scratch,
                                          "period": args.distinct})
    log(f"  {out['scratch']['seconds']:.1f} s, peak {out['scratch']['peak_rss_mb']:.0f} MB")
    t_old = args.sources - args.extend
    out["first"] = child("cosine-new", {"store": str(folder), "names": names[:t_old], "fresh": True})
    log(f"cosine of the first {t_old}: {out['first']['seconds']:.1f} s")
    out["extend"] = child("cosine-new", {"store": str(folder), "names": names, "compare": scratch})
    log(f"  extended by {args.extend}: {out['extend']['seconds']:.1f} s, peak {out['extend']['peak_rss_mb']:.0f} MB, "
        f"bitwise {out['extend']['bitwise_equal']}")
    return out


def before_part(args) -> dict:
    pool = write_pool(args.work / "pool-before", min(args.distinct, args.before_sources), args.before_dim, seed=2)
    folder = args.work / "store-before"
    names = link_sources(pool, folder, args.before_sources)
    before_c, after_c = str(args.work / "c_before.npy"), str(args.work / "c_after.npy")
    out: dict = {"sources": args.before_sources, "dim": args.before_dim, "rev": args.before_rev}
    log(f"before: load_vectors + previous cosine_matrix, T={args.before_sources} × D={args.before_dim}")
    out["before"] = child("cosine-before", {"store": str(folder), "names": names, "rev": args.before_rev,
                                            "save": before_c})
    log(f"  {out['before']['seconds']:.1f} s, peak {out['before']['peak_rss_mb']:.0f} MB")
    out["after"] = child("cosine-new", {"store": str(folder), "names": names, "fresh": True, "save": after_c})
    log(f"  streamed: {out['after']['seconds']:.1f} s, peak {out['after']['peak_rss_mb']:.0f} MB")
    out["max_abs_diff"] = float(np.max(np.abs(np.load(before_c) - np.load(after_c))))
    return out


def sketch_part(args) -> dict:
    out = {}
    for kind in ("randint", "randint-cache", "hash"):
        log(f"count-sketch {kind}: {args.sketch_entries / 1e9:.1f}B entries")
        out[kind] = child(f"sketch-{kind}", {"entries": args.sketch_entries, "dim": args.sketch_dim})
        r = out[kind]
        log(f"  {r['seconds']:.1f} s, peak {r['peak_rss_mb']:.0f} MB ({r['rss_with_gradient_mb']:.0f} MB with the gradient)")
    return out


# ------------------------------------------------------------------------------------------- report


def report(res: dict) -> str:
    lines = ["# Conflict estimation at scale (streamed cosines, hashed count-sketch)", "",
             "Produced by `benchmarks/conflict_scale_bench.py`.", "",
             f"**Command:** `{res['command']}`  ",
             f"**Date:** {res['date']}  ",
             f"**Machine:** {res['machine']}; {res['memory_gb']:.0f} GB RAM; 1-minute load average "
             f"{res['load_start']:.1f} at the start, {res['load_end']:.1f} at the end.", "",
             "Peak RSS is each measurement's own child process (`VmHWM` at its end), including the "
             "interpreter, numpy, torch and safetensors imports (~"
             f"{res.get('baseline_mb', 0):.0f} MB before any work).", ""]
    if "cosine" in res:
        c = res["cosine"]
        s, e, f = c["scratch"], c["extend"], c["first"]
        lines += ["## Cosines from stored vectors", "",
                  f"T = {c['sources']} sources × D = {c['dim'] / 1e6:.0f}M float32 entries each "
                  f"({c['stored_gb']:.1f} GB of vectors read per pass). Only {c['distinct']} distinct vectors "
                  f"are on disk ({c['distinct'] * c['dim'] * 4 / 1e9:.1f} GB), hard-linked under the "
                  f"{c['sources']} names round robin: rows i and i + {c['distinct']} are the same file, but "
                  "every file is opened and read and every block product is computed, so compute and reads are "
                  f"those of the full T = {c['sources']} × {c['dim'] / 1e6:.0f}M. The distinct data fits the page "
                  "cache, so reads come mostly from memory, not the disk. Duplicate rows' cosines deviate from 1 "
                  f"by at most {s['duplicate_max_dev']:.1e}.", "",
                  "| run | wall s | peak RSS MB |", "|---|---:|---:|",
                  f"| C from scratch, T = {c['sources']} | {s['seconds']:.1f} | {s['peak_rss_mb']:.0f} |",
                  f"| C from scratch, first T = {len_first(c)} | "
                  f"{f['seconds']:.1f} | {f['peak_rss_mb']:.0f} |",
                  f"| cache of {len_first(c)} extended by {c['sources'] - len_first(c)} | {e['seconds']:.1f} | "
                  f"{e['peak_rss_mb']:.0f} |", "",
                  f"Extended C bitwise equal to the from-scratch C: **{e['bitwise_equal']}**. Target peak RSS "
                  f"≤ 2 GB: **{'met' if max(s['peak_rss_mb'], e['peak_rss_mb']) <= 2048 else 'not met'}**.", ""]
    if "before" in res:
        b = res["before"]
        old, new = b["before"], b["after"]
        lines += ["## Before and after at a size the previous path fits", "",
                  f"T = {b['sources']} × D = {b['dim'] / 1e6:.0f}M (previous path: `store.load_vectors` + "
                  f"`cosine.py` at `{b['rev']}`).", "",
                  "| path | wall s | peak RSS MB |", "|---|---:|---:|",
                  f"| previous: load every vector (float32) + float64 unit rows | {old['seconds']:.1f} "
                  f"(load {old['load_s']:.1f}) | {old['peak_rss_mb']:.0f} |",
                  f"| streamed column chunks | {new['seconds']:.1f} | {new['peak_rss_mb']:.0f} |", "",
                  f"max |C_previous − C_streamed| = {b['max_abs_diff']:.1e} (row norms are now summed per chunk, "
                  "so the last bits differ; the cache is versioned and an old one is recomputed).", ""]
    if "sketch" in res:
        k = res["sketch"]
        n = k["hash"]["entries"]
        lines += ["## Count-sketch of a 1B-entry gradient", "",
                  f"{n / 1e9:.2f}B float32 entries in 4 tensors ({n * 4 / 1e9:.1f} GB), D = {res['sketch_dim']}, CPU. "
                  "\"RSS with gradient\" is the child's peak after allocating the gradient, before sketching.", "",
                  "| method | wall s | ns / entry | RSS with gradient MB | peak RSS MB | index bytes kept |",
                  "|---|---:|---:|---:|---:|---:|"]
        label = {"randint": "previous: torch.randint per chunk (CPU path, no cache)",
                 "randint-cache": "previous with the bucket cache (as on a GPU)",
                 "hash": "lowbias32 index hash (new)"}
        for kind in ("randint", "randint-cache", "hash"):
            r = k[kind]
            lines.append(f"| {label[kind]} | {r['seconds']:.1f} | {r['seconds'] / n * 1e9:.2f} | "
                         f"{r['rss_with_gradient_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['index_bytes_kept'] / MB:.0f} MB |")
        lines += ["", f"The hash keeps no index of the gradient's size: its only integer tensors are two int64 "
                  f"buffers of `_SKETCH_CHUNK` entries ({k['hash']['temporary_index_bytes'] / MB:.0f} MB), reused "
                  "for every chunk of a tensor, on the gradient's device.", ""]
    return "\n".join(lines)


def len_first(c: dict) -> int:
    return c["sources"] - c["extend_by"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="cosine,before,sketch")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "merit-scale-bench")
    p.add_argument("--sources", type=int, default=176)
    p.add_argument("--distinct", type=int, default=16, help="distinct vector files behind the --sources names")
    p.add_argument("--dim", type=int, default=100_000_000)
    p.add_argument("--extend", type=int, default=8, help="sources added to the cache of the first T - extend")
    p.add_argument("--before-sources", type=int, default=24)
    p.add_argument("--before-dim", type=int, default=20_000_000)
    p.add_argument("--before-rev", default="fafb8ec", help="git revision of the previous cosine.py")
    p.add_argument("--sketch-entries", type=int, default=1_000_000_000)
    p.add_argument("--sketch-dim", type=int, default=65536)
    p.add_argument("--keep", action="store_true", help="keep the vector files under --work")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "conflict_scale_results.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args.child, json.loads(args.child_spec))
        return
    parts = args.part.split(",")
    res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                 "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                 "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
                 "load_start": os.getloadavg()[0], "sketch_dim": args.sketch_dim}
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        if "cosine" in parts:
            res["cosine"] = cosine_part(args)
            res["cosine"]["extend_by"] = args.extend
            res["baseline_mb"] = res["cosine"]["scratch"]["rss_at_start_mb"]
        if "before" in parts:
            res["before"] = before_part(args)
            res.setdefault("baseline_mb", res["before"]["after"]["rss_at_start_mb"])
        if "sketch" in parts:
            res["sketch"] = sketch_part(args)
            res.setdefault("baseline_mb", res["sketch"]["hash"]["rss_at_start_mb"])
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    res["load_end"] = os.getloadavg()[0]
    text = report(res)
    print(text)
    tmp = args.results.with_name(f".{args.results.name}.tmp")
    tmp.write_text(text + "\n<details><summary>raw results</summary>\n\n```json\n" + json.dumps(res, indent=1)
                   + "\n```\n</details>\n")
    tmp.replace(args.results)


if __name__ == "__main__":
    main()
