"""argparse types with ranges, so that a bad number on the command line is refused with the flag named
(``--batch-size 0``, ``--threads -1``) instead of being silently used or failing later."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer type that accepts ``low`` and above."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer ≥ {low}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in merit's one-line form (``merit: error: ...``, exit code 2) instead of
    a usage block; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"merit: error: {self.prog}: {message} (see `{self.prog} --help`)\n")
