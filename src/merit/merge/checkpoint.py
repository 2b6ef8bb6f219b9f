"""Streaming, bounded-memory merge of Hugging Face safetensors checkpoints.

How it runs:

1. ``checks.inspect`` reads headers, configs and manifests and refuses bad inputs before anything is
   written (keys, shapes, dtypes, vocabulary, θ(0) hash, tied embeddings).
2. The output layout is planned from the headers alone: shard files (``model.safetensors``, or
   ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above ``shard_size``) are
   created with their final headers in a temporary folder, so each merged tensor is written to its
   final offset as soon as it is ready and no output shard is ever held in memory.
3. A few worker threads (one per CPU, at most 4) take *units* in order: a slice of one tensor for
   elementwise operators (token-weighted, uniform, task-arithmetic: a 256K-element slice of the K
   inputs plus its fp32 accumulator stays in cache), the whole tensor otherwise. A worker maps just
   the unit's byte range of each input (no copy; unmapped when the unit is done, so the inputs never
   pile up in resident memory), merges (on the GPU when there is one), checks for NaN/Inf, casts and
   ``pwrite``s. Read-ahead: when a worker takes a unit, the kernel is asked (``posix_fadvise``
   WILLNEED) to start reading the tensor a few units ahead, so from a cold disk the next tensors load
   while the current ones merge, and the workers overlap one another's reads and arithmetic. A byte
   budget caps what all units in flight hold at (K + 2) × the largest tensor in fp32, or at one unit
   when a single unit needs more (TIES / DARE hold ~4K fp32 copies of the tensor they merge; the SVD
   operators star / tsv / iso-c / iso-cts hold the K task vectors, their factors and the result).
4. Config, tokenizer and generation config are copied from θ(0) (or the first branch), and the folder
   is renamed into place (``artifacts.atomic_dir``): a merge that dies leaves only a hidden
   ``.<name>.tmp-*`` folder, which the next merge into the same folder removes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from merit import artifacts
from merit.errors import MeritError
from merit.merge import checks
from merit.merge import safetensors_io as st
from merit.merge.operators import MergeOperator, tensor_seed

DEFAULT_SHARD_SIZE = 5 * 10**9  # bytes, as transformers' save_pretrained
CHUNK_ELEMENTS = 1 << 18  # elementwise units: K slices of 256K elements + an fp32 accumulator stay in L2/L3

# Files copied from θ(0) (or the first branch) so the result loads like any checkpoint.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
              "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
_TORCH_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True)
class _Unit:
    name: str
    start: int  # element range [start, stop) of the flattened tensor
    stop: int
    whole: bool


class _Budget:
    """Bytes that units in flight may hold; a unit waits until its bytes fit (one unit always runs)."""

    def __init__(self, limit: int):
        self.limit, self.used, self.peak = limit, 0, 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        with self._cv:
            while self.used + n > self.limit:
                self._cv.wait()
            self.used += n
            self.peak = max(self.peak, self.used)
        return n

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete ``.<name>.tmp-*`` folders left beside ``out`` by merges that were killed."""
    out = Path(out)
    stale = sorted(out.parent.glob(f".{out.name}.tmp-*")) if out.parent.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def resolve(op: str | MergeOperator | Callable[..., torch.Tensor]) -> MergeOperator:
    """A MergeOperator from a registered name (``merit ls``), an operator, or a bare ``f(tensors, weights)``
    callable (then treated as a whole-tensor operator that needs no θ(0))."""
    if isinstance(op, MergeOperator):
        return op
    if isinstance(op, str):
        from merit import plugins

        return plugins.get("merge", op, field="--method")
    return MergeOperator(op)


