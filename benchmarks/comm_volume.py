"""Communication volume: MERIT (K checkpoints, once) vs joint data-parallel training (an all-reduce every step).

    python benchmarks/comm_volume.py [--batch 128] [--link-gbit 100]

Pure arithmetic (no model is loaded); the assumptions are the constants below and are discussed in
docs/communication.md, which records this script's output.
"""

from __future__ import annotations

import argparse

GB = 1e9

# Trainable parameters: the language model (decoder + embeddings), the part the paper trains; the vision
# tower and projector are frozen and never communicated. Counts from the Qwen2.5 technical report.
SETUPS = [
    # name, trainable params, examples in one epoch, GPUs, K values the paper uses
    ("3B: Qwen2.5-VL-3B, 136 Vision-FLAN tasks, 8×V100", 3.09e9, 136 * 1000, 8, (4, 8)),
    ("7B: Qwen2.5-7B LM, 1.6M examples, 8×A100", 7.61e9, 1_600_000, 8, (4, 8)),
]
GRAD_BYTES = 2  # fp16 (V100) / bf16 (A100) gradients in the all-reduce
WEIGHT_BYTES = 2  # a branch checkpoint in bf16


def ring_allreduce_bytes(n_gpus: int, grad_bytes: float) -> float:
    """Bytes each GPU sends (and receives) in one ring all-reduce: reduce-scatter + all-gather."""
    return 2 * (n_gpus - 1) / n_gpus * grad_bytes


def table(batch: int, link_gbit: float) -> str:
    link = link_gbit / 8 * GB  # bytes/s
    lines = [
        f"global batch {batch} examples/step, gradients {GRAD_BYTES} B/param, checkpoints {WEIGHT_BYTES} B/param, "
        f"link {link_gbit:g} Gbit/s",
        "",
        "| setup | steps / epoch | joint: per GPU per step | joint: per GPU per epoch | joint: all GPUs per epoch "
        "| joint: link time / epoch | MERIT K=4 / K=8: checkpoints once | ratio (all GPUs / K=8) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, params, examples, gpus, ks in SETUPS:
        steps = -(-examples // batch)
        per_step = ring_allreduce_bytes(gpus, params * GRAD_BYTES)
        per_gpu = per_step * steps
        total = per_gpu * gpus
        merit = {k: k * params * WEIGHT_BYTES for k in ks}
        lines.append(
            f"| {name} | {steps:,} | {per_step / GB:.1f} GB | {per_gpu / 1e12:.1f} TB | {total / 1e12:.0f} TB | "
            f"{per_step / link * steps / 3600:.1f} h | {merit[4] / GB:.0f} GB / {merit[8] / GB:.0f} GB | "
            f"{total / merit[8]:,.0f}× |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--link-gbit", type=float, default=100.0)
    args = p.parse_args()
    print(table(args.batch, args.link_gbit))


if __name__ == "__main__":
    main()
