"""benchmarks/distill_memory.py at tiny sizes on the CPU: every base, both KL paths, in seconds.

The CPU peak is the profiler's count of tensor bytes allocated during the step, not process
RSS, so it is deterministic and the chunked path can be compared strictly with the reference.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def distill_memory():
    from tests.benchmarks.bench_loader import load_benchmark

    return load_benchmark("distill_memory")


def test_tiny_sizes_on_cpu(distill_memory, tmp_path, capsys):
    from adjust.distill import train

    kl_before = train.kl_per_position
    out = tmp_path / "mem.json"
    rc = distill_memory.main(["--device", "cpu", "--vocab-size", "2048", "--hidden-size", "32", "--heads", "2",
                              "--seq-length", "32", "--batch-size", "2", "--chunks", "16", "--json", str(out)])
    assert rc == 0
    assert train.kl_per_position is kl_before  # the reference is swapped in only for its own run
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert "chunk=16 MB/ex" in table and "unchunked MB/ex" in table
    assert report["device"] == "cpu" and report["config"]["chunks"] == [16]
    assert [r["model"] for r in report["results"]] == ["dream", "llada", "bert", "tiny"]
    for r in report["results"]:
        assert r["vocab_size"] == 2048 and r["tokenizer_size"] < 2048 and r["banned_ids"] > 2048 - r["tokenizer_size"]
        assert r["scored_positions"] == 2 * 31 and r["scored_positions_per_example"] == 31
        assert r["full_logits_mb_per_example"] == pytest.approx(31 * 2048 * 4 / 2**20, abs=0.01)
        chunked, full = r["runs"]
        assert (chunked["mode"], chunked["chunk"], chunked["checkpointed"], chunked["chunks_per_step"]) == \
            ("chunk=16", 16, True, 4)
        assert (full["mode"], full["checkpointed"], full["chunks_per_step"]) == ("unchunked", False, 1)
        assert chunked["kl"] == pytest.approx(full["kl"], rel=1e-5)  # the same loss, computed two ways
        assert chunked["peak_mb_per_example"] == pytest.approx(chunked["peak_mb"] / 2, abs=0.01)
        # the reference holds at least both sides' full logits; the chunked path holds less than the reference
        assert full["peak_mb_per_example"] >= 2 * r["full_logits_mb_per_example"]
        assert 0 < chunked["peak_mb"] < full["peak_mb"]
        assert chunked["vs_unchunked"] < 1 and full["vs_unchunked"] == 1.0


def test_cpu_peak_is_a_running_sum_within_the_window(distill_memory):
    ev = lambda ts, nbytes, total: {"name": "[memory]", "ts": ts,  # noqa: E731
                                    "args": {"Bytes": nbytes, "Total Allocated": total, "Device Type": 0}}
    # "Total Allocated" carries 1000 bytes left over from an earlier session; the window's own peak is 300
    trace = {"traceEvents": [ev(3, -200, 1100), ev(1, 100, 1100), ev(2, 200, 1300), ev(4, 50, 1150),
                             {"name": "aten::mm", "ts": 2.5}]}
    assert distill_memory.cpu_peak(trace) == 300
    with pytest.raises(RuntimeError):
        distill_memory.cpu_peak({"traceEvents": []})
