"""The local launcher: branch jobs one after another in this process."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from merit.registry import register

J = TypeVar("J")


@register("launcher", "local")
def run_local(jobs: Sequence[J], worker: Callable[[J], dict]) -> list[dict]:
    """Run ``worker(job)`` for each job in order; each job is independent (no shared state)."""
    return [worker(job) for job in jobs]
