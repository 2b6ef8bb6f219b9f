"""Bridges to the standard harnesses: lm-evaluation-harness (text) and lmms-eval (vision-language).

Both are optional extras imported only here and only when configured (``eval.lm_eval``,
``eval.lmms_eval``, ``merit eval --lm-eval-tasks``). Runs are offline (``HF_HUB_OFFLINE`` and friends):
the tasks' data must be local or already in the Hugging Face cache. Results keep the harness's own
metric keys (``acc,none``, ``exact_match,strict-match`` ...), so they compare with published numbers.

lm-eval gets the already loaded model (``HFLM(pretrained=<model>)``): no second load per checkpoint.
lmms-eval loads checkpoints itself, from their folder, through its model class (``eval.lmms_eval.model``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from merit.config import HarnessConfig
from merit.errors import ConfigError

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
EXTRAS = {"lm_eval": "lm-eval", "lmms_eval": "lmms-eval"}


@contextlib.contextmanager
def offline():
    """The harness never reaches a hub: every dataset and metric comes from local files or the cache."""
    before = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def require(package: str, key: str) -> None:
    """A ConfigError naming the key when the harness is not installed."""
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{key}: needs the {package} package, which is not installed; "
                          f"pip install 'merit-tune[{EXTRAS[package]}]' (or drop {key})")


def lm_eval_task_manager(h: HarnessConfig, key: str = "eval.lm_eval"):
    """lm-eval's TaskManager for these tasks, every name checked. With an ``include_path`` holding every
    named task, lm-eval's own task index is not built (it takes seconds to index thousands of YAMLs)."""
    require("lm_eval", key)
    if h.include_path is not None and not Path(h.include_path).is_dir():
        raise ConfigError(f"{key}.include_path: {h.include_path} is not a folder; give the folder of task YAMLs")
    with offline():
        from lm_eval.tasks import TaskManager

        manager = None
        if h.include_path is not None:
            manager = TaskManager(include_path=str(h.include_path), include_defaults=False, verbosity="ERROR")
            if any(t not in manager.all_tasks for t in h.tasks):
                manager = None
        if manager is None:
            manager = TaskManager(include_path=str(h.include_path) if h.include_path else None, verbosity="ERROR")
    for i, t in enumerate(h.tasks):
        if t not in manager.all_tasks:
            where = f" or in {h.include_path}" if h.include_path else " (give include_path for local task YAMLs)"
            raise ConfigError(f"{key}.tasks[{i}]: unknown lm-eval task {t!r}: not among lm-eval's tasks{where}")
    return manager


def run_lm_eval(model, tokenizer, h: HarnessConfig, manager, device: str, seed: int = 0) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on a loaded model: ``{"results": {task: {metric: value}},
    "n_samples": {task: n}, "versions", "config"}`` (lm-eval's own keys)."""
    with offline():
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, device=str(device), batch_size=h.batch_size)
        out = simple_evaluate(model=lm, tasks=list(h.tasks), num_fewshot=h.num_fewshot, limit=h.limit,
                              apply_chat_template=h.apply_chat_template, task_manager=manager, log_samples=False,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=1000)
    return {"results": _plain(out["results"]),
            "n_samples": {t: v.get("effective", v.get("original")) if isinstance(v, dict) else v
                          for t, v in (out.get("n-samples") or {}).items()},
            "versions": _plain(out.get("versions", {}))}


def lmms_eval_call(h: HarnessConfig, checkpoint: Path, device: str, seed: int = 0) -> dict[str, Any]:
    """The keyword arguments of lmms-eval's ``evaluator.simple_evaluate`` for one checkpoint folder."""
    args = {"pretrained": str(Path(checkpoint).absolute()), **h.model_args}
    return {"model": h.model, "model_args": ",".join(f"{k}={v}" for k, v in args.items()), "tasks": list(h.tasks),
            "num_fewshot": h.num_fewshot, "batch_size": h.batch_size, "device": str(device), "limit": h.limit,
            "apply_chat_template": h.apply_chat_template, "log_samples": False, "random_seed": seed,
            "numpy_random_seed": seed, "torch_random_seed": seed, "bootstrap_iters": 1000}


def check_lmms_eval(h: HarnessConfig, key: str = "eval.lmms_eval") -> None:
    """Installed, a model class named, the include_path a folder, every task known to lmms-eval."""
    require("lmms_eval", key)
    if not h.model:
        raise ConfigError(f"{key}.model: name lmms-eval's model class for the checkpoints (e.g. qwen2_5_vl)")
    if h.include_path is not None and not Path(h.include_path).is_dir():
        raise ConfigError(f"{key}.include_path: {h.include_path} is not a folder; give the folder of task YAMLs")
    with offline():
        from lmms_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(h.include_path) if h.include_path else None)
    for i, t in enumerate(h.tasks):
        if t not in manager.all_tasks:
            raise ConfigError(f"{key}.tasks[{i}]: unknown lmms-eval task {t!r}")


def run_lmms_eval(h: HarnessConfig, checkpoint: Path, device: str, seed: int = 0) -> dict[str, Any]:
    with offline():
        from lmms_eval import evaluator

        out = evaluator.simple_evaluate(**lmms_eval_call(h, checkpoint, device, seed))
    return {"results": _plain(out["results"]), "versions": _plain(out.get("versions", {}))}


def _plain(value):
    """JSON-ready copy (harness results hold numpy scalars and the odd non-finite stderr)."""
    import math

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def headline(results: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """Per task, its first reported metric (``acc,none`` before others): the number a table shows."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        # lm-eval's metric keys are "<metric>,<filter>" (``sample_len``, ``alias`` and the like are not metrics)
        keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) and "," in k and "_stderr" not in k]
        if keys:
            best = next((k for k in keys if k.startswith("acc,")), keys[0])
            out[task] = (best, float(metrics[best]))
    return out
