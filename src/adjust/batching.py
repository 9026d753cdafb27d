"""Batching helpers shared by decoding, distillation and evaluation.

- `group_by_length`: items grouped by a length (a prompt's, a sequence's), so that a batch
  stacks equal lengths and needs no padding: a sequence then gets bit-identical results in
  any batch, and no compute goes to pad tokens.
- `per_row_table`: ragged per-row entries (row-major, as `nonzero` gives them) laid out as a
  (rows, longest row) table, for per-row sorting and top-k.
"""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")


def group_by_length(items: Iterable[T], length: Callable[[T], int]) -> list[list[T]]:
    """`items` grouped by `length(item)`: groups in order of first appearance, items in their order."""
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(length(item), []).append(item)
    return list(groups.values())


def per_row_table(values: torch.Tensor, rows: torch.Tensor, num_rows: int, pad: float):
    """values (N,) of row-major entries, rows (N,) their row -> (table, starts, counts).

    table (num_rows, longest row) float64 holds row b's entries in order, then `pad`;
    starts[b] is the index of row b's first entry in `values`, counts[b] its number of entries.
    """
    counts = torch.bincount(rows, minlength=num_rows)
    starts = torch.cumsum(counts, 0) - counts
    table = torch.full((num_rows, int(counts.max()) if len(rows) else 0), pad, dtype=torch.float64,
                       device=values.device)
    table[rows, torch.arange(len(rows), device=rows.device) - starts[rows]] = values.double()
    return table, starts, counts
