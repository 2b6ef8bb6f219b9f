"""results.json's rows: each checkpoint's macro score with its 95% interval and its paired difference
against the reference row (joint), from the per-item scores the evaluation recorded (pure)."""

from __future__ import annotations

from merit.evaluate.stats import macro_interval, paired_difference

REFERENCE = "joint"


def summarize(evals: dict[str, dict], *, reference: str = REFERENCE, replicates: int = 2000, seed: int = 0) -> dict:
    """``{name: {macro, ci, n_items, loss, per_source, vs_<reference>}}`` for one evaluation set
    (in-mixture or transfer); ``evals`` maps names to :func:`merit.evaluate.runner.evaluate_model` results."""
    ref = evals.get(reference)
    rows = {}
    for name, r in evals.items():
        ci = macro_interval(r["items"], replicates=replicates, seed=seed)
        row = {"macro": r["macro"], "ci": [ci.low, ci.high], "n_items": sum(len(v) for v in r["items"].values()),
               "loss": r["loss"], "per_source": r["per_source"]}
        if ref is not None and name != reference:
            # the same seed for every row: each difference is taken over the same resampled items
            row[f"vs_{reference}"] = paired_difference(r["items"], ref["items"], replicates=replicates,
                                                       seed=seed).as_dict()
        rows[name] = row
    return rows
