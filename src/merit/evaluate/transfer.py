"""Transfer sets (``eval.transfer``): sources outside the training mixture, scored for every checkpoint.

The paper's claim is about benchmarks the branches never trained on; in-mixture held-out lines show
what each method learned, transfer sets what it kept and how it generalises. A transfer source that is
also a training source (same name or same data) would score training data as transfer, so it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from merit.config import RunConfig
from merit.data import formats
from merit.data.formats import Reader, ReadSpec
from merit.errors import ConfigError


@dataclass(frozen=True)
class TransferSource:
    name: str
    spec: ReadSpec

    def reader(self) -> Reader:
        return formats.open_reader(self.spec)


def transfer_sources(cfg: RunConfig, run_dir: Path, training: list) -> list[TransferSource]:
    """The configured transfer sources (empty without ``eval.transfer``), checked against the mixture's
    ``training`` sources (``merit.data.mixture.Source``). The built-in ones are generated into
    ``run_dir/eval/transfer-data`` first."""
    t = cfg.eval.transfer
    if t is None:
        return []
    if t.builtin is not None:
        found = _builtin(cfg, Path(run_dir) / "eval" / "transfer-data", {s.name for s in training})
        key = "eval.transfer.builtin"
    elif t.dir is not None:
        found, key = folder_sources(Path(t.dir), t.include), "eval.transfer.dir"
    else:
        found, key = [], "eval.transfer.sources"
        for i, s in enumerate(t.sources or []):
            path = Path(s.eval or s.train)
            split = s.eval_split if s.eval else s.split
            columns = tuple(sorted((s.columns or {}).items()))
            conditions = tuple((c, tuple(v if isinstance(v, list) else [v])) for c, v in sorted((s.filter or {}).items()))
            found.append(TransferSource(s.name, ReadSpec(path, s.format, columns, split, conditions, s.max_rows,
                                                         s.image_root, f"eval.transfer.sources[{i}]")))
    if not found:
        raise ConfigError(f"{key}: no transfer sources")
    _check_disjoint(found, training, key)
    return found


def folder_sources(root: Path, include: list[str] | None) -> list[TransferSource]:
    if not root.is_dir():
        raise ConfigError(f"eval.transfer.dir: {root} is not a folder; give a folder of <source>.jsonl files")
    folder = root / "eval" if (root / "eval").is_dir() else root
    names = formats.source_names(folder)
    if include is not None:
        missing = [n for n in include if n not in names]
        if missing:
            raise ConfigError(f"eval.transfer.include: {missing} not in {folder}")
        names = list(dict.fromkeys(include))
    return [TransferSource(n, ReadSpec(formats.source_path(folder, n), key="eval.transfer")) for n in names]


def _check_disjoint(found: list[TransferSource], training: list, key: str) -> None:
    names = {s.name for s in training}
    seen = set()
    for s in found:
        if s.name in seen:
            raise ConfigError(f"{key}: transfer source {s.name!r} given twice")
        seen.add(s.name)
        if s.name in names:
            raise ConfigError(f"{key}: {s.name!r} is also a training source; a transfer set must lie outside "
                              "the mixture (drop it from one of them)")
    train_files = {formats.content_sha256(s.train): s.name for s in training}
    for s in found:
        if s.spec.path.exists() and formats.content_sha256(s.spec.path) in train_files:
            raise ConfigError(f"{key}: {s.name!r} ({s.spec.path}) holds the same data as training source "
                              f"{train_files[formats.content_sha256(s.spec.path)]!r}; a transfer set must lie "
                              "outside the mixture")


def _builtin(cfg: RunConfig, folder: Path, training: set[str]) -> list[TransferSource]:
    """Excluded target tasks (their eval split, as the mixture would draw it) and θ(0)'s warm-up tasks
    (fresh prompts, none of which θ(0)'s warm-up trained on)."""
    from merit.data.builtin import TASKS, WARMUP_TASKS, builtin_mixture, make_split
    from merit.data.jsonl import write_examples

    b = cfg.eval.transfer.builtin
    if cfg.mixture.builtin is None or cfg.mixture.builtin.suite != "text":
        raise ConfigError("eval.transfer.builtin: goes with the built-in text mixture (mixture.builtin)")
    unknown = [n for n in b.tasks if n not in TASKS]
    if unknown:
        raise ConfigError(f"eval.transfer.builtin.tasks: unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    warmup = list(WARMUP_TASKS) if b.warmup_tasks == "all" else list(b.warmup_tasks)
    unknown = [n for n in warmup if n not in WARMUP_TASKS]
    if unknown:
        raise ConfigError(f"eval.transfer.builtin.warmup_tasks: unknown task(s) {unknown}; known: "
                          f"{', '.join(WARMUP_TASKS)}")
    names = b.tasks + [f"warmup.{n}" for n in warmup]
    trained = [n for n in b.tasks if n in training]
    if trained:  # checked before any file is generated
        raise ConfigError(f"eval.transfer.builtin.tasks: {trained} are also training sources; a transfer set must "
                          "lie outside the mixture (add them to mixture.builtin.exclude)")
    paths = {n: folder / f"{n}.jsonl" for n in names}
    if not all(p.exists() for p in paths.values()):
        for n in b.tasks:
            write_examples(paths[n], make_split(TASKS[n], 0, b.eval_per_task, cfg.seed)[1])
        if warmup:
            # θ(0)'s warm-up drew its examples with the preset's seed; draw fresh prompts and drop any it trained on.
            seen = builtin_mixture(warmup, cfg.prepare.examples_per_task, 1, cfg.seed, warmup=True)
            for n in warmup:
                trained = {ex["messages"][0]["content"] for ex in seen[n][0]}
                try:
                    fresh = make_split(WARMUP_TASKS[n], 0, b.eval_per_task * 2, f"transfer-{cfg.seed}")[1]
                except ValueError as e:  # a task whose input space is too small for that many prompts
                    raise ConfigError(f"eval.transfer.builtin.eval_per_task: {e}") from None
                kept = [ex for ex in fresh if ex["messages"][0]["content"] not in trained][: b.eval_per_task]
                write_examples(paths[f"warmup.{n}"], kept)
    return [TransferSource(n, ReadSpec(paths[n], key="eval.transfer.builtin")) for n in names]
