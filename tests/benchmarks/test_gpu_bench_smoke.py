"""benchmarks/gpu_bench.py --size tiny on the CPU: the 7B benchmark's code path, in seconds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def gpu_bench():
    from tests.benchmarks.bench_loader import load_benchmark

    return load_benchmark("gpu_bench")


def test_tiny_size_on_cpu(gpu_bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = gpu_bench.main(["--size", "tiny", "--device", "cpu", "--batch-sizes", "1,2", "--prompt-length", "8",
                         "--gen-length", "16", "--max-tokens", "8", "--repeats", "1", "--warmup", "1",
                         "--pass-repeats", "2", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report  # stdout holds the same single JSON object
    assert report["size"] == "tiny" and report["canvas"] == 24 and report["k"] == 4 and report["complete"] is True
    from adjust.provenance import code_version

    assert report["code_version"] == code_version()  # which code made the figures
    assert report["sampler_params"] > 0 and report["base_params"] > report["sampler_params"]
    for B in (1, 2):
        c = report["pass_vs_unroll"][str(B)]
        assert c["full_pass_ms"] > 0 and c["unroll_ms"] > 0 and c["masked_positions"] == 16 * B
        assert set(c["modes"]) == {"full", "fast"} and c["k"] == 4 and c["modes"]["fast"]["unroll_ms"] > 0
        rows = {r["strategy"]: r for r in report["throughput"] if r["batch_size"] == B}
        spec = {"speculative:4:self", "speculative:4:sampler"} if B == 1 else set()  # batch 1 only
        assert set(rows) == {"exact", "parallel:4", "threshold:0.9", "adjust:4", "adjust:4+fast",
                             "threshold-adjust:0.9:4", "threshold-adjust:0.9:4+fast"} | spec
        assert {r["unroll"] for label, r in rows.items() if label.endswith("+fast")} == {"fast"}
        for label in spec:  # 1 to 5 tokens per full pass (the last pass may pass the 8 timed), drafted rows computed
            r = rows[label]
            assert 8 <= r["tokens"] <= 12 and 2 <= r["full_passes"] <= 8 and r["base_rows"] >= r["full_passes"]
        assert rows["exact"]["base_rows"] == 8 * B
        assert rows["exact"]["ratio_to_exact"] == 1.0
        for r in rows.values():  # only the first 8 tokens of the 16-token generation are timed
            assert r["tokens"] == 8 * B and r["tokens_per_second"] > 0 and r["ratio_to_exact"] > 0
        assert (rows["exact"]["full_passes"], rows["exact"]["sampler_passes"]) == (8, 0)
        assert (rows["parallel:4"]["full_passes"], rows["parallel:4"]["sampler_passes"]) == (2, 0)
        # random weights are never confident: threshold writes one token a pass, threshold-adjust 1 + at most 1 (its
        # one unsure draw where a position beyond its spacing is masked; a next unroll finds its pick unsure)
        assert (rows["threshold:0.9"]["full_passes"], rows["threshold:0.9"]["sampler_passes"]) == (8, 0)
        for label in ("adjust:4", "adjust:4+fast"):
            assert (rows[label]["full_passes"], rows[label]["sampler_passes"]) == (2, 6), label  # fast ones counted
        for label in ("threshold-adjust:0.9:4", "threshold-adjust:0.9:4+fast"):
            full, unrolls = rows[label]["full_passes"], rows[label]["sampler_passes"]
            assert 4 <= full < 8 and 0 < unrolls <= 2 * full, label  # it drew, never more than 2 tokens a pass
    assert [(v["batch_size"], v["unroll"]) for v in report["adjust_vs_ideal"]] == [(1, "full"), (1, "fast"),
                                                                                   (2, "full"), (2, "fast")]
    pc = report["pass_cost"]["tiny"]  # the transformers stand-in takes no cache: the whole canvas only
    assert pc["rows"] == [1, 2, 4, 8, 16] and pc["full"]["1"] == 1.0 and "span" not in pc and pc["unroll_cost"] > 0
    assert pc["unroll_cost_fast"] > 0 and (pc["unroll_fast_rows"], pc["unroll_k"]) == (7, 4)  # 2(K-1) + 1 rows
    from adjust.eval.costs import read_pass_cost, unroll_cost_of

    cost = read_pass_cost(out, "anything")  # the report doubles as a --pass-cost report
    loop = report["pass_vs_unroll"]["1"]["modes"]  # whose c is the loop's at batch 1, LM heads included
    assert cost.cost("full", 16) == pc["full"]["16"] and cost.unroll_cost == loop["full"]["unroll_cost"]
    assert unroll_cost_of(cost, None, "fast") == loop["fast"]["unroll_cost"]


def test_a_run_cut_off_leaves_what_it_measured(gpu_bench, tmp_path, monkeypatch, capsys):
    """The report is written after the pass costs and after each batch size, marked incomplete until the end, so a
    run stopped by a device's time limit still returns its finished batch sizes."""
    real = gpu_bench.timed_generation

    def cut_off_at_batch_2(base, sampler, s, prompt, B, *args):
        if B == 2:
            raise KeyboardInterrupt  # the time limit's kill, as a test can raise it
        return real(base, sampler, s, prompt, B, *args)

    monkeypatch.setattr(gpu_bench, "timed_generation", cut_off_at_batch_2)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_bench.main(["--size", "tiny", "--device", "cpu", "--batch-sizes", "1,2", "--prompt-length", "8",
                        "--gen-length", "16", "--max-tokens", "8", "--repeats", "1", "--warmup", "0",
                        "--pass-repeats", "2", "--spec-depth", "0", "--tau", "0", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False and report["pass_cost"]["tiny"]["unroll_cost"] > 0
    assert report["throughput"] and {r["batch_size"] for r in report["throughput"]} == {1}


def test_7b_config_has_dream_shape(gpu_bench):
    s = gpu_bench.SIZES["7b"]
    assert (s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"], s["num_key_value_heads"],
            s["intermediate_size"], s["vocab_size"], s["mask_id"]) == (3584, 28, 28, 4, 18944, 152064, 151666)
    # K must divide the timed tokens so every strategy times the same tokens
    with pytest.raises(SystemExit):
        gpu_bench.main(["--size", "tiny", "--device", "cpu", "--max-tokens", "6"])


def test_tiny_size_with_caches_on_cpu(gpu_bench, tmp_path, capsys):
    """--cache none,prefix,dual --block-length: the native Dream of that size, every strategy with every cache."""
    out = tmp_path / "bench.json"
    rc = gpu_bench.main(["--size", "tiny", "--device", "cpu", "--batch-sizes", "1", "--prompt-length", "8",
                         "--gen-length", "16", "--block-length", "8", "--max-tokens", "8", "--cache", "none,prefix,dual",
                         "--unroll", "full", "--tau", "0", "--repeats", "1", "--warmup", "0", "--pass-repeats", "2", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["base"].startswith("native Dream") and report["caches"] == ["none", "prefix", "dual"]
    rows = {r["strategy"]: r for r in report["throughput"]}
    assert set(rows) == {f"{s} [{c}]" for s in ("exact", "parallel:4", "adjust:4", "speculative:4:self",
                                                 "speculative:4:sampler") for c in ("none", "prefix", "dual")}
    pc = report["pass_cost"]["tiny"]  # the native Dream: also the refresh pass and the cached block
    assert pc["block"] == [8, 16] and all(pc[k]["1"] == 1.0 and set(pc[k]) == {"1", "2", "4", "8", "16"}
                                          for k in ("full", "refresh", "span"))
    assert rows["exact [none]"]["ratio_to_exact"] == 1.0 and rows["exact [none]"]["ratio_to_uncached"] == 1.0
    for c in ("none", "prefix", "dual"):  # the first 8 tokens: one block of 8
        assert (rows[f"exact [{c}]"]["full_passes"], rows[f"exact [{c}]"]["tokens"]) == (8, 8)
        assert (rows[f"adjust:4 [{c}]"]["full_passes"], rows[f"adjust:4 [{c}]"]["sampler_passes"]) == (2, 6)
        assert rows[f"adjust:4 [{c}]"]["ratio_to_uncached"] > 0
    with pytest.raises(SystemExit):
        gpu_bench.main(["--size", "tiny", "--device", "cpu", "--cache", "dual"])  # no --block-length


def test_issue23_preset(gpu_bench, tmp_path, capsys):
    """--preset issue23: its settings (flags given override them), and its code path at tiny size on the CPU."""
    _, a = gpu_bench.parse_args(["--preset", "issue23"])
    assert (a.size, a.native, a.dtype, a.prompt_length, a.gen_length, a.block_length, a.max_tokens) == \
        ("7b", True, "bfloat16", 256, 256, 32, 64)
    assert (a.batch_sizes, a.cache, a.tokens_per_pass, a.tau, a.unroll, a.pass_rows, a.spec_depth, a.json) == \
        ("1,8", "none,dual", 4, 0.9, "full,fast", "1,2,4,8,16", 0, "results/gpu_bench_7b_issue23.json")
    _, b = gpu_bench.parse_args(["--preset", "issue23", "--size", "tiny", "--max-tokens", "8"])
    assert (b.size, b.max_tokens, b.cache) == ("tiny", 8, "none,dual")
    assert gpu_bench.parse_args([])[1].json is None  # no preset: no report file unless asked

    out = tmp_path / "bench.json"
    rc = gpu_bench.main(["--preset", "issue23", "--size", "tiny", "--device", "cpu", "--dtype", "float32",
                         "--batch-sizes", "1", "--prompt-length", "8", "--gen-length", "16", "--block-length", "8",
                         "--max-tokens", "8", "--repeats", "1", "--warmup", "0", "--pass-repeats", "2",
                         "--sampler-layers", "2", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["preset"] == "issue23" and report["caches"] == ["none", "dual"]
    assert report["sampler_layers"] == 2  # the task model's two-block sampler, timed at the base's shape
    assert report["unrolls"] == ["full", "fast"] and report["tau"] == 0.9
    rows = {r["strategy"]: r for r in report["throughput"]}
    labels = ("exact", "parallel:4", "threshold:0.9", "adjust:4", "adjust:4+fast", "threshold-adjust:0.9:4",
              "threshold-adjust:0.9:4+fast")  # no speculative: the issue-26 run times it
    assert set(rows) == {f"{s} [{c}]" for s in labels for c in ("none", "dual")}
    for c in ("none", "dual"):
        for s in labels:
            r = rows[f"{s} [{c}]"]
            assert r["tokens"] == 8 and r["ratio_to_uncached"] > 0
            if s.startswith("threshold-adjust"):  # one or two tokens a pass (a draw beyond its spacing)
                assert 4 <= r["full_passes"] < 8 and 0 < r["sampler_passes"] <= 2 * r["full_passes"], (s, c)
                continue
            assert (r["full_passes"], r["sampler_passes"]) == {"exact": (8, 0), "parallel:4": (2, 0),
                                                               "threshold:0.9": (8, 0)}.get(s, (2, 6)), (s, c)
    pc = report["pass_cost"]["tiny"]
    assert {"full", "refresh", "span"} <= set(pc) and pc["unroll_cost"] > 0 and pc["unroll_cost_fast"] > 0
