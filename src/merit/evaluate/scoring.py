"""Exact-match scoring (pure)."""

from __future__ import annotations

import re

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Strip and collapse whitespace; case and punctuation are kept (many built-in tasks are about case)."""
    return _WS.sub(" ", text).strip()


def exact_match(prediction: str, targets: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised target."""
    p = normalize(prediction)
    return float(any(p == normalize(t) for t in targets))


def targets_of(example: dict, reference: str) -> list[str]:
    """Acceptable answers: the example's ``targets`` when given, else the reference assistant turn."""
    t = example.get("targets")
    return [str(x) for x in t] if isinstance(t, list) and t else [reference]
