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


def meeting_ranges(row_doc: Tensor, row_block: int, col_doc: Tensor, col_block: int) -> Tensor:
    """For each block of ``row_block`` rows of ``row_doc`` (B, Tr), which blocks of
    ``col_block`` columns of ``col_doc`` (B, Tc) it must visit: (B, ceil(Tr / row_block), 4)
    int32 ``first, last, inner_first, inner_last`` (inclusive column-block indices).

    Every column block sharing a non-padding id with the row block lies in
    ``[first, last]`` (the first block whose running max id reaches the row block's min,
    the last whose suffix min id is at most its max: exact for sorted ids, conservative
    for any). ``[inner_first, inner_last]`` (empty: first > last) is a run of column
    blocks that each hold one document, the row block's, and no padding, with the row
    block likewise: the tiles there need no id mask. Computed on the device (searches,
    cumulative max/min and gathers), with no host sync.
    """
    r_lo, r_hi, r_pure = fragment_doc_ranges(row_doc, row_block)
    c_lo, c_hi, c_pure = fragment_doc_ranges(col_doc, col_block)
    n = c_lo.shape[1]
    first = torch.searchsorted(c_hi.cummax(1).values.contiguous(), r_lo.contiguous())
    suffix_min = c_lo.flip(1).cummin(1).values.flip(1).contiguous()
    last = torch.searchsorted(suffix_min, r_hi.contiguous(), right=True) - 1
    # runs of neighbouring column blocks of one document each: the end of each block's run
    index = torch.arange(n, device=col_doc.device).expand_as(c_lo)
    joins_next = c_pure[:, :-1] & c_pure[:, 1:] & (c_lo[:, :-1] == c_lo[:, 1:])
    ends = torch.where(torch.cat([joins_next, joins_next.new_zeros(joins_next.shape[0], 1)], 1),
                       n, index)  # fmt: skip
    run_end = ends.flip(1).cummin(1).values.flip(1)
    # the row block's document begins in column block ``first`` or (part way) before it
    inner = torch.full_like(first, n)
    for candidate in (first + 1, first):
        at = candidate.clamp(max=n - 1)
        ok = r_pure & (candidate < n) & c_pure.gather(1, at) & (c_lo.gather(1, at) == r_lo)
        inner = torch.where(ok, candidate, inner)
    inner_last = torch.where(inner < n, run_end.gather(1, inner.clamp(max=n - 1)), -1)
    return torch.stack([first, last, inner, inner_last], -1).to(torch.int32)
