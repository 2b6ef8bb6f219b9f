"""Time and peak memory of the pieces of ``merit diagnose``: setup, one LMC path, one HVP (curvature).

    .venv/bin/python benchmarks/diagnose_bench.py [--run RUN] [--alphas 21] [--no-lmc] [--max-per-source N]
                                                  [--hidden H --layers L]

Without ``--run`` it first builds a small run (4 built-in tasks, r = 1, no random baseline) in a
temporary folder: on the tiny preset (~10 s on 2 cores), or with ``--hidden`` on a random-init Llama of
that width (to see memory scale with the model). Then, in this process:

- setup: load the model from the merge and read the held-out and training examples (:class:`Evaluator`);
- one LMC path: branch 0 → branch 1 at ``--alphas`` points (each point = set the weights in place
  tensor by tensor from the two lazily opened checkpoints, then the results.json loss);
- one HVP: (θ_0 − θ̄)ᵀ H (θ_0 − θ̄) at θ̄ by double backward over the calibration examples;
- the same number by a second difference (``--curvature second-difference``): the calibration loss at
  θ̄ ± 0.1·(θ_0 − θ̄), two forward passes (θ̄'s own loss is one the diagnosis has anyway), and how far
  it is from the HVP's.

Peak memory is the process's resident high-water mark (``VmHWM``), reset before each piece through
``/proc/self/clear_refs`` where Linux allows it, so each row's peak is that piece's own; it counts the
file pages of the memory-mapped checkpoints read (page cache the kernel can drop), so the anonymous
peak (``RssAnon``, sampled every 2 ms) is given beside it. "model" is the bytes of the parameters, to
read the peaks against (the design: one model plus a few tensors for a
path, plus about three parameter-sized fp32 buffers and one batch's graph for an HVP). Prints one
Markdown table; record it in benchmarks/diagnose_results.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """Peak anonymous resident memory (RssAnon: what the process allocated, not file pages of memory-
    mapped checkpoints, which the kernel can drop), sampled every 2 ms in a thread during a piece."""

    def __enter__(self):
        import threading

        self.peak, self._stop = rss_mb("RssAnon"), threading.Event()
        self.before = self.peak
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mb("RssAnon"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb("RssAnon"))


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux ≥ 4.0: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def tiny_run(root: Path, hidden: int | None, layers: int) -> Path:
    """The tiny preset, or (with ``hidden``) a random-init Llama of that width as θ(0) to see how memory scales."""
    import yaml

    from merit.cli import main

    model: dict = {"preset": "tiny"}
    if hidden is not None:
        from merit.models.tiny import build_model, build_tokenizer, save_checkpoint

        tok = build_tokenizer(["user\nhello world", "assistant\nHELLO WORLD",
                               "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 +-*/=.,:"] * 20,
                              vocab_size=300)
        save_checkpoint(build_model(tok, seed=0, hidden=hidden, layers=layers), tok, root / "theta0")
        model = {"path": str(root / "theta0")}
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "diagnose-bench", "model": model,
        "mixture": {"builtin": {"tasks": ["to_upper", "to_lower", "add", "reverse"], "train_per_task": 24,
                                "eval_per_task": 8}, "max_length": 64},
        "prepare": {"examples_per_task": 16, "epochs": 1, "batch_size": 16},
        "split": {"r": 1}, "baselines": {"random": False},
        "grads": {"calibration_size": 8, "batch_size": 8}, "train": {"batch_size": 8, "learning_rate": 1e-3},
        "eval": {"max_per_source": 8, "batch_size": 16, "max_new_tokens": 4},
    }))
    assert main(["run", str(cfg), "--out", str(root / "run")]) == 0
    return root / "run"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a finished run folder (default: build the tiny one)")
    p.add_argument("--alphas", type=int, default=21)
    p.add_argument("--no-lmc", action="store_true", help="skip the LMC path (the curvature pieces only)")
    p.add_argument("--max-per-source", type=int)
    p.add_argument("--hidden", type=int, help="build θ(0) as a random Llama of this width (default: the tiny preset)")
    p.add_argument("--layers", type=int, default=4, help="with --hidden: its layers (default 4)")
    args = p.parse_args()

    import torch

    from merit.diagnose import landscape as L
    from merit.diagnose.evaluator import Evaluator
    from merit.diagnose.inputs import LazyCheckpoint, inspect_run

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or tiny_run(Path(tmp), args.hidden, args.layers)
        folder = inspect_run(run)
        rows = []
        resettable = reset_peak()
        start, before = time.perf_counter(), rss_mb("VmRSS")
        with AnonPeak() as anon:
            ev = Evaluator(folder, args.max_per_source)
            ev.load(LazyCheckpoint(folder.main.merged))  # touch every weight: a lazily mapped load costs here
        rows.append(("setup (model + examples)", time.perf_counter() - start, before, rss_mb("VmHWM"), anon))
        params = sum(t.numel() * t.element_size() for t in ev.state.values()) / 2**20
        examples = sum(map(len, ev.heldout.values()))

        a, b = (LazyCheckpoint(x) for x in folder.main.branches[:2])
        alphas = L.alpha_grid(args.alphas)
        losses = []
        if not args.no_lmc:
            reset_peak()
            start, before = time.perf_counter(), rss_mb("VmRSS")
            with AnonPeak() as anon:
                for alpha in alphas:
                    ev.set_weights(lambda n: L.interpolate(a[n], b[n], alpha))
                    losses.append(ev.loss())
            rows.append((f"one LMC path ({len(alphas)} points)", time.perf_counter() - start, before,
                         rss_mb("VmHWM"), anon))

        merged = LazyCheckpoint(folder.main.merged)
        ev.load(merged)
        d = {n: a[n].float() - merged[n].float() for n in ev.floating}
        reset_peak()
        start, before = time.perf_counter(), rss_mb("VmRSS")
        with AnonPeak() as anon:
            curvature = ev.curvature(d)
        rows.append(("one HVP (curvature)", time.perf_counter() - start, before, rss_mb("VmHWM"), anon))
        del d

        eps = 0.1
        ev.load(merged)
        at = ev.loss(ev.calibration)
        reset_peak()
        start, before = time.perf_counter(), rss_mb("VmRSS")
        ends = []
        with AnonPeak() as anon:
            for alpha in (eps, -eps):
                ev.set_weights(lambda n: L.interpolate(merged[n], a[n], alpha))
                ends.append(ev.loss(ev.calibration))
            second = L.second_difference_curvature(ends[0], at, ends[1], eps)
        rows.append((f"one second difference (2 losses, ε = {eps})", time.perf_counter() - start, before,
                     rss_mb("VmHWM"), anon))

    print(f"machine: {machine()}")
    built = f"built, hidden {args.hidden} × {args.layers} layers" if args.hidden else "built, tiny preset"
    lmc = f"barrier {L.barrier(alphas, losses).height:.4g}; " if losses else ""
    print(f"run: {built if args.run is None else args.run}; model {params:.1f} MiB of weights; "
          f"{examples} held-out examples, {len(ev.calibration)} sources; {lmc}curvature: HVP {curvature:.6g}, "
          f"second difference {second:.6g} ({(second - curvature) / curvature:+.2%}); peak reset: {resettable}")
    if torch.cuda.is_available():
        print(f"cuda max allocated: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    print()
    print("| piece | seconds | RSS before (MiB) | peak RSS (MiB) | peak − before (MiB) | anonymous peak − before (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, seconds, before, peak, anon in rows:
        print(f"| {name} | {seconds:.2f} | {before:.0f} | {peak:.0f} | {peak - before:.0f} | {anon.peak - anon.before:.0f} |")


if __name__ == "__main__":
    main()
