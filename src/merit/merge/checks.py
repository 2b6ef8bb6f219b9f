"""Integrity checks that run before a merge writes anything.

Everything here reads only headers, ``config.json`` and branch manifests, so a bad set of inputs fails in
a fraction of a second. The result is a :class:`MergePlan`: what to merge, from where, into which dtype.
NaN/Inf values can only be seen by reading the data; the engine checks them while it merges, before
the output folder appears.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from merit.errors import MeritError
from merit.merge.operators import MergeOperator
from merit.merge.safetensors_io import FLOAT_NAMES, TensorEntry, checkpoint_tensors

OUTPUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
TIED_OUTPUT = "lm_head.weight"  # the output embedding a tied checkpoint may or may not store
_EMBEDDING_HINTS = ("embed", "wte", "lm_head", "word_embeddings", "output.weight")


@dataclass
class MergePlan:
    """Checked inputs of one merge."""

    branches: list[Path]
    branch_tensors: list[dict[str, TensorEntry]]
    base: Path | None
    base_tensors: dict[str, TensorEntry] | None
    names: list[str]  # tensors to merge and write, in the first branch's file order
    out_dtypes: dict[str, str]  # name -> safetensors dtype of the output
    side_source: Path | None  # folder whose config / tokenizer files are copied
    theta0_hash: str | None
    dropped: list[str] = field(default_factory=list)  # tied aliases not written (the loader re-ties them)

    @property
    def largest_numel(self) -> int:
        return max((self.branch_tensors[0][n].numel for n in self.names), default=0)


def _read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise MeritError(f"{path}: not valid JSON; fix or re-save the checkpoint's config") from None


def _config_value(cfg: dict, key: str):
    # Multimodal configs keep the language model's settings in text_config.
    if key in cfg:
        return cfg[key]
    return (cfg.get("text_config") or {}).get(key)


def _is_tied(folder: Path | None, cfg: dict) -> bool:
    value = _config_value(cfg, "tie_word_embeddings")
    if value is not None or folder is None or not cfg:
        return bool(value)
    # Not written in config.json: the model class's default decides (Llama: False, many others: True).
    try:
        from transformers import AutoConfig

        return bool(getattr(AutoConfig.from_pretrained(folder), "tie_word_embeddings", False))
    except Exception:  # unknown model type: treat as untied, so lm_head is merged like any tensor
        return False


def _theta0_hash_of_base(base: Path) -> str:
    manifest = Path(base) / "manifest.json"
    if manifest.is_file():  # a merit θ(0) stage folder records its hash
        h = json.loads(manifest.read_text()).get("hash")
        if h:
            return h
    from merit.models.loading import checkpoint_hash  # the identity branches record; reads every byte

    return checkpoint_hash(base)


def _branch_theta0_hashes(branches: Sequence[Path]) -> dict[Path, str]:
    hashes = {}
    for b in branches:
        path = Path(b) / "manifest.json"
        if path.is_file():
            try:
                h = json.loads(path.read_text()).get("theta0_hash")
            except ValueError:
                raise MeritError(f"{path}: not valid JSON; fix or delete the branch manifest") from None
            if h:
                hashes[Path(b)] = h
    return hashes


def check_theta0(branches: Sequence[Path], base: Path | None, allow_different_base: bool) -> str | None:
    """The θ(0) hash every branch manifest names (None when no branch has a manifest)."""
    hashes = _branch_theta0_hashes(branches)
    if not hashes:
        return None
    first, h0 = next(iter(hashes.items()))
    if not allow_different_base:
        for b, h in hashes.items():
            if h != h0:
                raise MeritError(f"{b}/manifest.json: θ(0) hash {h[:12]}… differs from {first}'s {h0[:12]}…; "
                                 "merge branches trained from the same θ(0) (or pass --allow-different-base)")
        if base is not None:
            hb = _theta0_hash_of_base(base)
            if hb != h0:
                raise MeritError(f"{base}: its hash {hb[:12]}… is not the θ(0) hash {h0[:12]}… that {first}/"
                                 "manifest.json names; pass the branches' θ(0) as --base "
                                 "(or pass --allow-different-base)")
    return h0


def _compare_keys(ref: Path, ref_keys: set[str], other: Path, keys: set[str]) -> None:
    if keys == ref_keys:
        return
    extra, missing = sorted(keys - ref_keys), sorted(ref_keys - keys)
    if missing:
        what = f"lacks {len(missing)} tensor(s) that {ref} has, e.g. {missing[0]!r}"
    else:
        what = f"has {len(extra)} tensor(s) that {ref} lacks, e.g. {extra[0]!r}"
    raise MeritError(f"{other}: {what}; merge checkpoints of the same architecture")


def _vocab_error(a: Path, va, b: Path, vb, where: str) -> MeritError:
    return MeritError(f"vocabulary sizes differ: {a} has {va} and {b} has {vb} ({where}); merge checkpoints "
                      "that share θ(0)'s tokenizer, or resize their embeddings to the same vocabulary first")


def inspect(branches: Sequence[Path], op: MergeOperator, weights: Sequence[float] | None, *,
            base: Path | None = None, dtype: str | None = None, allow_different_base: bool = False) -> MergePlan:
    """Check the inputs of a merge and plan it; a one-line MeritError naming the file and tensor otherwise."""
    branches = [Path(b) for b in branches]
    base = Path(base) if base is not None else None
    if len(branches) < 2:
        raise MeritError(f"give at least two checkpoints to merge (got {len(branches)})")
    if len({b.resolve() for b in branches}) != len(branches):
        raise MeritError("the same checkpoint is given twice; give each branch once (use --weights to weigh)")
    if op.needs_base and base is None:
        raise MeritError(f"merge operator {op.name!r} works on task vectors θ_k − θ(0): give θ(0) with --base")
    if weights is not None:
        if len(weights) != len(branches):
            raise MeritError(f"--weights: {len(weights)} weights for {len(branches)} checkpoints; give one each")
        if not all(math.isfinite(float(w)) for w in weights):
            raise MeritError(f"--weights: weights must be finite numbers, got {list(weights)}")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise MeritError(f"--dtype: unknown dtype {dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")

    inputs = branches + ([base] if base is not None else [])
    configs = {p: _read_config(p) if p.is_dir() else {} for p in inputs}
    vocab = {p: _config_value(c, "vocab_size") for p, c in configs.items() if _config_value(c, "vocab_size")}
    if len(set(vocab.values())) > 1:
        (a, va), *rest = vocab.items()
        b, vb = next((p, v) for p, v in rest if v != va)
        raise _vocab_error(a, va, b, vb, "config.json vocab_size")

    tensors = {p: checkpoint_tensors(p) for p in inputs}
    side_source = next((p for p in ([base] if base else []) + branches if p.is_dir()), None)

    # Tied input/output embeddings: write the embedding once and let the loader re-tie lm_head. A tied
    # checkpoint may store lm_head.weight or not; both kinds merge together.
    dropped = []
    if any(TIED_OUTPUT in t for t in tensors.values()) and side_source is not None \
            and _is_tied(side_source, configs.get(side_source, {})):
        for t in tensors.values():
            t.pop(TIED_OUTPUT, None)
        dropped.append(TIED_OUTPUT)

    ref = branches[0]
    ref_t = tensors[ref]
    for p in inputs[1:]:
        _compare_keys(ref, set(ref_t), p, set(tensors[p]))
    for name, e in ref_t.items():
        for p in inputs[1:]:
            o = tensors[p][name]
            if o.shape != e.shape:
                if len(o.shape) == len(e.shape) and o.shape[1:] == e.shape[1:] and o.shape[0] != e.shape[0] \
                        and any(h in name for h in _EMBEDDING_HINTS):
                    raise _vocab_error(ref, e.shape[0], p, o.shape[0], f"rows of {name}")
                raise MeritError(f"{p}: tensor {name!r} has shape {list(o.shape)} but {ref} has {list(e.shape)}; "
                                 "merge checkpoints of the same architecture")
            if o.dtype != e.dtype:
                raise MeritError(f"{p}: tensor {name!r} is {o.dtype} but {ref} has {e.dtype}; convert the "
                                 "checkpoints to one dtype first (the merge computes in fp32 either way)")
        if e.dtype.startswith("F8"):
            raise MeritError(f"{ref}: tensor {name!r} is {e.dtype}; fp8 checkpoints cannot be averaged "
                             "without their scales: dequantize them first")
    # Last: with a --base that is not a merit θ(0) folder this hashes every byte of it.
    theta0_hash = check_theta0(branches, base, allow_different_base)
    out_dtypes = {n: (OUTPUT_DTYPES[dtype] if dtype and e.dtype in FLOAT_NAMES else e.dtype) for n, e in ref_t.items()}
    return MergePlan(branches=branches, branch_tensors=[tensors[b] for b in branches], base=base,
                     base_tensors=tensors[base] if base is not None else None, names=list(ref_t),
                     out_dtypes=out_dtypes, side_source=side_source, theta0_hash=theta0_hash, dropped=dropped)
