"""Merge benchmark: merit's streaming merge vs mergekit's ``linear`` on K random SmolLM2-135M-sized branches.

    .venv/bin/pip install -e '.[bench]'          # mergekit, only for this benchmark
    .venv/bin/python benchmarks/merge_bench.py --k 4 8

For each K it builds (once, under --root, default /tmp) θ(0) = a random-init LlamaConfig of SmolLM2-135M's
shape (hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536, vocab 49152, tied embeddings, fp32)
and K branches = θ(0) + independent N(0, 0.01²) noise, then measures, each tool in its own subprocess:

- equality: max |merit − mergekit| over all tensors (target ≤ 1e-6, fp32), weights 1..K normalised;
- wall clock of the whole command (interpreter start included) and merit's own merge time;
- peak RSS (ru_maxrss of the child) against the bound (K + 2) × largest tensor + one output shard, and
  against the RSS of an interpreter that only imported torch and merit (the floor any merge pays);
- throughput: input bytes / merge time, as a fraction of the read bandwidth of the same files measured
  in the same run (sequential 16 MiB reads into one buffer). Dropping the page cache needs root tricks,
  so every file is read once first to warm the cache for both tools: the "disk" bandwidth here is the
  page-cache bandwidth, the hardest target for a merge to approach.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SMOL = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build_models(root: Path, k: int, seed: int = 0) -> tuple[Path, list[Path]]:
    """θ(0) and k perturbed copies under ``root`` (reused when already there)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    base = root / "theta0"
    if not (base / "model.safetensors").is_file():
        log("building θ(0) (random init, SmolLM2-135M shape, fp32)")
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**SMOL))
        model.save_pretrained(base, max_shard_size="5GB")
        del model
    branches = [root / f"branch{i}" for i in range(k)]
    todo = [b for b in branches if not (b / "model.safetensors").is_file()]
    if todo:
        state = load_file(str(base / "model.safetensors"))
        for b in todo:
            i = int(b.name.removeprefix("branch"))
            log(f"building {b.name}")
            gen = torch.Generator().manual_seed(1000 + i)
            noisy = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in state.items()}
            b.mkdir(parents=True, exist_ok=True)
            save_file(noisy, str(b / "model.safetensors"), metadata={"format": "pt"})
            for f in ("config.json", "generation_config.json"):
                shutil.copy2(base / f, b / f)
            del noisy
    return base, branches


