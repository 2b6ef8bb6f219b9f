"""Stage 0, the mixture: resolve the sources, validate every line, tokenize, count.

Writes ``mixture/manifest.json`` with each source's sample count s_t and token budget n_t (all tokens of
its training examples after truncation; ``loss_tokens`` counts the assistant tokens alone). For a
vision-language θ(0) examples are tokenized through its processor (``merit.data.vision``) and each source
also records ``text_tokens``, ``image_tokens`` (image placeholders) and ``images``; n_t follows
``mixture.token_count`` (``all``: placeholders included, the paper's tokens; ``text``: without them).

Each source is tokenized once, into the token cache (``merit.data.tokens``: memory-mapped Arrow shards),
and the counts come from it; every later stage reads its tokens from there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from merit import artifacts
from merit.config import MixtureConfig, SourceConfig
from merit.data import formats, tokens
from merit.data.chat import Tokenized, TemplateError, tokenize_conversation
from merit.data.formats import Reader, ReadSpec
from merit.data.jsonl import write_examples
from merit.errors import ConfigError, DataError

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class Source:
    name: str
    train: Path
    eval: Path | None
    train_spec: ReadSpec | None = None  # how to read them (None: merit's chat JSONL, as given)
    eval_spec: ReadSpec | None = None

    def reader(self, side: str = "train") -> Reader:
        """The reader of the source's ``train`` or ``eval`` data (DataError on a file it cannot read)."""
        path, spec = (self.train, self.train_spec) if side == "train" else (self.eval, self.eval_spec)
        return formats.open_reader(spec or ReadSpec(path))


def _from_config(s: SourceConfig, key: str) -> Source:
    """A configured source with its read settings (the same for train and eval but the split)."""
    columns = tuple(sorted((s.columns or {}).items()))
    conditions = tuple((c, tuple(v if isinstance(v, list) else [v])) for c, v in sorted((s.filter or {}).items()))

    def spec(path: str, split: str | None) -> ReadSpec:
        return ReadSpec(Path(path), s.format, columns, split, conditions, s.max_rows, s.image_root, key)

    if s.eval is not None and Path(s.eval) == Path(s.train) and (s.eval_split or s.split) == s.split:
        raise ConfigError(f"{key}.eval: the same data as {key}.train; give another file or an eval_split")
    return Source(s.name, Path(s.train), Path(s.eval) if s.eval else None, spec(s.train, s.split),
                  spec(s.eval, s.eval_split) if s.eval else None)


def resolve_sources(cfg: MixtureConfig, run_dir: Path, seed: int) -> list[Source]:
    """The mixture's sources in a fixed order. The built-in mixture is generated into the run folder
    first, so that every later stage reads files the same way."""
    if cfg.builtin is not None:
        from merit.data.builtin import builtin_mixture

        vision = cfg.builtin.suite == "vision"
        if vision:  # synthetic image tasks: pictures are drawn into the mixture folder with the JSONL files
            from merit.data.builtin_vision import TASKS
        else:
            from merit.data.builtin import TASKS
        names = cfg.builtin.tasks or list(TASKS)
        for field, given in (("tasks", names), ("exclude", cfg.builtin.exclude)):
            unknown = [n for n in given if n not in TASKS]
            if unknown:
                raise ConfigError(f"mixture.builtin.{field}: unknown task(s) {unknown}; known: {', '.join(TASKS)}")
        names = [n for n in names if n not in cfg.builtin.exclude]
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
        found = formats.source_names(root / "train")
        if not found:
            raise DataError(f"{root / 'train'}: no sources (.jsonl, .json, .parquet files or dataset folders)")
        names = found
        if cfg.include is not None:
            missing = [n for n in cfg.include if n not in found]
            if missing:
                raise ConfigError(f"mixture.include: {missing} not in {root / 'train'}")
            names = list(dict.fromkeys(cfg.include))
        sources = []
        for n in names:
            train = formats.source_path(root / "train", n)
            ev = formats.source_path(root / "eval", n) if (root / "eval").is_dir() else None
            key = "mixture"  # a folder's sources share mixture.format
            sources.append(Source(n, train, ev, ReadSpec(train, cfg.format, key=key),
                                  ReadSpec(ev, cfg.format, key=key) if ev else None))
        return _checked(sources)
    return _checked([_from_config(s, f"mixture.sources[{i}]") for i, s in enumerate(cfg.sources or [])])


