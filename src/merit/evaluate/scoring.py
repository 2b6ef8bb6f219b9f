"""Scoring rules (pure): exact-match normalisation and multiple-choice selection."""

from __future__ import annotations

import re
from collections.abc import Sequence

_WS = re.compile(r"\s+")


def normalize(text: str, mode: str = "whitespace") -> str:
    """``whitespace``: strip and collapse whitespace, keep case (many built-in tasks are about case).
    ``lower``: also lower-case and drop one trailing period."""
    text = _WS.sub(" ", text).strip()
    if mode == "lower":
        text = text.lower().removesuffix(".").rstrip()
    return text


def exact_match(prediction: str, targets: Sequence[str], mode: str = "whitespace") -> float:
    """1.0 when the normalised prediction equals any normalised target."""
    p = normalize(prediction, mode)
    return float(any(p == normalize(t, mode) for t in targets))


def targets_of(example: dict, reference: str) -> list[str]:
    """Acceptable answers: the example's ``targets`` when given, else the reference assistant turn."""
    t = example.get("targets")
    return [str(x) for x in t] if isinstance(t, list) and t else [reference]


def is_multiple_choice(example: dict) -> bool:
    c, a = example.get("choices"), example.get("answer_index")
    return isinstance(c, list) and len(c) >= 2 and isinstance(a, int) and 0 <= a < len(c)


def pick_choice(logprob_sums: Sequence[float], lengths: Sequence[int], length_normalized: bool = False) -> int:
    """Index of the best choice by summed log-likelihood, or by mean per token when ``length_normalized``
    (which stops long choices from being penalised for their length). Ties go to the first."""
    scores = [s / max(n, 1) if length_normalized else s for s, n in zip(logprob_sums, lengths)]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
