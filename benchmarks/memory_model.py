"""Per-GPU memory of one branch's full fine-tuning, from the architecture, precision and sharding.

    .venv/bin/python benchmarks/memory_model.py            # the table for SmolLM2-135M, 3B and 7B
    .venv/bin/python benchmarks/memory_model.py --json

A model, not a measurement: it counts bytes of what training keeps alive, per GPU of a branch of G GPUs.

- Parameters Ψ (trainable Ψ_t, frozen Ψ_f), from the architecture (embeddings, attention with grouped
  KV heads, SwiGLU MLP, norms; a vision tower as a parameter count).
- States, by precision (the Trainer's mixed precision keeps trainable parameters in fp32, autocasts
  matmuls; DeepSpeed keeps a bf16/fp16 copy and an fp32 master inside its optimizer — same 16 bytes):
  fp32 / bf16 / fp16 mixed: 4 (weights) + 4 (grads) + 8 (AdamW m, v) = 16 B per trainable parameter;
  bf16-pure: 2 + 2 + 4 = 8 B. Frozen parameters: their dtype's size (2 B in bf16).
- Sharding over G GPUs: ``ddp`` none; ``zero2`` (DeepSpeed ZeRO-2): gradients and optimizer state / G,
  a 2-byte working copy of the weights on every GPU; ``zero3`` / ``fsdp``: everything / G.
- Activations per token per decoder layer, counting the tensors autograd keeps in a Llama/Qwen2 layer
  under autocast (fp32 residual stream, bf16 matmul inputs/outputs, fused attention without the L×L
  matrix): ≈ 28·h + 8·I + 8·kv bytes (h hidden, I MLP width, kv the K/V width); in fp32 twice that.
  With gradient checkpointing: the fp32 layer input only (4·h) per layer, plus one layer recomputed.
- Logits: tokens × vocab × 4 B, three live copies (fp32 logits, log-softmax, their gradient).
- A fixed runtime overhead (CUDA context and allocator slack on a GPU; the interpreter, torch and the
  data on a CPU), 1.5 GB.

``benchmarks/train_bench.py`` checks it against the peak RSS of SmolLM2-135M training on this CPU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

GB = 1e9
RUNTIME_BYTES = 1.5 * GB


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool
    vision_params: float = 0.0  # frozen in MERIT's setting (vision tower + projector)

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def lm_params(self) -> float:
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
        embeddings = self.vocab * h * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings + h


# Architecture numbers from the models' config.json files (Qwen2.5-VL: the language model's numbers; its
# vision tower + merger is about 0.67B parameters).
ARCHS = {
    "smollm2-135m": Arch("SmolLM2-135M-Instruct", 576, 30, 1536, 49152, 9, 3, True),
    "qwen2.5-vl-3b": Arch("Qwen2.5-VL-3B-Instruct", 2048, 36, 11008, 151936, 16, 2, True, 0.67e9),
    "qwen2.5-vl-7b": Arch("Qwen2.5-VL-7B (merit base VLM)", 3584, 28, 18944, 152064, 28, 4, False, 0.67e9),
}


def activation_bytes_per_token(arch: Arch, precision: str, checkpointing: bool) -> float:
    half = 28 * arch.hidden + 8 * arch.intermediate + 8 * arch.kv_width
    per_layer = half if precision != "fp32" else 2 * half
    if checkpointing:
        return arch.layers * 4 * arch.hidden + per_layer  # stored layer inputs + one layer recomputed
    return arch.layers * per_layer


def memory(arch: Arch, *, precision: str = "bf16", sharding: str = "ddp", gpus: int = 1, micro_batch: int = 1,
           seq_len: int = 2048, checkpointing: bool = False) -> dict[str, float]:
    """Bytes per GPU by component, and their total."""
    trainable, frozen = arch.lm_params, arch.vision_params
    pure = precision == "bf16-pure"
    weights_b, grads_b, optim_b = (2, 2, 4) if pure else (4, 4, 8)
    shard_all = sharding in ("zero3", "fsdp")
    shard_states = sharding in ("zero2", "zero3", "fsdp")
    div = gpus if shard_states else 1
    if sharding == "zero2":
        weights = trainable * 2  # the working copy stays whole; the fp32 master is part of the optimizer state
        optim = trainable * (optim_b + (0 if pure else 4)) / div
    else:
        weights = trainable * weights_b / (gpus if shard_all else 1)
        optim = trainable * optim_b / div
    grads = trainable * grads_b / div
    frozen_bytes = frozen * 2 / (gpus if shard_all else 1)
    tokens = micro_batch * seq_len
    acts = tokens * activation_bytes_per_token(arch, precision, checkpointing)
    logits = tokens * arch.vocab * 4 * 3
    parts = {"weights": weights, "frozen": frozen_bytes, "grads": grads, "optimizer": optim, "activations": acts,
             "logits": logits, "runtime": RUNTIME_BYTES}
    parts["total"] = sum(parts.values())
    return parts


# The settings the reference configs use (configs/*.yaml), and what fits.
SCENARIOS = [
    ("smollm2-135m", "CPU (this machine)", dict(precision="fp32", micro_batch=8, seq_len=192)),
    ("smollm2-135m", "CPU (this machine)", dict(precision="bf16", micro_batch=8, seq_len=192)),
    ("qwen2.5-vl-3b", "8x V100-32GB", dict(precision="fp16", sharding="ddp", gpus=8, micro_batch=4, seq_len=2048)),
    ("qwen2.5-vl-3b", "8x V100-32GB", dict(precision="fp16", sharding="zero2", gpus=8, micro_batch=4, seq_len=2048,
                                          checkpointing=True)),
    ("qwen2.5-vl-3b", "8x V100-32GB", dict(precision="fp16", sharding="zero2", gpus=8, micro_batch=2, seq_len=2048,
                                          checkpointing=True)),
    ("qwen2.5-vl-3b", "8x V100-32GB", dict(precision="fp16", sharding="zero3", gpus=8, micro_batch=4, seq_len=2048,
                                          checkpointing=True)),
    ("qwen2.5-vl-7b", "8x A100-80GB", dict(precision="bf16", sharding="ddp", gpus=8, micro_batch=2, seq_len=2048)),
    ("qwen2.5-vl-7b", "8x A100-80GB", dict(precision="bf16-pure", sharding="ddp", gpus=8, micro_batch=2,
                                          seq_len=2048)),
    ("qwen2.5-vl-7b", "8x A100-80GB", dict(precision="bf16", sharding="zero2", gpus=8, micro_batch=2, seq_len=2048,
                                          checkpointing=True)),
    ("qwen2.5-vl-7b", "8x A100-80GB", dict(precision="bf16", sharding="zero3", gpus=8, micro_batch=2, seq_len=2048,
                                          checkpointing=True)),
]
CAPACITY = {"8x V100-32GB": 32 * GB, "8x A100-80GB": 80 * GB, "CPU (this machine)": 24 * GB}


def table() -> list[dict]:
    rows = []
    for key, hardware, kw in SCENARIOS:
        arch = ARCHS[key]
        m = memory(arch, **kw)
        rows.append({"model": arch.name, "hardware": hardware, "params_B": round((arch.lm_params + arch.vision_params)
                                                                                 / 1e9, 3),
                     **{k: v for k, v in kw.items()}, **{k: round(v / GB, 2) for k, v in m.items()},
                     "fits": m["total"] <= CAPACITY[hardware]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = table()
    if args.json:
        print(json.dumps({"archs": {k: asdict(a) for k, a in ARCHS.items()}, "rows": rows}, indent=1))
        return
    print("| model | hardware | precision | sharding | micro-batch × len | ckpt | weights | grads | optimizer "
          "| activations | logits | total GB/GPU | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['hardware']} | {r['precision']} | {r.get('sharding', 'ddp')} | "
              f"{r['micro_batch']} × {r['seq_len']} | {'yes' if r.get('checkpointing') else 'no'} | "
              f"{r['weights'] + r['frozen']:.1f} | {r['grads']:.1f} | {r['optimizer']:.1f} | {r['activations']:.1f} | "
              f"{r['logits']:.1f} | {r['total']:.1f} | {'yes' if r['fits'] else 'no'} |")


if __name__ == "__main__":
    main()