def _checked(sources: list[Source]) -> list[Source]:
    seen = set()
    for i, s in enumerate(sources):
        if not _NAME.match(s.name):
            raise ConfigError(f"mixture.sources[{i}].name: {s.name!r} may use only letters, digits, '_', '.', '-'")
        if s.name in seen:
            raise ConfigError(f"mixture.sources[{i}].name: duplicate source {s.name!r}")
        seen.add(s.name)
    return sources


def check_source(source: Source, cfg: MixtureConfig) -> str | None:
    """Validate every record of a source's train and eval data (the read caps applied), streamed: one
    record in memory at a time whatever the data's size. Returns where the first example with images or
    content parts is (None: text only), for the check against a text-only θ(0)."""
    from merit.data.vision import has_parts

    parts_at = None
    for side, limit in (("train", cfg.max_train_per_source), ("eval", cfg.max_eval_per_source)):
        if (source.train if side == "train" else source.eval) is None:
            continue
        reader = source.reader(side)
        count = 0
        for where, ex in formats.examples(reader, limit):
            count += 1
            if parts_at is None and has_parts(ex):
                parts_at = where
        if not count:
            what = "expected one JSON object per line" if reader.plain_jsonl else reader.describe()
            raise DataError(f"{reader.path}: no examples ({what})")
    return parts_at


def any_trainable(source: Source, cfg: MixtureConfig, tokenizer) -> bool:
    """Whether at least one training example keeps assistant tokens after truncation (stops at the first)."""
    for where, ex in formats.examples(source.reader(), cfg.max_train_per_source):
        if tokenize_example(tokenizer, ex, cfg.max_length, where).loss_tokens:
            return True
    return False


def tokenize_example(tokenizer, ex: dict, max_length: int, where: str) -> Tokenized:
    """One validated example's ids and assistant-only labels (through a VLM's processor when θ(0) has one)."""
    from merit.data.vision import has_parts, tokenize_vision_conversation  # torch: imported when tokenizing

    processor = getattr(tokenizer, "processor", None)  # a VLM's processor (merit.models.vlm.ProcessorTokenizer)
    try:
        if processor is not None:
            return tokenize_vision_conversation(processor, ex["messages"], ex.get("images", []), max_length)
        if has_parts(ex):
            raise DataError(f"{where}: has images or content parts, but θ(0) is a text-only model; use a "
                            "vision-language checkpoint")
        return tokenize_conversation(tokenizer, ex["messages"], max_length)
    except TemplateError as e:
        raise DataError(f"{where}: {e}") from None


def tokenize_examples(tokenizer, examples: list[dict], max_length: int, where: str) -> tuple[list[Tokenized], int, int]:
    """Tokenized examples plus (truncated count, skipped count), in memory (small samples: the plan, the
    built-in warm-up mixtures). An example whose assistant tokens are all cut away by truncation is
    skipped: it would train on nothing. The mixture's sources go through the token cache instead."""
    out, truncated, skipped = [], 0, 0
    for i, ex in enumerate(examples):
        t = tokenize_example(tokenizer, ex, max_length, f"{where} example {i + 1}")
        if t.loss_tokens == 0:
            skipped += 1
            continue
        truncated += t.truncated
        out.append(t)
    return out, truncated, skipped


def all_truncated_message(path: Path) -> str:
    return f"{path}: every example lost its assistant tokens to truncation; raise mixture.max_length"


def token_requests(run_dir: Path, cfg: MixtureConfig, sources: list[Source], tokenizer,
                   hashes: dict[str, str]) -> list[tokens.TokenRequest]:
    """Where each source's tokens are cached: ``mixture.cache_dir`` (shared between runs), else the run
    folder's ``mixture/tokens``; one folder per (file content, tokenizer, truncation)."""
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path(run_dir) / "mixture" / "tokens"
    identity = tokens.tokenizer_identity(tokenizer)
    return [tokens.request(s.name, s.reader(), root.absolute(), identity, hashes[s.name], cfg.max_length,
                           cfg.max_train_per_source) for s in sources]