def merge_checkpoints(branches: Sequence[Path], weights: Sequence[float] | None,
                      op: str | MergeOperator | Callable, out: Path, *, base: Path | None = None,
                      params: Mapping[str, Any] | None = None, dtype: str | None = None,
                      shard_size: int | str = DEFAULT_SHARD_SIZE, allow_different_base: bool = False,
                      device: str | torch.device | None = None, workers: int | None = None,
                      chunk_elements: int = CHUNK_ELEMENTS, manifest: dict | None = None,
                      progress: bool | None = None) -> dict:
    """Merge the checkpoint folders ``branches`` with operator ``op`` into a new checkpoint folder ``out``.

    Args:
        branches: K checkpoint folders (single or sharded safetensors) or ``.safetensors`` files.
        weights: one weight per branch, passed to the operator as is (the pipeline's token weights sum
            to 1); None means uniform 1/K.
        op: a registered operator name, a MergeOperator, or a bare ``f(tensors, weights)`` callable.
        out: the folder to create; replaced in one rename when complete.
        base: θ(0), for operators on task vectors and for the θ(0)-hash check; also the source of config
            and tokenizer files when given.
        params: operator hyper-parameters (``density``, ``lam``, ``rescale``, ``seed``, ``eta``, ``alpha``,
            ``rank_fraction``, ``common_space_fraction``; each operator takes its own, see ``docs/merging.md``).
        dtype: output dtype of floating tensors (``float32``, ``bfloat16``, ``float16``); default: the inputs'.
        shard_size: the most tensor bytes per output shard (``5GB``, ``500MB`` or an int).
        allow_different_base: merge even if the branches' manifests name different θ(0) hashes.
        device: where the arithmetic runs; default CUDA when available, else CPU.
        workers: threads reading and merging concurrently (default: the usable CPUs, at most 4).
        chunk_elements: slice length for elementwise operators on the CPU.
        manifest: if given, written as ``manifest.json`` inside ``out`` last.
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        What a manifest records: tensor and parameter counts, shards, bytes, seconds, memory bound.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    operator = resolve(op)
    op_params = operator.resolve_params(params)
    plan = checks.inspect(branches, operator, weights, base=base, dtype=dtype,
                          allow_different_base=allow_different_base)
    out = Path(out)
    if out.resolve() in {p.resolve() for p in plan.branches + ([plan.base] if plan.base else [])}:
        raise MeritError(f"{out}: the output folder is one of the inputs; choose another --out")
    k = len(plan.branches)
    weights = [float(w) for w in weights] if weights is not None else [1.0 / k] * k
    try:
        device = torch.device(device) if device is not None else _default_device()
    except RuntimeError:
        raise MeritError(f"--device: unknown device {device!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MeritError("--device cuda: no CUDA GPU is available here; use --device cpu")
    workers = max(1, workers or min(4, _cpus()))
    chunk = chunk_elements if device.type == "cpu" and operator.elementwise else None

    names = plan.names
    ref = plan.branch_tensors[0]
    out_specs = [(n, plan.out_dtypes[n], ref[n].shape) for n in names]
    shards = st.plan_shards(out_specs, st.parse_size(shard_size))
    where = {n: s for s in shards for n in s.names}
    units = list(_units(names, ref, chunk))
    n_inputs = k + (1 if operator.needs_base else 0)
    estimate = {u: _unit_bytes(u, n_inputs, ref[u.name].dtype, operator) for u in units}
    largest_fp32 = plan.largest_numel * 4
    budget = _Budget(max(max(estimate.values(), default=0),
                         (k + 2) * largest_fp32 if operator.linear else 0))

    remove_stale_temporaries(out)
    bytes_in = sum(e.nbytes for n in names for e in _inputs_of(plan, n, operator.needs_base))
    bar = _progress(bytes_in, progress)
    # Parallelism comes from the workers (one unit each); torch's own intra-op threads would only
    # compete with them for the same cores, and its thread barriers stall badly on a loaded machine.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with artifacts.atomic_dir(out) as tmp, _Files(plan, tmp, shards) as files:
            merged = _run_units(
                units, workers,
                lambda u: _merge_unit(u, plan, operator, weights, op_params, device, files, where, budget,
                                      estimate[u], bar),
                prefetch=lambda u: files.prefetch(_inputs_of(plan, u.name, operator.needs_base), u),
                ahead=2 * workers)
            if len(shards) > 1:
                weight_map = {n: where[n].filename for n in names}
                artifacts.write_json(tmp / st.INDEX, {"metadata": {"total_size": sum(s.size for s in shards),
                                                                   "total_parameters": merged["parameters"]},
                                                      "weight_map": dict(sorted(weight_map.items()))})
            _copy_side_files(plan.side_source, tmp, dtype)
            if manifest is not None:
                artifacts.write_json(tmp / artifacts.MANIFEST, manifest)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    seconds = time.perf_counter() - t0
    return {"tensors": len(names), "parameters": merged["parameters"], "shards": len(shards),
            "bytes_read": bytes_in, "bytes_written": sum(s.size for s in shards), "seconds": round(seconds, 3),
            "cpu_seconds": round(time.process_time() - cpu0, 3),
            "theta0_hash": plan.theta0_hash, "tied_not_written": plan.dropped,
            "memory_bound_bytes": budget.limit, "peak_unit_bytes": budget.peak, "device": device.type,
            # What the operators compute in, whatever the tensors are written in.
            "accumulate_dtype": "float32",
            "out_dtypes": sorted({st.TORCH_NAMES.get(d, d) for d in plan.out_dtypes.values()})}


# ---------------------------------------------------------------------------------------------- planning


def _inputs_of(plan: checks.MergePlan, name: str, with_base: bool) -> list[st.TensorEntry]:
    entries = [t[name] for t in plan.branch_tensors]
    if with_base:
        entries.append(plan.base_tensors[name])
    return entries


def _units(names: Sequence[str], ref: dict[str, st.TensorEntry], chunk: int | None) -> Iterator[_Unit]:
    for n in names:
        numel = ref[n].numel
        if chunk is None or numel <= chunk or ref[n].dtype not in st.FLOAT_NAMES:
            yield _Unit(n, 0, numel, True)
        else:
            for start in range(0, numel, chunk):
                yield _Unit(n, start, min(start + chunk, numel), False)


def _unit_bytes(u: _Unit, n_inputs: int, dtype: str, op: MergeOperator) -> int:
    n = u.stop - u.start
    # Inputs as stored, plus fp32 working tensors: accumulator, upcast input, cast output for linear
    # operators; for whole-tensor ones a generous 4K + 4 (TIES/DARE hold the K task vectors and ≈ 4
    # temporaries, the SVD operators the task vectors and their factors).
    work = 3 if op.linear else 4 * n_inputs + 4
    return n * (n_inputs * st.itemsize(dtype) + work * 4)


def _progress(total: int, enabled: bool | None):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="merge", file=sys.stderr, leave=False,
                disable=(not sys.stderr.isatty()) if enabled is None else not enabled)


# --------------------------------------------------------------------------------------------- execution


class _Files:
    """Open input files for reading and output shards (headers written, sized) for writing."""

    def __init__(self, plan: checks.MergePlan, tmp: Path, shards: list[st.OutShard]):
        self.plan, self.tmp, self.shards = plan, tmp, shards
        self.inputs: dict[Path, int] = {}
        self.outputs: dict[str, int] = {}

    def __enter__(self) -> "_Files":
        tensors = self.plan.branch_tensors + ([self.plan.base_tensors] if self.plan.base_tensors else [])
        for path in sorted({e.file for t in tensors for e in t.values()}):
            self.inputs[path] = os.open(path, os.O_RDONLY)
        for s in self.shards:
            fd = os.open(self.tmp / s.filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            st.write_header(fd, s, {"format": "pt"})
            self.outputs[s.filename] = fd
        return self

    def __exit__(self, *exc) -> None:
        for fd in [*self.inputs.values(), *self.outputs.values()]:
            os.close(fd)

    def prefetch(self, entries: Sequence[st.TensorEntry], u: _Unit) -> None:
        """At a tensor's first unit, ask the kernel to start reading the whole tensor from every input.

        Asynchronous: the pages land in the page cache (not in this process) while the workers merge
        the tensors before it; nearly free when the files are cached.
        """
        if u.start == 0 and hasattr(os, "posix_fadvise"):
            for e in entries:
                os.posix_fadvise(self.inputs[e.file], e.start, e.nbytes, os.POSIX_FADV_WILLNEED)

    def view(self, e: st.TensorEntry, u: _Unit) -> torch.Tensor:
        """``u``'s slice of tensor ``e``, mapped from the file without a copy.

        Each unit maps only its own byte range, privately (copy-on-write, so an operator that writes
        into its inputs cannot touch the file). The tensor holds the only reference to the mapping,
        which is unmapped when the tensor is freed: the process never keeps more of the inputs mapped
        than the units in flight, so they do not pile up in its resident memory.
        """
        size = st.itemsize(e.dtype)
        n = u.stop - u.start
        begin, nbytes = e.start + u.start * size, n * size
        if nbytes == 0:
            return torch.empty(e.shape if u.whole else (0,), dtype=st.DTYPES[e.dtype])
        lo = begin - begin % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(self.inputs[e.file], begin + nbytes - lo, access=mmap.ACCESS_COPY, offset=lo)
        t = torch.frombuffer(mapped, dtype=st.DTYPES[e.dtype], count=n, offset=begin - lo)
        return t.reshape(e.shape) if u.whole else t


def _run_units(units: list[_Unit], workers: int, work: Callable[[_Unit], int],
               prefetch: Callable[[_Unit], None] | None = None, ahead: int = 4) -> dict:
    """Run ``work`` over ``units`` on ``workers`` threads, in order; the first error stops all and is raised.

    Taking unit i also prefetches unit i + ``ahead``, so its bytes are in memory by the time a worker
    gets to it.
    """
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = [0] * workers
    position = [0]

    def loop(i: int) -> None:
        while not stop.is_set():
            with lock:
                j = position[0]
                position[0] += 1
            if j >= len(units):
                return
            try:
                if prefetch is not None and j + ahead < len(units):
                    prefetch(units[j + ahead])
                counts[i] += work(units[j])
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(e)
                stop.set()

    if prefetch is not None:
        for u in units[:ahead]:
            prefetch(u)
    threads = [threading.Thread(target=loop, args=(i,), daemon=True, name=f"merit-merge-{i}") for i in range(workers)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # a timed join keeps Ctrl-C responsive
    except BaseException:
        stop.set()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]
    return {"parameters": sum(counts)}


def _finite(t: torch.Tensor) -> bool:
    # One reduction instead of isfinite(t).all() (a bool tensor and a second pass, ~30x slower here):
    # any NaN/Inf makes the sum NaN/Inf. A sum that overflows on finite values is confirmed elementwise.
    if t.numel() == 0:
        return True
    if math.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).item()):
        return True
    return bool(torch.isfinite(t).all())


def _nonfinite_input(plan: checks.MergePlan, tensors: list[torch.Tensor], base: torch.Tensor | None) -> str | None:
    for p, t in zip(plan.branches, tensors):
        if not _finite(t):
            return str(p)
    if base is not None and not _finite(base):
        return str(plan.base)
    return None


def _merge_unit(u: _Unit, plan: checks.MergePlan, op: MergeOperator, weights: list[float], params: dict,
                device: torch.device, files: _Files, where: dict[str, st.OutShard], budget: _Budget,
                estimate: int, bar) -> int:
    held = budget.acquire(estimate)
    try:
        entries = _inputs_of(plan, u.name, op.needs_base)
        loaded = [files.view(e, u) for e in entries]
        tensors, base = (loaded[:-1], loaded[-1]) if op.needs_base else (loaded, None)
        if entries[0].dtype not in st.FLOAT_NAMES:
            # Integer / bool buffers (e.g. position ids) are not averaged: they must agree and are copied.
            for p, t in zip(plan.branches[1:], tensors[1:]):
                if not torch.equal(t, tensors[0]):
                    raise MeritError(f"{p}: non-float tensor {u.name!r} differs from {plan.branches[0]}'s; "
                                     "such tensors are copied, not averaged: make them equal first")
            result = tensors[0]
        else:
            if op.seeded:
                params = {**params, "seed": tensor_seed(int(params["seed"]), u.name)}
            dev = [t.to(device) for t in tensors]
            merged = op(dev, weights, base=base.to(device) if base is not None else None, **params)
            if tuple(merged.shape) != tuple(dev[0].shape):
                raise RuntimeError(f"merge operator {op.name!r} returned shape {tuple(merged.shape)} for "
                                   f"{u.name!r} of shape {tuple(dev[0].shape)}")
            result = merged.to(st.DTYPES[plan.out_dtypes[u.name]]).to("cpu").contiguous()
            del dev, merged
            # A linear operator turns any NaN/Inf input into a NaN/Inf output, so checking the output
            # suffices; sparsifying ones may drop the bad entry, so their inputs are checked too.
            bad_out = not _finite(result)
            if bad_out or not op.linear:
                culprit = _nonfinite_input(plan, tensors, base)
                if culprit is not None:
                    raise MeritError(f"{culprit}: tensor {u.name!r} contains NaN or Inf; the checkpoint is "
                                     "corrupt or diverged: replace it or leave it out of the merge")
            if bad_out:
                raise MeritError(f"tensor {u.name!r}: the merge result is NaN or Inf in "
                                 f"{plan.out_dtypes[u.name]}; use --dtype float32 or other weights/parameters")
        shard = where[u.name]
        st.pwrite_from(files.outputs[shard.filename], result,
                       shard.data_start + shard.specs[u.name][2] + u.start * result.element_size())
        bar.update(sum(e.nbytes for e in entries) * (u.stop - u.start) // max(entries[0].numel, 1))
        return u.stop - u.start
    finally:
        budget.release(held)


def _copy_side_files(source: Path | None, tmp: Path, dtype: str | None) -> None:
    if source is None:
        return
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    cfg_path = tmp / "config.json"
    if dtype is not None and cfg_path.is_file():
        # The config states the weights' dtype; keep it true when --dtype changed it.
        cfg = json.loads(cfg_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg or key == "dtype":
                cfg[key] = dtype
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
