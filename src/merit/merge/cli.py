"""``merit merge``: merge any Hugging Face safetensors checkpoints, standalone.

    merit merge --out DIR [--method token-weighted] [--base THETA0] [--weights 0.5,0.3,0.2]
                [--dtype bfloat16] [--shard-size 5GB] [--allow-different-base]
                [--density D] [--lambda L] [--no-rescale] [--seed S] [--eta E] [--alpha A]
                [--rank-fraction F] [--common-space-fraction F] [--export-mergekit FILE] CKPT1 CKPT2 ...

Weights: ``--weights`` (normalised to sum 1, like mergekit's ``normalize: true``); without it, the
branches' token counts when every branch folder has a merit manifest with ``tokens_seen`` (the paper's
w_k = N_k / Σ_j N_j), else uniform. This module imports nothing heavy until the command runs, so
``merit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from merit.argtypes import nonnegative_int, positive_int
from merit.errors import MeritError

# Operator parameter → its flag; a flag given for an operator that does not take it is an error.
FLAGS = {"density": "--density", "lam": "--lambda", "rescale": "--no-rescale", "seed": "--seed", "eta": "--eta",
         "alpha": "--alpha", "rank_fraction": "--rank-fraction", "common_space_fraction": "--common-space-fraction"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``merge`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "merge", help="merge Hugging Face checkpoints (streaming, bounded memory)",
        description="Merge K safetensors checkpoints into one, tensor by tensor, with bounded memory.")
    p.add_argument("checkpoints", nargs="+", type=Path, metavar="CKPT", help="checkpoint folders to merge")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--method", default="token-weighted",
                   help="a merge operator (`merit ls` lists them: token-weighted, uniform, task-arithmetic, ties, "
                        "dare, star, tsv, iso-cts, model-stock, ...; default: token-weighted)")
    p.add_argument("--base", type=Path, metavar="THETA0",
                   help="θ(0): needed by every method but token-weighted and uniform; checked against branch manifests")
    p.add_argument("--weights", metavar="W1,W2,...", help="one weight per checkpoint, normalised to sum 1")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="output dtype of floating tensors (default: the inputs')")
    p.add_argument("--shard-size", default="5GB", help="most bytes per output shard (default: 5GB)")
    p.add_argument("--allow-different-base", action="store_true",
                   help="merge even if the branch manifests name different θ(0) hashes")
    p.add_argument("--density", type=float, help="fraction of task-vector entries kept (ties, dare, dare-ties)")
    p.add_argument("--lambda", dest="lam", type=float, help="scale of the merged task vector (task-arithmetic, "
                   "ties, dare, dare-ties; default 1)")
    p.add_argument("--no-rescale", dest="rescale", action="store_false", default=None,
                   help="dare: do not divide kept entries by density")
    p.add_argument("--seed", type=nonnegative_int, help="dare, dare-ties: run seed (each tensor's seed derives from it)")
    p.add_argument("--eta", type=float, help="star: percent of each task matrix's nuclear norm kept (default 40)")
    p.add_argument("--alpha", type=float, help="tsv, iso-c, iso-cts: scale of the merged task vector (default 1)")
    p.add_argument("--rank-fraction", type=float,
                   help="tsv: fraction of each task matrix's singular components kept (default 1/K)")
    p.add_argument("--common-space-fraction", type=float,
                   help="iso-cts: share of the rank given to the common subspace (default 0.8)")
    p.add_argument("--device", help="where the arithmetic runs (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=positive_int, help="reader/merger threads (default: the usable CPUs, at most 4)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--export-mergekit", type=Path, metavar="FILE",
                   help="also write the equivalent mergekit YAML config to FILE")
    p.add_argument("--export-only", action="store_true", help="with --export-mergekit: write the YAML, do not merge")
    return p


def _weights(text: str | None, branches: list[Path]) -> tuple[list[float], str]:
    if text is not None:
        try:
            raw = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise MeritError(f"--weights: cannot read {text!r}; write comma-separated numbers like 0.5,0.3,0.2") \
                from None
        if len(raw) != len(branches):
            raise MeritError(f"--weights: {len(raw)} weights for {len(branches)} checkpoints; give one each")
        total = sum(raw)
        if not all(math.isfinite(w) and w >= 0 for w in raw) or total <= 0:
            raise MeritError(f"--weights: weights must be non-negative with a positive sum, got {text!r}")
        return [w / total for w in raw], "--weights"
    tokens = []
    for b in branches:
        m = b / "manifest.json"
        try:
            tokens.append(json.loads(m.read_text()).get("tokens_seen") if m.is_file() else None)
        except ValueError:
            tokens.append(None)
    if all(isinstance(t, (int, float)) and t > 0 for t in tokens):
        total = float(sum(tokens))
        return [t / total for t in tokens], "token counts from the branch manifests"
    k = len(branches)
    return [1.0 / k] * k, "uniform"


def _params(args: argparse.Namespace, op) -> dict:
    params = {}
    for key, flag in FLAGS.items():
        value = getattr(args, key)
        if value is None:
            continue
        if key not in op.params:
            raise MeritError(f"{flag} does not apply to --method {op.name}")
        params[key] = value
    return op.resolve_params(params, key=FLAGS.get)


def mergekit_yaml(branches: list[Path], weights: list[float], method: str, params: dict, base: Path | None,
                  dtype: str | None) -> str:
    """The mergekit config that computes the same merge (exactly for linear methods; see notes in it)."""
    from merit.merge.checkpoint import resolve

    op = resolve(method)
    lines = [f"# merit merge --method {method}: the equivalent mergekit config (mergekit-yaml THIS_FILE OUT)"]
    if op.mergekit == "linear":
        lines.append("# equal to merit's result up to fp32 rounding (merit accumulates branch by branch)")
    elif op.mergekit == "task_arithmetic":
        lines.append("# equal to merit's result up to fp32 rounding")
    elif op.mergekit == "model_stock":
        lines.append("# equal to merit's result up to fp32 rounding where the task vectors' mean cosine is ≥ 0"
                     " (merit clamps it at 0); mergekit ignores the weights, as merit does")
    else:
        lines.append("# same family, not bit-equal: mergekit elects signs on weighted task vectors and divides"
                     " by the agreeing weights (merit: PEFT kernels, see merit.merge.operators);")
        lines.append("# dare in mergekit draws other random masks and rescales to the L1 norm")
    lines.append(f"merge_method: {op.mergekit}")
    if op.needs_base and base is not None:
        lines.append(f"base_model: {json.dumps(str(base))}")
    lines.append("models:")
    for b, w in zip(branches, weights):
        if op.mergekit == "model_stock":
            lines.append(f"  - model: {json.dumps(str(b))}")
            continue
        p = {"weight": round(w, 12)}
        if "density" in params:
            p["density"] = params["density"]
        lines.append(f"  - model: {json.dumps(str(b))}")
        lines.append(f"    parameters: {json.dumps(p)}")
    glob: dict = {}
    if op.mergekit == "linear":
        glob["normalize"] = True
    elif op.mergekit == "task_arithmetic":
        glob.update({"normalize": False, "lambda": params.get("lam", 1.0)})
    elif op.mergekit == "model_stock":
        glob["filter_wise"] = False  # one angle per tensor, as merit
    else:
        glob.update({"normalize": op.mergekit != "dare_linear", "lambda": params.get("lam", 1.0)})
        if "rescale" in params:
            glob["rescale"] = bool(params["rescale"])
    lines.append(f"parameters: {json.dumps(glob)}")
    from merit.merge.safetensors_io import floating_dtype

    lines.append("dtype: float32")  # merit accumulates in fp32
    out_dtype = dtype or floating_dtype(branches[0])
    if out_dtype is not None:
        lines.append(f"out_dtype: {out_dtype}")  # merit writes the inputs' dtype unless --dtype
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Run ``merit merge``; user errors raise MeritError (exit 2 through ``merit.cli.main``)."""
    from merit import artifacts, plugins
    from merit.merge.checkpoint import merge_checkpoints, resolve

    op = resolve(args.method)
    if not args.export_only:
        artifacts.check_output_dir(args.out)
    if args.export_mergekit is not None:
        artifacts.check_output_file(args.export_mergekit, "--export-mergekit")
        if not op.mergekit:
            raise MeritError(f"--export-mergekit: mergekit has no method equivalent to {op.name}; "
                             "merge with merit, or export one of: "
                             + ", ".join(m for m in plugins.names("merge") if resolve(m).mergekit))
    branches = list(args.checkpoints)
    weights, source = _weights(args.weights, branches)
    params = _params(args, op)
    if args.export_only and args.export_mergekit is None:
        raise MeritError("--export-only needs --export-mergekit FILE")
    if args.export_mergekit is not None:
        if op.needs_base and args.base is None:
            raise MeritError(f"--method {op.name} works on task vectors θ_k − θ(0): give θ(0) with --base")
        args.export_mergekit.parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_text(args.export_mergekit, mergekit_yaml(branches, weights, op.name, params, args.base,
                                                                 args.dtype))
        print(f"mergekit config: {args.export_mergekit}", file=sys.stderr)
        if args.export_only:
            return 0
    if args.out.exists() and not args.overwrite:
        raise MeritError(f"{args.out}: already exists; choose another --out or pass --overwrite")
    manifest = {"key": artifacts.fingerprint("merge", op.name, [str(b) for b in branches], weights, params,
                                             args.dtype),
                "operator": op.name, "params": params, "weights": weights, "weights_from": source,
                "branches": [str(b) for b in branches], "base": str(args.base) if args.base else None}
    info = merge_checkpoints(branches, weights, op, args.out, base=args.base, params=params, dtype=args.dtype,
                             shard_size=args.shard_size, allow_different_base=args.allow_different_base,
                             device=args.device, workers=args.workers, manifest=manifest)
    gb = info["bytes_read"] / 1e9
    print(f"merged {len(branches)} checkpoints with {op.name}, weights {[round(w, 4) for w in weights]} ({source}): "
          f"{info['tensors']} tensors ({info['parameters']:,} parameters) into {args.out} "
          f"[{info['shards']} shard(s)] in {info['seconds']:.2f} s ({gb / max(info['seconds'], 1e-9):.2f} GB/s read, "
          f"{info['cpu_seconds']:.2f} CPU-s)")
    return 0