def build(run_dir: Path, cfg: MixtureConfig, sources: list[Source], tokenizer, key: str,
          tokenizer_path: Path | None = None, trust_remote_code: bool = False,
          hashes: dict[str, str] | None = None) -> dict:
    """Run the mixture stage: tokenize every source into the token cache (once; see
    ``merit.data.tokens``), count s_t and n_t per source from it, and write the manifest last."""
    stage = Path(run_dir) / "mixture"
    # The train data's sha256 when the caller has them already (the stage key is made of them).
    hashes = hashes or {s.name: formats.content_sha256(s.train) for s in sources}
    requests = token_requests(run_dir, cfg, sources, tokenizer, hashes)
    # Worker processes load the tokenizer from θ(0)'s folder (``tokenizer_path``) themselves.
    tokens.build(requests, tokenizer, num_proc=cfg.num_proc, tokenizer_path=tokenizer_path,
                 trust_remote_code=trust_remote_code)
    vision = getattr(tokenizer, "processor", None) is not None
    entries = []
    for s, req in zip(sources, requests):
        index = tokens.read_index(req)
        if index is None:
            raise RuntimeError(f"{req.folder}: token cache incomplete right after tokenizing")
        if not index["rows"]:
            raise DataError(all_truncated_message(s.train))
        evaluated = s.reader("eval") if s.eval else None
        entries.append(
            {
                "name": s.name,
                "train": str(s.train),
                "eval": str(s.eval) if s.eval else None,
                "train_sha256": hashes[s.name],
                "eval_sha256": formats.content_sha256(s.eval) if s.eval else None,
                "samples": index["rows"],
                "tokens": index["tokens"],
                "loss_tokens": index["loss_tokens"],
                "truncated": index["truncated"],
                "skipped": index["skipped"],
                "eval_samples": formats.count_examples(evaluated, cfg.max_eval_per_source) if evaluated else 0,
                "tokens_dir": str(req.folder),
                "tokens_key": req.key,
            }
        )
        if not req.reader.plain_jsonl:  # how the data is read, for every later stage (chat JSONL: as always)
            entries[-1].update(format=req.reader.describe(), reader=req.reader.spec.settings(),
                               eval_reader=evaluated.spec.settings() if evaluated else None)
        if vision:
            entries[-1].update(vision_token_counts(index, cfg.token_count))
    extra = {"token_count": cfg.token_count} if vision else {}
    return artifacts.write_manifest(
        stage,
        key,
        max_length=cfg.max_length,
        sources=entries,
        total_samples=sum(e["samples"] for e in entries),
        total_tokens=sum(e["tokens"] for e in entries),
        **extra,
    )


def vision_token_counts(counts: dict, token_count: str) -> dict:
    """A VLM source's text and image-placeholder token counts (from its token cache index), and its token
    budget n_t by ``mixture.token_count``: ``all`` (every token the model reads, image placeholders
    included — the paper's "tokens") or ``text`` (image placeholders left out)."""
    image, total = counts["image_tokens"], counts["tokens"]
    return {"text_tokens": total - image, "image_tokens": image, "images": counts["images"],
            "tokens": total if token_count == "all" else total - image}


def load_train(manifest: dict, names: list[str], tokenizer, cfg: MixtureConfig) -> tokens.TokenTable:
    """The named sources' tokenized training examples, in manifest order, memory-mapped from the token
    cache (what a branch trains on; a cache removed or damaged since the mixture stage is rebuilt)."""
    tables = []
    for e in manifest["sources"]:
        if e["name"] in names:
            req = tokens.TokenRequest(e["name"], entry_reader(e, "train"), Path(e["tokens_dir"]), e["tokens_key"],
                                      cfg.max_length, cfg.max_train_per_source)
            tables.append(tokens.load(req, tokenizer))
    return tokens.TokenTable.concat(tables)


def entry_reader(entry: dict, side: str = "train") -> Reader:
    """The reader of a mixture manifest entry's ``train`` or ``eval`` data, read as the mixture stage read it."""
    settings = entry.get("reader" if side == "train" else "eval_reader")
    return formats.open_reader(ReadSpec.from_settings(entry[side], settings, key=f"source {entry['name']}"))
