"""Compression of a flattened gradient (pure tensor code, no IO).

``stride`` is the paper's: keep one entry every ``s`` parameters of the gradient flattened in
parameter-iteration order (s = 5 keeps 20%). It is applied tensor by tensor with a running offset, so
the full flattened vector is never built.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from merit.registry import register


def stride_start(offset: int, stride: int) -> int:
    """First index inside a tensor whose global flat index ``offset + i`` is a multiple of ``stride``."""
    return (-offset) % stride


@register("compression", "stride")
def stride_compress(tensors: Iterable[torch.Tensor], stride: int = 5) -> torch.Tensor:
    """Entries at global flat positions 0, s, 2s, ... of the concatenation of ``tensors`` (as fp32)."""
    parts, offset = [], 0
    for t in tensors:
        flat = t.detach().reshape(-1)
        parts.append(flat[stride_start(offset, stride) :: stride].float())
        offset += flat.numel()
    return torch.cat(parts) if parts else torch.zeros(0)