def read_bandwidth(files: list[Path], repeats: int = 3) -> tuple[float, float, float]:
    """(bytes, best seconds, best CPU seconds) to read ``files`` in one stream of 16 MiB ``readinto`` calls."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    total = sum(f.stat().st_size for f in files)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return total, best, best_cpu


def measured(cmd: list[str]) -> dict:
    """Run ``cmd`` in a wrapper process that reports its wall time and the child's peak RSS."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t0 = time.perf_counter()\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "wall = time.perf_counter() - t0\n"
               "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
               "print(json.dumps({'rc': p.returncode, 'wall': wall, 'rss': rss, 'out': p.stdout[-4000:], "
               "'err': p.stderr[-4000:]}))\n")
    res = subprocess.run([PY, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    info = json.loads(res.stdout)
    if info["rc"] != 0:
        raise SystemExit(f"command failed ({info['rc']}): {' '.join(cmd)}\n{info['err']}")
    return info


def max_abs_diff(a: Path, b: Path) -> tuple[float, int, list[str]]:
    """Max |a − b| over the tensors both hold, their count, and the names only one holds."""
    import torch
    from merit.merge.safetensors_io import checkpoint_tensors
    from safetensors import safe_open

    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    worst = 0.0
    for name in sorted(set(ta) & set(tb)):
        with safe_open(str(ta[name].file), "pt") as fa, safe_open(str(tb[name].file), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        worst = max(worst, (x.to(torch.float64) - y.to(torch.float64)).abs().max().item())
    return worst, len(set(ta) & set(tb)), sorted(set(ta) ^ set(tb))


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the page cache (our files only; no root-wide cache drop)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_pair(root: Path, k: int, branches: list[Path], workers: int | None, cold: bool) -> dict:
    """Read bandwidth, merit and mergekit on the same files, warm (page cache) or cold (evicted first)."""
    files = [b / "model.safetensors" for b in branches]
    weights = ",".join(str(i + 1) for i in range(k))
    tag = "cold" if cold else "warm"
    out_ours, out_mk = root / f"out-merit-k{k}", root / f"out-mergekit-k{k}"
    yaml = root / f"mergekit-k{k}.yml"
    for p in (out_ours, out_mk):
        shutil.rmtree(p, ignore_errors=True)
    merit = [PY, "-m", "merit.cli", "merge", "--out", str(out_ours), "--method", "token-weighted",
             "--weights", weights, *(["--workers", str(workers)] if workers else []), *map(str, branches)]
    # merit writes the mergekit config of the same merge, so both tools run the same weights.
    subprocess.run([*merit, "--export-mergekit", str(yaml), "--export-only"], check=True, capture_output=True)

    if cold:
        evict(files)
    read_bytes, read_s, read_cpu = read_bandwidth(files, repeats=1 if cold else 3)  # warm: also warms the cache
    log(f"K={k} {tag}: read {read_bytes / 1e9:.2f} GB in {read_s:.2f} s ({read_bytes / read_s / 1e9:.2f} GB/s)")
    if cold:
        evict(files)
    ours = measured(merit)
    merge_s = float(re.search(r" in ([0-9.]+) s \(", ours["out"]).group(1))
    merge_cpu = float(re.search(r", ([0-9.]+) CPU-s\)", ours["out"]).group(1))
    log(f"K={k} {tag}: merit {ours['wall']:.2f} s wall ({merge_s:.2f} s merging), peak RSS {ours['rss'] / 1e9:.2f} GB")
    if cold:
        evict(files)
    else:
        _, again, again_cpu = read_bandwidth(files, repeats=1)  # others share this machine: keep the best
        read_s, read_cpu = min(read_s, again), min(read_cpu, again_cpu)
    mk = measured([str(Path(PY).parent / "mergekit-yaml"), str(yaml), str(out_mk), "--no-copy-tokenizer",
                   "--no-write-model-card", "--quiet"])
    log(f"K={k} {tag}: mergekit {mk['wall']:.2f} s wall, peak RSS {mk['rss'] / 1e9:.2f} GB")
    diff, n_common, only_one = max_abs_diff(out_ours, out_mk)
    sanity, _, _ = max_abs_diff(out_ours, branches[0])  # the comparison can see a difference

    from merit.merge.safetensors_io import checkpoint_tensors

    largest = max(e.numel for e in checkpoint_tensors(branches[0]).values()) * 4  # fp32
    shard = sum(e.nbytes for e in checkpoint_tensors(out_ours).values())  # one shard: the whole output here
    return {"k": k, "cache": tag, "read_gbps": read_bytes / read_s / 1e9, "read_bytes": read_bytes,
            "read_cpu": read_cpu, "merit_merge_cpu": merge_cpu,
            "merit_wall": ours["wall"], "merit_merge_s": merge_s, "merit_rss": ours["rss"],
            "mergekit_wall": mk["wall"], "mergekit_rss": mk["rss"], "max_abs_diff": diff, "tensors": n_common,
            "sanity_diff_vs_branch0": sanity, "only_one": only_one,
            "bound": (k + 2) * largest + shard, "bound_no_shard": (k + 2) * largest}


def cpu_bound(r: dict) -> float:
    """Throughput / read bandwidth if the merge had the machine's cores to itself: wall = CPU-s / cores
    for the merge (its workers run in parallel), wall = CPU-s for the one-stream read. Only meaningful
    warm, where both are CPU-bound; a load-independent view of the same ratio."""
    if r["cache"] != "warm" or r["read_cpu"] <= 0:
        return float("nan")
    return r["read_cpu"] * (os.cpu_count() or 1) / r["merit_merge_cpu"]


def floor_rss() -> int:
    info = measured([PY, "-c", "import torch, merit.merge.checkpoint, merit.cli"])
    return info["rss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--root", type=Path, default=Path("/tmp/merit_merge_bench"))
    ap.add_argument("--workers", type=int, help="merit --workers (default: merit's default)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache pass")
    ap.add_argument("--clean", action="store_true", help="delete --root afterwards")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    rows = []
    for k in args.k:
        _, branches = build_models(args.root, k)
        rows.append(run_pair(args.root, k, branches, args.workers, cold=False))
        if not args.no_cold:
            rows.append(run_pair(args.root, k, branches, args.workers, cold=True))
    floor = floor_rss()
    gb = 1e9
    print(f"\nmachine: {os.cpu_count()} CPUs, no GPU; 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (other jobs share the machine); RSS of an interpreter that only "
          f"imported torch + merit: {floor / gb:.2f} GB\n")
    head = ("| K | cache | input GB | read GB/s | merit wall s | merit merge s | mergekit wall s "
            "| wall merit/mergekit | merge throughput / read bw | read CPU-s | merge CPU-s | same, CPU-bound on "
            f"{os.cpu_count()} cores | merit peak RSS GB | mergekit peak RSS GB "
            "| bound (K+2)·largest + shard GB | merit RSS − floor GB | max abs diff | (sanity: vs branch0) |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        tput = r["read_bytes"] / r["merit_merge_s"] / gb
        print(f"| {r['k']} | {r['cache']} | {r['read_bytes'] / gb:.2f} | {r['read_gbps']:.2f} | {r['merit_wall']:.2f} "
              f"| {r['merit_merge_s']:.2f} | {r['mergekit_wall']:.2f} | {r['merit_wall'] / r['mergekit_wall']:.2f} "
              f"| {tput / r['read_gbps']:.2f} | {r['read_cpu']:.2f} | {r['merit_merge_cpu']:.2f} "
              f"| {cpu_bound(r):.2f} | {r['merit_rss'] / gb:.2f} | {r['mergekit_rss'] / gb:.2f} "
              f"| {r['bound'] / gb:.2f} | {(r['merit_rss'] - floor) / gb:.2f} | {r['max_abs_diff']:.1e} "
              f"| {r['sanity_diff_vs_branch0']:.2f} |")
    for r in rows:
        if r["only_one"]:
            print(f"K={r['k']}: tensors in only one output: {r['only_one']}")
    print(json.dumps({"floor_rss": floor, "rows": rows}, default=str), file=sys.stderr)
    if args.clean:
        shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
