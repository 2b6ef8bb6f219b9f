"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"{gpu}")


def append_record(results: Path, title: str, details: str, body: str) -> None:
    """Append a dated section (the command that ran, ``details``, the machine and its load) to a results file."""
    record = (f"\n## {time.strftime('%Y-%m-%d %H:%M')} — {title}\n\nCommand: `python {' '.join(sys.argv)}`  \n"
              f"{details} Machine: {machine()}, load average {os.getloadavg()[0]:.1f}.\n\n{body}\n")
    with open(results, "a") as f:
        f.write(record)
