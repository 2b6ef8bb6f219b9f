"""What a run will cost, from numbers alone: per-GPU memory of training, time from FLOPs, disk, and how
small a difference the evaluation can resolve. Pure functions; ``merit.plan.summary`` feeds them.

Memory (per GPU of a branch of ``gpus`` processes), counting what training keeps alive:

- States, by precision. The Trainer's mixed precision keeps trainable parameters in fp32 and autocasts
  matmuls (DeepSpeed keeps a 16-bit copy plus an fp32 master in its optimizer — the same 16 bytes):
  fp32 / bf16 / fp16: 4 (weights) + 4 (gradients) + 8 (AdamW m, v) = 16 B per trainable parameter;
  bf16-pure: 2 + 2 + 4 = 8 B. Frozen parameters: 2 B (bf16) or 4 B (fp32).
- Sharding: ``ddp`` none; ``zero2`` (DeepSpeed ZeRO-2): gradients and optimizer state / G and a 2-byte
  working copy of the weights on every GPU; ``zero3`` / ``fsdp``: everything / G.
- Activations per token per decoder layer, the tensors autograd keeps in a Llama/Qwen2 layer under
  autocast (fp32 residual stream, bf16 matmul inputs/outputs, fused attention without the L×L matrix):
  ≈ 28·h + 8·I + 8·kv bytes (h hidden, I MLP width, kv the K/V width); twice that in fp32. With
  gradient checkpointing: the fp32 layer input (4·h) per layer, plus one layer recomputed. Frozen towers
  in front of the trained part (a VLM's vision encoder) keep no activations.
- Logits: tokens × vocab × 4 B, three live copies (fp32 logits, log-softmax, their gradient).
- A fixed runtime overhead (CUDA context, allocator slack), 1.5 GB.

Checked against measured peaks of SmolLM2-135M training on CPU: within −7 % … +16 %
(benchmarks/train_results.md).

Time: training costs ≈ (2·Ψ + 4·Ψ_trainable) FLOPs per token (forward over every parameter; backward
computes activation and weight gradients of the trained part only), + 2·Ψ with gradient checkpointing,
at a sustained fraction of the hardware's peak (``MFU``). Estimates, labelled as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1e9
RUNTIME_BYTES = 1.5 * GB
# Sustained fraction of peak: ~35-45% is what well-tuned LLM fine-tuning reaches on A100/H100 (Megatron,
# DeepSpeed reports); generation is memory-bound and reaches far less.
TRAIN_MFU = 0.35
GENERATE_MFU = 0.03


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float
    half_tflops: float  # dense bf16/fp16 tensor-core peak (fp16 only on V100)
    fp32_tflops: float  # without TF32
    bf16: bool = True
    sustained: float | None = None  # an effective rate already measured (CPU): used instead of peak × MFU


HARDWARE = {
    "a100-80gb": Hardware("A100-80GB", 80 * GB, 312, 19.5),
    "a100-40gb": Hardware("A100-40GB", 40 * GB, 312, 19.5),
    "h100-80gb": Hardware("H100-80GB (SXM)", 80 * GB, 989, 67),
    "v100-32gb": Hardware("V100-32GB", 32 * GB, 125, 15.7, bf16=False),
    "v100-16gb": Hardware("V100-16GB", 16 * GB, 125, 15.7, bf16=False),
    "l40s-48gb": Hardware("L40S-48GB", 48 * GB, 362, 91.6),
}
# CPU training on this project's machines (2 AMD EPYC cores with AMX): SmolLM2-135M sustained ~130
# tokens/s in bf16 mixed precision and ~100 in fp32 (benchmarks/train_results.md), i.e. ~0.05 and
# ~0.04 TFLOP/s per core at (2 + 4)·134.5M FLOPs per token.
CPU_TFLOPS_PER_CORE = {"half": 0.05, "fp32": 0.04}


def cpu(cores: int, memory_bytes: float) -> Hardware:
    half = CPU_TFLOPS_PER_CORE["half"] * cores
    fp32 = CPU_TFLOPS_PER_CORE["fp32"] * cores
    return Hardware(f"CPU ({cores} cores)", memory_bytes, half, fp32, sustained=1.0)


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need of θ(0): parameter counts and, when known, the decoder's shape."""

    params: int
    trainable: int
    hidden: int | None = None
    layers: int | None = None
    intermediate: int | None = None
    kv_width: int | None = None
    vocab: int | None = None
    frozen_bytes_per_param: int = 2

    @property
    def frozen(self) -> int:
        return self.params - self.trainable


