"""Per-fragment document ranges: what tile skipping with document ids is decided from."""

from __future__ import annotations

import torch
from torch import Tensor


def fragment_doc_ranges(doc: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per batch row and fragment of ``size`` tokens of ``doc`` (B, T): the min and max
    non-padding document id and whether it holds one document and no padding, each
    (B, ceil(T / size)) on the device of ``doc``. A fragment of padding only has
    min > max, so it meets no other fragment."""
    batch, length = doc.shape
    n = -(-length // size)
    padded = doc.new_full((batch, n * size), -1)
    padded[:, :length] = doc
    padded = padded.view(batch, n, size)
    pad = padded < 0
    big = torch.iinfo(padded.dtype).max
    lo = padded.masked_fill(pad, big).amin(-1)
    hi = padded.masked_fill(pad, -1).amax(-1)
    return lo, hi, (lo == hi) & ~pad.any(-1)
