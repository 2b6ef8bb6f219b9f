"""Merging LoRA branches in weight space.

Each branch k holds adapters (A_k, B_k) on some linear layers; its full weight there is
W_k = W0 + s_k · B_k A_k with s_k = alpha / r (alpha / sqrt(r) with rsLoRA). The merge applies the
operator to the dense W_k, i.e. for the token-weighted average W̄ = W0 + Σ_k w_k s_k B_k A_k. Averaging
A and B separately would instead give (Σ w_k B_k)(Σ w_k A_k), which mixes cross terms B_i A_j of
different branches — a known pitfall. Weights without adapters are copied from θ(0) bit for bit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merit import artifacts
from merit.errors import MeritError
from merit.merge.checkpoint import SIDE_FILES
from merit.merge.operators import tensor_seed
from merit.models.loading import DTYPES

_ADAPTER_FILE = "adapter_model.safetensors"


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").exists()


def lora_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """{base weight name: s · B A} for one adapter folder (fp32)."""
    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(folder / _ADAPTER_FILE))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        base = key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
        out[base] = scale * (b.float() @ a.float())  # (out, r) @ (r, in) -> (out, in)
    if not out:
        raise MeritError(f"{folder}: adapter holds no LoRA weights")
    return out


def merge_lora(theta0: Path, adapters: Sequence[Path], weights: Sequence[float], op: Callable, out: Path,
               dtype: str | None = None, params: Mapping[str, Any] | None = None) -> dict:
    """Write a dense checkpoint at ``out``: θ(0) with each adapted weight replaced by op over the branches'
    dense weights W0 + ΔW_k (computed in fp32), floating tensors in ``dtype`` (default: θ(0)'s).
    ``params``: the operator's hyper-parameters (a seeded operator's seed is derived per tensor, as in
    the streaming engine)."""
    params = dict(params or {})
    target = DTYPES[dtype] if dtype else None
    deltas = [lora_deltas(a) for a in adapters]
    # Adapter names are in-memory names; some checkpoints (Qwen2.5-VL) save older keys: map them.
    from merit.models.vlm import saved_names

    rename = saved_names(theta0, sorted(deltas[0]))
    deltas = [{rename.get(k, k): v for k, v in d.items()} for d in deltas]
    keys = set(deltas[0])
    for a, d in zip(adapters[1:], deltas[1:]):
        if set(d) != keys:
            raise MeritError(f"{a}: adapts other layers than {adapters[0]}; branches must share one LoRA config")
    files = sorted(Path(theta0).glob("*.safetensors"))
    merged, changed = {}, 0
    for f in files:
        with safe_open(str(f), framework="pt") as reader:
            for key in reader.keys():
                w0 = reader.get_tensor(key)
                if key in keys:
                    dense = [w0.float() + d[key] for d in deltas]
                    # Task-vector operators (ties, dare, ...) also need θ(0)'s tensor.
                    p = {**params, "seed": tensor_seed(int(params["seed"]), key)} if "seed" in params else params
                    out_t = (op(dense, weights, base=w0.float(), **p) if getattr(op, "needs_base", False)
                             else op(dense, weights, **p))
                    if not torch.isfinite(out_t).all():
                        raise MeritError(f"{key}: the merge produced NaN or Inf")
                    merged[key] = out_t.to(target or w0.dtype).contiguous()
                    changed += 1
                else:
                    merged[key] = w0.to(target) if target is not None and w0.is_floating_point() else w0
    missing = keys - set(merged)
    if missing:
        raise MeritError(f"{adapters[0]}: adapted weights {sorted(missing)[:3]} are not in θ(0) {theta0}")
    with artifacts.atomic_dir(out) as tmp:
        save_file(merged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in SIDE_FILES:
            if (Path(theta0) / name).exists():
                shutil.copy2(Path(theta0) / name, tmp / name)
    return {"lora_weights_merged": changed, "tensors": len(merged), "accumulate_dtype": "float32",
            "out_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in merged.values() if t.is_floating_point()})}