def decoder_shape(hidden: int, layers: int, intermediate: int, vocab: int, heads: int, kv_heads: int, tied: bool,
                  frozen: float = 0.0) -> ModelShape:
    """A Llama/Qwen2-style decoder (plus ``frozen`` parameters, e.g. a vision tower) from its config numbers,
    the decoder trained in full."""
    kv = hidden // heads * kv_heads
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * intermediate + 2 * hidden
    lm = layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden
    return ModelShape(params=int(lm + frozen), trainable=int(lm), hidden=hidden, layers=layers,
                      intermediate=intermediate, kv_width=kv, vocab=vocab)


# For planning before a checkpoint is at hand (merit plan --assume-model): the numbers of the models'
# config.json files (Qwen2.5-VL: its language model; vision tower + merger ≈ 0.67B parameters, frozen).
KNOWN_MODELS = {
    "smollm2-135m": lambda: decoder_shape(576, 30, 1536, 49152, 9, 3, True),
    "qwen2.5-vl-3b": lambda: decoder_shape(2048, 36, 11008, 151936, 16, 2, True, frozen=0.67e9),
    "qwen2.5-vl-7b": lambda: decoder_shape(3584, 28, 18944, 152064, 28, 4, False, frozen=0.67e9),
}


def activation_bytes_per_token(m: ModelShape, precision: str, checkpointing: bool) -> float | None:
    if None in (m.hidden, m.layers, m.intermediate, m.kv_width):
        return None
    half = 28 * m.hidden + 8 * m.intermediate + 8 * m.kv_width
    per_layer = half if precision != "fp32" else 2 * half
    if checkpointing:
        return m.layers * 4 * m.hidden + per_layer  # stored layer inputs + one layer recomputed
    return m.layers * per_layer


def train_memory(m: ModelShape, *, precision: str = "bf16", sharding: str = "ddp", gpus: int = 1,
                 micro_batch: int = 1, seq_len: int = 2048, checkpointing: bool = False) -> dict[str, float | None]:
    """Bytes per GPU by component and their ``total`` (None where the model's shape is unknown)."""
    pure = precision == "bf16-pure"
    weights_b, grads_b, optim_b = (2, 2, 4) if pure else (4, 4, 8)
    shard_all = sharding in ("zero3", "fsdp")
    div = gpus if sharding in ("zero2", "zero3", "fsdp") else 1
    if sharding == "zero2":
        weights = m.trainable * 2  # the working copy stays whole; the fp32 master is optimizer state
        optim = m.trainable * (optim_b + (0 if pure else 4)) / div
    else:
        weights = m.trainable * weights_b / (gpus if shard_all else 1)
        optim = m.trainable * optim_b / div
    grads = m.trainable * grads_b / div
    frozen = m.frozen * m.frozen_bytes_per_param / (gpus if shard_all else 1)
    tokens = micro_batch * seq_len
    per_token = activation_bytes_per_token(m, precision, checkpointing)
    acts = None if per_token is None else tokens * per_token
    logits = None if m.vocab is None else tokens * m.vocab * 4 * 3
    parts = {"weights": weights, "frozen": frozen, "grads": grads, "optimizer": optim, "activations": acts,
             "logits": logits, "runtime": RUNTIME_BYTES}
    parts["total"] = sum(v for v in parts.values() if v is not None)
    return parts


def gradient_memory(m: ModelShape, *, micro_batch: int, seq_len: int, checkpointing: bool) -> float:
    """Peak bytes of gradient estimation: θ(0) and the trainable gradients in fp32, fp32 activations."""
    per_token = activation_bytes_per_token(m, "fp32", checkpointing) or 0
    logits = (m.vocab or 0) * 4 * 3
    return m.params * 4 + m.trainable * 4 + micro_batch * seq_len * (per_token + logits) + RUNTIME_BYTES


def train_flops(m: ModelShape, tokens: float, checkpointing: bool = False) -> float:
    return tokens * (2 * m.params + 4 * m.trainable + (2 * m.params if checkpointing else 0))


def seconds(flops: float, hw: Hardware, devices: int = 1, half: bool = True, mfu: float = TRAIN_MFU) -> float:
    """Wall seconds of ``flops`` on ``devices`` of ``hw`` (half: bf16/fp16 tensor cores, else fp32)."""
    peak = (hw.half_tflops if half else hw.fp32_tflops) * 1e12
    rate = peak * (hw.sustained if hw.sustained is not None else mfu)
    return flops / (rate * devices)


def min_detectable_difference(eval_items: list[int], z: float = 1.96) -> float | None:
    """The smallest difference of two methods' macro accuracy (in points, 0-100) that a 95% interval
    separates from zero, with per-source accuracies near 50% (the widest binomial case) and each method
    scored on the same ``eval_items`` per source: z·√2·SE, SE = √(Σ_t p(1−p)/n_t) / T."""
    items = [n for n in eval_items if n > 0]
    if not items:
        return None
    se = math.sqrt(sum(0.25 / n for n in items)) / len(items)
    return 100 * z * math.sqrt(2) * se


def human_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "unknown"
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"
