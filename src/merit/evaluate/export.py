"""``merit export-tasks``: the mixture's held-out files as lm-evaluation-harness tasks.

Anyone can then reproduce merit's per-source scores with the ``lm_eval`` CLI, with no merit installed:

    lm_eval --model hf --model_args pretrained=RUN/merged/token-weighted --include_path DIR --tasks merit

Each source becomes one task (``merit_<source>``; a source mixing both kinds of item becomes
``merit_<source>_mc`` and ``merit_<source>_gen``), all in the group ``merit``. Prompts are rendered
with θ(0)'s chat template at export time (the exported ``prompt`` field is what merit feeds the model),
so the tasks run with ``apply_chat_template`` off. Multiple choice is lm-eval's ``multiple_choice``
(``acc`` = merit's summed log-likelihood rule; lm-eval's ``acc_norm`` normalises by bytes, merit's
``length_normalized`` by tokens). Generation is ``generate_until`` with merit's exact-match rule in a
small ``merit_utils.py`` written beside the YAMLs, and merit's ``max_new_tokens`` cap per source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from merit import artifacts
from merit.evaluate.scoring import is_multiple_choice, targets_of

# Written beside the YAMLs: lm-eval imports it for ``process_results`` (the same rule as merit.evaluate.scoring).
UTILS = '''"""merit's exact-match rule for lm-eval (written by merit export-tasks)."""
import re

_WS = re.compile(r"\\s+")


def normalize(text, mode):
    text = _WS.sub(" ", text).strip()
    if mode == "lower":
        text = text.lower().removesuffix(".").rstrip()
    return text


def _match(doc, results, mode):
    p = normalize(results[0], mode)
    return {"exact_match": float(any(p == normalize(t, mode) for t in doc["targets"]))}


def exact_match_whitespace(doc, results):
    return _match(doc, results, "whitespace")


def exact_match_lower(doc, results):
    return _match(doc, results, "lower")
'''

_TASK = re.compile(r"[^A-Za-z0-9_]")


def task_name(source: str, kind: str | None = None) -> str:
    return "merit_" + _TASK.sub("_", source) + (f"_{kind}" if kind else "")


def write_tasks(sources: dict[str, list[dict]], tokenizer, out: Path, *, normalize: str = "whitespace",
                max_new_tokens: int = 24, group: str = "merit") -> list[str]:
    """Write ``<task>.jsonl`` + ``<task>.yaml`` per source (and kind), ``merit_utils.py`` and the group
    YAML into ``out`` (atomically: a folder that is complete or absent). Returns the task names."""
    tasks = []
    with artifacts.atomic_dir(Path(out)) as tmp:
        (tmp / "merit_utils.py").write_text(UTILS)
        for name, examples in sources.items():
            mc = [ex for ex in examples if is_multiple_choice(ex)]
            gen = [ex for ex in examples if not is_multiple_choice(ex)]
            both = bool(mc) and bool(gen)
            for kind, items in (("mc", mc), ("gen", gen)):
                if not items:
                    continue
                task = task_name(name, kind if both else None)
                rows, longest = [], 0
                for ex in items:
                    last = max(i for i, m in enumerate(ex["messages"]) if m["role"] == "assistant")
                    prompt = tokenizer.apply_chat_template(ex["messages"][:last], tokenize=False,
                                                           add_generation_prompt=True)
                    row = {"prompt": prompt}
                    if kind == "mc":
                        row.update(choices=[str(c) for c in ex["choices"]], answer_index=ex["answer_index"])
                    else:
                        row["targets"] = targets_of(ex, ex["messages"][last]["content"])
                        longest = max([longest] + [len(tokenizer(t, add_special_tokens=False)["input_ids"])
                                                   for t in row["targets"]])
                    rows.append(row)
                data = tmp / f"{task}.jsonl"
                data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                spec = {"task": task, "dataset_path": "json",
                        # a path relative to the YAML would be resolved against the working folder: absolute
                        "dataset_kwargs": {"data_files": {"test": str((Path(out) / data.name).absolute())}},
                        "test_split": "test", "doc_to_text": "{{prompt}}", "target_delimiter": ""}
                if kind == "mc":
                    spec.update(output_type="multiple_choice", doc_to_choice="{{choices}}",
                                doc_to_target="{{answer_index}}",
                                metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
                else:
                    spec.update(output_type="generate_until", doc_to_target="{{targets[0]}}",
                                # merit stops two tokens past the longest answer (the same greedy text)
                                generation_kwargs={"until": [], "do_sample": False,
                                                   "max_gen_toks": min(max_new_tokens, longest + 2)},
                                process_results=f"!function merit_utils.exact_match_{normalize}",
                                metric_list=[{"metric": "exact_match", "aggregation": "mean",
                                              "higher_is_better": True}])
                (tmp / f"{task}.yaml").write_text(_dump(spec))
                tasks.append(task)
        (tmp / f"{group}.yaml").write_text(_dump({"group": group, "task": tasks}))
    return tasks


def _dump(spec: dict) -> str:
    # lm-eval's loader needs `!function` as a YAML tag, not a quoted string
    text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    return re.sub(r"'(!function [^']+)'", r"\1", text)


def export_tasks(run: Path, out: Path, include: list[str] | None = None) -> list[str]:
    """The held-out files of a run folder's mixture (capped as its evaluation was), rendered with θ(0)'s
    tokenizer, as lm-eval tasks in ``out``."""
    from merit.data import formats
    from merit.data import mixture as mixture_stage
    from merit.errors import ConfigError, MeritError
    from merit.models.loading import load_tokenizer

    from merit.config import load_config

    run = Path(run)
    manifest = artifacts.read_manifest(run / "mixture")
    theta0 = artifacts.read_manifest(run / "theta0")
    if manifest is None or theta0 is None or not (run / "config.yaml").is_file():
        raise MeritError(f"{run}: not a run folder with a mixture (no config.yaml, mixture/ or theta0/ manifest); "
                         "run merit run first")
    cfg = load_config(run / "config.yaml")
    caps = [c for c in (cfg.eval.max_per_source, cfg.mixture.max_eval_per_source) if c]
    entries = [e for e in manifest["sources"] if e.get("eval")]
    if include:
        missing = [n for n in include if n not in {e["name"] for e in entries}]
        if missing:
            raise ConfigError(f"--include: {missing} are not sources with an eval split in {run}")
        entries = [e for e in entries if e["name"] in include]
    if not entries:
        raise MeritError(f"{run}: no source has an eval split; nothing to export")
    sources = {e["name"]: formats.read_examples(mixture_stage.entry_reader(e, "eval"), min(caps) if caps else None)
               for e in entries}
    tokenizer = load_tokenizer(Path(theta0.get("path", run / "theta0")))
    return write_tasks(sources, tokenizer, out, normalize=cfg.eval.normalize, max_new_tokens=cfg.eval.max_new_tokens)
