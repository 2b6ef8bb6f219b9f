"""Spectral merge benchmark: wall time and peak RSS of star, tsv, iso-c, iso-cts, model-stock (and the
token-weighted / ties baselines) on K SmolLM2-135M-shaped branches, against the engine's memory bound.
``--operators ties-peft ties`` compares merit's in-place TIES kernel with PEFT's ``merge_utils.ties``.

    PYTHONPATH=src .venv/bin/python benchmarks/svd_merge_bench.py --k 4

The checkpoints are merge_bench.py's (built once under --root, default /tmp/merit_merge_bench): θ(0) a
random-init Llama of SmolLM2-135M's shape (fp32, largest tensor the 49152×576 embedding) and K branches
θ(0) + N(0, 0.01²) noise. Each operator merges them in its own subprocess through
``merit.merge.checkpoint.merge_checkpoints`` (the streaming engine, default workers, weights 1..K
normalised); a wrapper process takes the wall time and the child's peak RSS (``ru_maxrss``).

Columns: the merge's own seconds and CPU seconds (interpreter start excluded), peak RSS, the RSS of an
interpreter that only imported torch + merit (the floor any merge pays), the engine's memory bound for
the operator (``memory_bound_bytes``: the byte budget all units in flight may hold) and whether
RSS − floor stays within it, and ‖θ̄ − θ(0)‖ / ‖mean τ‖ over all tensors as a sanity check that the
operators do different things.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import PY, build_models, log, measured  # noqa: E402

OPERATORS = ["token-weighted", "ties", "model-stock", "iso-c", "star", "tsv", "iso-cts"]

CHILD = """
import json, sys
from pathlib import Path
import torch
from merit.merge.checkpoint import merge_checkpoints
from merit.merge.operators import _task_vectors, operator
spec = json.loads(sys.argv[1])
if spec["op"] == "ties-peft":  # the kernel merit's ties replaced: PEFT's merge_utils.ties on whole copies
    from peft.utils import merge_utils

    @operator("ties-peft", needs_base=True, params={"density": 0.2, "lam": 1.0})
    def ties_peft(tensors, weights, *, base, density=0.2, lam=1.0):
        taus = _task_vectors(tensors, base)
        w = torch.tensor([len(weights) * float(x) for x in weights], dtype=taus[0].dtype)
        return base.to(taus[0].dtype) + lam * merge_utils.ties(taus, w, density, majority_sign_method="total")
info = merge_checkpoints([Path(b) for b in spec["branches"]], spec["weights"], spec["op"], Path(spec["out"]),
                         base=Path(spec["base"]), workers=spec["workers"], progress=False)
print(json.dumps(info))
"""


def relative_update(out: Path, base: Path, branches: list[Path]) -> float:
    """‖θ̄ − θ(0)‖ / ‖mean_k τ_k‖ over every tensor (1.0 for the uniform average of the branches)."""
    from contextlib import ExitStack

    from safetensors import safe_open

    num = den = 0.0
    with ExitStack() as stack:
        fo, fb, *handles = [stack.enter_context(safe_open(str(f / "model.safetensors"), "pt"))
                            for f in (out, base, *branches)]
        for name in fo.keys():
            b = fb.get_tensor(name).double()
            mean_tau = sum(h.get_tensor(name).double() - b for h in handles) / len(handles)
            num += (fo.get_tensor(name).double() - b).pow(2).sum().item()
            den += mean_tau.pow(2).sum().item()
    return (num / den) ** 0.5 if den else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--root", type=Path, default=Path("/tmp/merit_merge_bench"))
    ap.add_argument("--operators", nargs="+", default=OPERATORS)
    ap.add_argument("--workers", type=int, help="engine worker threads (default: the engine's)")
    args = ap.parse_args()
    base, branches = build_models(args.root, args.k)
    weights = [(i + 1) / (args.k * (args.k + 1) / 2) for i in range(args.k)]
    floor = measured([PY, "-c", "import torch, merit.merge.checkpoint, merit.cli"])["rss"]
    load_before = os.getloadavg()[0]
    rows = []
    for op in args.operators:
        out = args.root / f"out-{op}-k{args.k}"
        shutil.rmtree(out, ignore_errors=True)
        spec = {"branches": [str(b) for b in branches], "weights": weights, "op": op, "out": str(out),
                "base": str(base), "workers": args.workers}
        res = measured([PY, "-c", CHILD, json.dumps(spec)])
        info = json.loads(res["out"].strip().splitlines()[-1])
        rel = relative_update(out, base, branches)
        rows.append({"op": op, "wall": res["wall"], "rss": res["rss"], **info, "relative_update": rel})
        log(f"{op}: {info['seconds']:.1f} s merging, {info['cpu_seconds']:.1f} CPU-s, peak RSS {res['rss'] / 1e9:.2f} GB, "
            f"bound {info['memory_bound_bytes'] / 1e9:.2f} GB")
        shutil.rmtree(out, ignore_errors=True)
    gb = 1e9
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"\nmachine: nproc {len(os.sched_getaffinity(0))}, {cpu}, no GPU used (device cpu); K = {args.k}; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; RSS floor "
          f"(interpreter with torch + merit imported) {floor / gb:.2f} GB\n")
    head = ("| operator | wall s (process) | merge s | merge CPU-s | peak RSS GB | RSS − floor GB "
            "| engine memory bound GB | within bound | ‖θ̄ − θ(0)‖ / ‖mean τ‖ |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        above = r["rss"] - floor
        print(f"| {r['op']} | {r['wall']:.1f} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['rss'] / gb:.2f} "
              f"| {above / gb:.2f} | {r['memory_bound_bytes'] / gb:.2f} "
              f"| {'yes' if above <= r['memory_bound_bytes'] else 'no'} | {r['relative_update']:.3f} |")
    print(json.dumps({"floor_rss": floor, "rows": rows}, default=str), file=sys.stderr)


if __name__ == "__main__":
    main()
