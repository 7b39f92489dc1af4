"""Which tiles FragmentStream attention computes, and the masks of those it must mask.

A tile is one query fragment against one key fragment (:mod:`fraglm.attention.fragment`).
Tiles are planned before any arithmetic, once per shape: causal tiles wholly in the future
are never computed and only tiles crossing the diagonal are masked. With document ids in
host memory a tile is skipped when the id ranges of its query and key fragments do not
overlap and left unmasked when both hold one and the same document. Masks are additive
biases (0 visible, -inf hidden) in the folded-row layout of grouped-query attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fraglm.attention.documents import fragment_doc_ranges


@dataclass(frozen=True)
class Tile:
    """One query fragment x key fragment pair that has at least one visible pair."""

    qf: int  # query fragment index
    kf: int  # key fragment index
    causal_mask: bool  # tile crosses the causal diagonal
    doc_mask: bool  # tile needs the document mask


def reads_on_host(device: torch.device) -> bool:
    """Whether document ids on ``device`` can steer the tile plan: in host memory reading
    them costs nothing; on an accelerator it would make the host wait for the device in
    every layer, so there the plan keeps every causal tile and masks documents on the
    device."""
    return device.type == "cpu"


# scores in one product at most (B * Hkv x rows x cols): 8 MiB in fp32
RUN_ELEMENTS = 1 << 21

_PLANS: dict[tuple[int, int, int, bool, int, int, bool], tuple[Tile, ...]] = {}


def _shape_plan(
    n_q: int, n_k: int, size: int, causal: bool, q_start: int, k_start: int, docs: bool
) -> tuple[Tile, ...]:
    """The tiles a shape needs, built once per shape (a plain dict, which torch.compile
    traces without a warning): causal tiles wholly in the future are left out; with
    ``docs`` every tile carries the document mask."""
    key = (n_q, n_k, size, causal, q_start, k_start, docs)
    if key not in _PLANS:
        if len(_PLANS) >= 1024:  # decoding with a cache meets a new key length each step
            _PLANS.clear()
        _PLANS[key] = _build_plan(*key)
    return _PLANS[key]


def _build_plan(
    n_q: int, n_k: int, size: int, causal: bool, q_start: int, k_start: int, docs: bool
) -> tuple[Tile, ...]:
    n_qf, n_kf = -(-n_q // size), -(-n_k // size)
    tiles = []
    for i in range(n_qf):
        first_q = q_start + i * size
        last_q = q_start + min((i + 1) * size, n_q) - 1
        # Key fragments starting after the last query of this fragment are all in the future.
        stop = min(n_kf, max(0, -(-(last_q - k_start + 1) // size))) if causal else n_kf
        for j in range(stop):
            last_k = k_start + min((j + 1) * size, n_k) - 1
            tiles.append(Tile(i, j, causal and last_k > first_q, docs))
    return tuple(tiles)


def plan_tiles(
    n_q: int,
    n_k: int,
    size: int,
    *,
    causal: bool,
    q_start: int,
    k_start: int,
    q_doc: Tensor | None,
    k_doc: Tensor | None,
) -> tuple[Tile, ...]:
    """The tiles with at least one possibly visible pair, in query-major order.

    With document ids in host memory, a tile is skipped when the id ranges of its query
    and key fragments do not overlap and left unmasked when both hold one and the same
    document; on other devices the ids are not read (see :func:`reads_on_host`).
    """
    docs = q_doc is not None and k_doc is not None
    tiles = _shape_plan(n_q, n_k, size, causal, q_start, k_start, docs)
    if not docs or not reads_on_host(q_doc.device):
        return tiles
    q_lo, q_hi, q_pure = fragment_doc_ranges(q_doc, size)
    k_lo, k_hi, k_pure = fragment_doc_ranges(k_doc, size)
    overlap = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
    one_doc = q_pure[:, :, None] & k_pure[:, None, :] & (q_lo[:, :, None] == k_lo[:, None, :])
    meet, same = overlap.any(0).tolist(), one_doc.all(0).tolist()
    return tuple(
        Tile(t.qf, t.kf, t.causal_mask, not same[t.qf][t.kf]) for t in tiles if meet[t.qf][t.kf]
    )


def runs_of(tiles: list[Tile], tile_elements: int) -> list[list[Tile]]:
    """The tiles of one query fragment in runs of neighbours (key fragment index rising
    by one) of at most ``RUN_ELEMENTS`` scores, ``tile_elements`` being one tile's."""
    limit = max(1, RUN_ELEMENTS // tile_elements)
    runs: list[list[Tile]] = []
    for tile in tiles:
        last = runs[-1][-1] if runs else None
        if last is not None and tile.kf == last.kf + 1 and len(runs[-1]) < limit:
            runs[-1].append(tile)
        else:
            runs.append([tile])
    return runs


class Biases:
    """Additive tile masks (0 visible, -inf hidden) in folded-row layout, causal ones cached.

    An in-place add of a float bias is several times faster than ``masked_fill_``
    with a broadcast boolean mask on CPU.
    """

    def __init__(
        self,
        *,
        size: int,
        group: int,
        q_start: int,
        k_start: int,
        n_q: int,
        n_k: int,
        q_doc: Tensor | None,
        k_doc: Tensor | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.size, self.group, self.n_q, self.n_k = size, group, n_q, n_k
        self.q_start, self.k_start, self.dtype, self.device = q_start, k_start, dtype, device
        self.q_doc = None
        if q_doc is not None:  # one row per query head of a group, as in the folded layout
            self.q_doc = q_doc[:, :, None].expand(-1, -1, group).reshape(q_doc.shape[0], -1)
        self.k_doc = k_doc
        self._causal: dict[tuple[int, int, int], Tensor] = {}

    def _geometry(self, tile: Tile) -> tuple[int, int, int]:
        """(query position - key position at the tile's corner, rows, cols) of a tile."""
        rows = min(self.size, self.n_q - tile.qf * self.size)
        cols = min(self.size, self.n_k - tile.kf * self.size)
        offset = (self.q_start + tile.qf * self.size) - (self.k_start + tile.kf * self.size)
        return offset, rows, cols

    def _causal_hidden(self, tile: Tile) -> Tensor:
        """Causally hidden pairs of a tile, (rows * group, cols) bool."""
        offset, rows, cols = self._geometry(tile)
        q_pos = torch.arange(offset, offset + rows, device=self.device)
        q_pos = q_pos[:, None].expand(rows, self.group).reshape(-1)
        return torch.arange(cols, device=self.device) > q_pos[:, None]

    def _bias(self, hidden: Tensor) -> Tensor:
        bias = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device)
        return bias.masked_fill_(hidden, -math.inf)

    def __call__(self, tile: Tile) -> Tensor:
        """Bias of shape (rows, cols) or, with documents, (B, 1, rows, cols)."""
        if not tile.doc_mask:
            key = self._geometry(tile)
            if key not in self._causal:
                self._causal[key] = self._bias(self._causal_hidden(tile))
            return self._causal[key]
        assert self.q_doc is not None and self.k_doc is not None
        rows = slice(tile.qf * self.size * self.group, (tile.qf + 1) * self.size * self.group)
        qd = self.q_doc[:, rows, None]
        kd = self.k_doc[:, None, tile.kf * self.size : (tile.kf + 1) * self.size]
        hidden = (qd != kd) | (qd < 0)
        if tile.causal_mask:
            hidden |= self._causal_hidden(tile)
        return self._bias(hidden[:, None])


def add_bias(scores: Tensor, bias: Tensor, batch: int) -> None:
    """Add a tile bias in place; scores are (B * Hkv, rows, cols)."""
    if bias.dim() == 2:
        scores.add_(bias)
    else:
        scores.view(batch, -1, *scores.shape[1:]).add_(bias)
