"""The one grouping by length and the one per-row table, shared by decoding, distillation and evaluation."""

import torch

from adjust.batching import group_by_length, per_row_table


def test_group_by_length_keeps_first_appearance_order():
    items = ["ab", "c", "de", "", "f", "ghi"]
    assert group_by_length(items, len) == [["ab", "de"], ["c", "f"], [""], ["ghi"]]
    assert group_by_length([], len) == []


def test_per_row_table_lays_ragged_rows_out():
    rows = torch.tensor([0, 0, 0, 2, 2])
    values = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0])
    table, starts, counts = per_row_table(values, rows, 3, float("-inf"))
    assert counts.tolist() == [3, 0, 2] and starts.tolist() == [0, 3, 3]
    assert table.dtype == torch.float64 and table.shape == (3, 3)
    assert table[0].tolist() == [3.0, 1.0, 2.0]
    assert table[1].tolist() == [float("-inf")] * 3
    assert table[2].tolist() == [5.0, 4.0, float("-inf")]
    table, _, counts = per_row_table(torch.zeros(0), torch.zeros(0, dtype=torch.long), 2, 0.0)
    assert table.shape == (2, 0) and counts.tolist() == [0, 0]
