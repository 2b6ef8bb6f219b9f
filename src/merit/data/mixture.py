"""Stage 0, the mixture: resolve the sources, validate every line, tokenize, count.

Writes ``mixture/manifest.json`` with each source's sample count s_t and token budget n_t (all tokens of
its training examples after truncation; ``loss_tokens`` counts the assistant tokens alone). For a
vision-language θ(0) examples are tokenized through its processor (``merit.data.vision``) and each source
also records ``text_tokens``, ``image_tokens`` (image placeholders) and ``images``; n_t follows
``mixture.token_count`` (``all``: placeholders included, the paper's tokens; ``text``: without them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from merit import artifacts
from merit.config import MixtureConfig
from merit.data.chat import Tokenized, TemplateError, tokenize_conversation
from merit.data.jsonl import read_examples, write_examples
from merit.errors import ConfigError, DataError

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class Source:
    name: str
    train: Path
    eval: Path | None


def resolve_sources(cfg: MixtureConfig, run_dir: Path, seed: int) -> list[Source]:
    """The mixture's sources in a fixed order. The built-in mixture is generated into the run folder
    first, so that every later stage reads files the same way."""
    if cfg.builtin is not None:
        from merit.data.builtin import TASKS, builtin_mixture

        vision = cfg.builtin.suite == "vision"
        if vision:  # synthetic image tasks: pictures are drawn into the mixture folder with the JSONL files
            from merit.data.builtin_vision import TASKS
        names = cfg.builtin.tasks or list(TASKS)
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ConfigError(f"mixture.builtin.tasks: unknown task(s) {unknown}; known: {', '.join(TASKS)}")
        data_dir = Path(run_dir) / "mixture" / "data"
        sources = [Source(n, data_dir / "train" / f"{n}.jsonl", data_dir / "eval" / f"{n}.jsonl") for n in names]
        if not all(s.train.exists() and s.eval.exists() for s in sources):
            if vision:
                from merit.data.builtin_vision import write_vision_mixture

                mix = write_vision_mixture(data_dir, names, cfg.builtin.train_per_task, cfg.builtin.eval_per_task,
                                           seed=seed)
            else:
                mix = builtin_mixture(names, cfg.builtin.train_per_task, cfg.builtin.eval_per_task, seed=seed)
            for s in sources:
                write_examples(s.train, mix[s.name][0])
                write_examples(s.eval, mix[s.name][1])
        return sources
    if cfg.dir is not None:
        root = Path(cfg.dir)
        if not (root / "train").is_dir():
            raise DataError(f"{root}: mixture.dir must hold a train/ folder of <source>.jsonl files")
        found = sorted(p.stem for p in (root / "train").glob("*.jsonl"))
        if not found:
            raise DataError(f"{root / 'train'}: no .jsonl files")
        names = found
        if cfg.include is not None:
            missing = [n for n in cfg.include if n not in found]
            if missing:
                raise ConfigError(f"mixture.include: {missing} not in {root / 'train'}")
            names = list(dict.fromkeys(cfg.include))
        sources = []
        for n in names:
            ev = root / "eval" / f"{n}.jsonl"
            sources.append(Source(n, root / "train" / f"{n}.jsonl", ev if ev.exists() else None))
        return _checked(sources)
    return _checked(
        [Source(s.name, Path(s.train), Path(s.eval) if s.eval else None) for s in cfg.sources or []]
    )


def _checked(sources: list[Source]) -> list[Source]:
    seen = set()
    for i, s in enumerate(sources):
        if not _NAME.match(s.name):
            raise ConfigError(f"mixture.sources[{i}].name: {s.name!r} may use only letters, digits, '_', '.', '-'")
        if s.name in seen:
            raise ConfigError(f"mixture.sources[{i}].name: duplicate source {s.name!r}")
        seen.add(s.name)
    return sources


def read_source(source: Source, cfg: MixtureConfig) -> tuple[list[dict], list[dict]]:
    """Validated train and eval examples of one source, capped (first N lines; files are expected shuffled)."""
    train = read_examples(source.train, cfg.max_train_per_source)
    ev = read_examples(source.eval, cfg.max_eval_per_source) if source.eval else []
    return train, ev


def tokenize_examples(tokenizer, examples: list[dict], max_length: int, where: str) -> tuple[list[Tokenized], int, int]:
    """Tokenized examples plus (truncated count, skipped count). An example whose assistant tokens are all
    cut away by truncation is skipped: it would train on nothing."""
    from merit.data.vision import has_parts, tokenize_vision_conversation  # torch: imported when tokenizing

    out, truncated, skipped = [], 0, 0
    processor = getattr(tokenizer, "processor", None)  # a VLM's processor (merit.models.vlm.ProcessorTokenizer)
    for i, ex in enumerate(examples):
        try:
            if processor is not None:
                t = tokenize_vision_conversation(processor, ex["messages"], ex.get("images", []), max_length)
            elif has_parts(ex):
                raise DataError(f"{where} example {i + 1}: has images or content parts, but θ(0) is a text-only "
                                "model; use a vision-language checkpoint")
            else:
                t = tokenize_conversation(tokenizer, ex["messages"], max_length)
        except TemplateError as e:
            raise DataError(f"{where} example {i + 1}: {e}") from None
        if t.loss_tokens == 0:
            skipped += 1
            continue
        truncated += t.truncated
        out.append(t)
    return out, truncated, skipped


def all_truncated_message(path: Path) -> str:
    return f"{path}: every example lost its assistant tokens to truncation; raise mixture.max_length"


def build(run_dir: Path, cfg: MixtureConfig, sources: list[Source], tokenizer, key: str) -> dict:
    """Run the mixture stage: count s_t and n_t per source and write the manifest last."""
    stage = Path(run_dir) / "mixture"
    entries = []
    for s in sources:
        train, ev = read_source(s, cfg)
        toks, truncated, skipped = tokenize_examples(tokenizer, train, cfg.max_length, str(s.train))
        if not toks:
            raise DataError(all_truncated_message(s.train))
        entries.append(
            {
                "name": s.name,
                "train": str(s.train),
                "eval": str(s.eval) if s.eval else None,
                "train_sha256": artifacts.file_sha256(s.train),
                "eval_sha256": artifacts.file_sha256(s.eval) if s.eval else None,
                "samples": len(toks),
                "tokens": sum(len(t.input_ids) for t in toks),
                "loss_tokens": sum(t.loss_tokens for t in toks),
                "truncated": truncated,
                "skipped": skipped,
                "eval_samples": len(ev),
            }
        )
        if getattr(tokenizer, "processor", None) is not None:
            entries[-1].update(vision_token_counts(toks, cfg.token_count))
    extra = {"token_count": cfg.token_count} if getattr(tokenizer, "processor", None) is not None else {}
    return artifacts.write_manifest(
        stage,
        key,
        max_length=cfg.max_length,
        sources=entries,
        total_samples=sum(e["samples"] for e in entries),
        total_tokens=sum(e["tokens"] for e in entries),
        **extra,
    )


def vision_token_counts(toks: list[Tokenized], token_count: str) -> dict:
    """A VLM source's text and image-placeholder token counts, and its token budget n_t by
    ``mixture.token_count``: ``all`` (every token the model reads, image placeholders included — the
    paper's "tokens") or ``text`` (image placeholders left out)."""
    image = sum(getattr(t, "image_tokens", 0) for t in toks)
    total = sum(len(t.input_ids) for t in toks)
    return {"text_tokens": total - image, "image_tokens": image,
            "images": sum(len(getattr(t, "images", ())) for t in toks),
            "tokens": total if token_count == "all" else total - image}


def load_train(manifest: dict, names: list[str], tokenizer, cfg: MixtureConfig) -> list[Tokenized]:
    """Tokenized training examples of the named sources, in manifest order (what a branch trains on)."""
    out = []
    for e in manifest["sources"]:
        if e["name"] in names:
            ex = read_examples(e["train"], cfg.max_train_per_source)
            out += tokenize_examples(tokenizer, ex, cfg.max_length, e["train"])[0]
    return out
