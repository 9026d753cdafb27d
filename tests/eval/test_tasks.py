"""Verifiable tasks: validators on hand-made answers, seeded generators, held-out split, evaluation and CLI."""

from __future__ import annotations

import json

import pytest
import torch

from adjust.base.tiny import EOS
from adjust.data import read_examples
from adjust.errors import AdjustError
from adjust.eval import tasks as T
from adjust.eval.specs import build_strategy, parse_strategy_specs, spec_label

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# validators: exact hand-made cases
# --------------------------------------------------------------------------------------------
LIST = "list: cat dog sun ="
PICK = "pick: cat dog sun map ="
SHUFFLE = "shuffle: cat dog sun fish ="
REVERSE = "reverse: cat dog sun ="


@pytest.mark.parametrize("answer", [" cat dog sun", " sun cat dog", " dog sun cat", "dog  sun cat ", " sun cat dog\nlist"])
def test_list_accepts_any_order(answer):
    assert T.is_valid(LIST, answer)


@pytest.mark.parametrize("answer", [
    " cat cat sun",  # duplicate (the parallel-decoding failure)
    " cat dog",  # missing word
    " cat dog sun sun",  # extra duplicate
    " cat dog sun fox",  # extra foreign word
    " cat dog fox",  # substitution
    " catdog sun",  # glued
    "",  # empty
    "\ncat dog sun",  # answer after the newline does not count
])
def test_list_rejects_duplicates_and_wrong_sets(answer):
    assert not T.is_valid(LIST, answer)


@pytest.mark.parametrize("answer", [" cat cat cat cat", " map map map map", "sun sun sun sun\n", f" dog dog dog dog{EOS}junk"])
def test_pick_accepts_one_given_word_once_per_given_word(answer):
    assert T.is_valid(PICK, answer)


@pytest.mark.parametrize("answer", [
    " cat cat dog cat",  # positions disagree (the parallel-decoding failure)
    " cat dog sun map",  # the list
    " cat cat cat",  # too few
    " cat cat cat cat cat",  # too many
    " fox fox fox fox",  # not a given word
    " catcat catcat catcat catcat",
    " pick pick pick pick",
    "",
])
def test_pick_rejects_disagreement_and_wrong_counts(answer):
    assert not T.is_valid(PICK, answer)


@pytest.mark.parametrize("answer", [" dog cat fish sun", " sun fish dog cat", " cat dog fish sun", " fish dog sun cat"])
def test_shuffle_accepts_every_other_order(answer):
    assert T.is_valid(SHUFFLE, answer)


@pytest.mark.parametrize("answer", [
    " cat dog sun fish",  # the given order
    " sun fish dog fish",  # duplicate
    " dog cat fish",  # missing word
    " dog cat fish sun hat",  # extra word
    "",
])
def test_shuffle_rejects_the_given_order_and_wrong_sets(answer):
    assert not T.is_valid(SHUFFLE, answer)


def test_reverse_accepts_only_the_reversal():
    assert T.is_valid(REVERSE, " sun dog cat")
    assert T.is_valid(REVERSE, "sun dog cat\n")
    for wrong in [" cat dog sun", " sun cat dog", " sun dog", " sun dog cat cat", " sun sun cat", " Sun dog cat", ""]:
        assert not T.is_valid(REVERSE, wrong), wrong


def test_either_accepts_one_whole_group():
    prompt = "either: red fox | blue sky tree ="
    for ok in [" red fox", " blue sky tree", "blue sky tree\n", " red fox<|endoftext|> blue"]:
        assert T.is_valid(prompt, ok), ok
    for wrong in [" red sky tree", " blue fox", " red", " blue sky", " fox red", " red fox blue sky tree", " |",
                  " red fox |", ""]:
        assert not T.is_valid(prompt, wrong), wrong


def test_validator_reads_only_the_prompt():
    # no reference answer is consulted: the same prompt text gives the same verdicts
    ex = T.Example("list", LIST, "dog sun cat", ["cat", "dog", "sun"])
    assert ex.check(" sun cat dog") and not ex.check(" dog dog cat")
    with pytest.raises(AdjustError):
        T.is_valid("translate: cat =", " chat")
    with pytest.raises(AdjustError):
        T.parse_prompt("list: cat dog")  # no "="


def test_generated_examples_are_valid_and_parse_back():
    for name in T.TASKS:
        for ex in T.examples(name, 50, seed=3):
            assert T.task_of(ex.prompt) == name
            assert T.parse_prompt(ex.prompt)[1] == ex.items
            assert T.is_valid(ex.prompt, " " + ex.answer), ex
    picks = T.examples("pick", 200, seed=3)
    assert all(len(set(e.answer.split())) == 1 and len(e.answer.split()) == len(e.items) for e in picks)
    assert len({e.answer.split()[0] == e.items[0] for e in picks}) == 2  # not always the first word
    for name, (lo, hi) in {"list": (5, 7), "shuffle": (5, 7), "pick": (4, 6), "reverse": (4, 6)}.items():
        exs = T.examples(name, 50, seed=3)
        assert all(lo <= len(e.items) <= hi and set(e.items) <= set(T.WORDS) for e in exs), name
        assert {len(e.items) for e in exs} == set(range(lo, hi + 1)), name
    eithers = T.examples("either", 200, seed=3)
    for e in eithers:
        a, b = T.TASKS["either"].groups(e.items)
        assert len(a) != len(b) and 1 <= min(len(a), len(b)) and max(len(a), len(b)) <= 4 and len(a) + len(b) <= 6
        assert len(set(a + b)) == len(a + b) and set(a + b) <= set(T.WORDS)
    assert {len(e.answer.split()) for e in eithers} == {1, 2, 3, 4}  # answers of every length
    assert len({e.answer.split() == T.TASKS["either"].groups(e.items)[0] for e in eithers}) == 2  # either group
    lists = T.examples("list", 50, seed=3)
    assert len({e.answer for e in lists}) > 1  # answers come in varied orders
    shuffles = T.examples("shuffle", 200, seed=3)
    assert all(e.answer.split() != e.items for e in shuffles)  # never the given order
    assert len({e.answer.split()[0] == e.items[0] for e in shuffles}) == 2  # a word may keep its place


# --------------------------------------------------------------------------------------------
# generators: seeds, held-out split, files
# --------------------------------------------------------------------------------------------
def test_generators_are_reproducible_by_seed(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    T.write_task_data(a, 90, seed=5)
    T.write_task_data(b, 90, seed=5)
    T.write_task_data(c, 90, seed=6)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    p1, p2 = tmp_path / "p1.jsonl", tmp_path / "p2.jsonl"
    T.write_task_prompts(p1, 10, seed=1)
    T.write_task_prompts(p2, 10, seed=1)
    assert p1.read_bytes() == p2.read_bytes()


def test_training_records_are_prompt_completion_pairs(tmp_path):
    out = tmp_path / "d.jsonl"
    assert T.write_task_data(out, 31, seed=0) == 31
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    counts = {name: 0 for name in T.TASKS}
    for r in recs:
        assert set(r) == {"prompt", "completion"} and r["prompt"].endswith(" =") and r["completion"].startswith(" ")
        assert EOS not in r["completion"]  # train-base --packing documents adds the EOS padding
        assert T.is_valid(r["prompt"], r["completion"])
        counts[T.task_of(r["prompt"])] += 1
    assert sorted(counts.values()) == [6, 6, 6, 6, 7]  # tasks in equal shares, interleaved
    assert [p + c for p, c in read_examples(out)] == [r["prompt"] + r["completion"] for r in recs]


def test_eval_prompts_are_held_out_of_training(tmp_path):
    train = {(e.task, frozenset(e.items)) for name in T.TASKS for e in T.examples(name, 300, seed=0)}
    held = [e for name in T.TASKS for e in T.examples(name, 30, seed=1, split="eval")]
    assert all(T.split_of(e.task, e.items) == "eval" for e in held)
    assert not {(e.task, frozenset(e.items)) for e in held} & train
    out = tmp_path / "p.jsonl"
    assert T.write_task_prompts(out, 4, seed=1) == 4 * len(T.TASKS)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["task"] for r in recs} == set(T.TASKS)
    assert all(set(r) == {"task", "prompt", "meta"} and T.task_of(r["prompt"]) == r["task"] for r in recs)
    assert all(r["prompt"].startswith(r["task"] + ":") for r in recs)  # at position 0, as in training
    assert T.read_task_prompts(out) == [{"task": r["task"], "prompt": r["prompt"]} for r in recs]
    plain = tmp_path / "p.txt"
    plain.write_text(LIST + "\n\n" + PICK + "\n")
    assert [r["task"] for r in T.read_task_prompts(plain)] == ["list", "pick"]


def test_module_main_writes_files(tmp_path, capsys):
    assert T.main(["data", "--out", str(tmp_path / "d.jsonl"), "--n", "6", "--tasks", "list,pick"]) == 0
    assert T.main(["prompts", "--out", str(tmp_path / "p.jsonl"), "--n", "2", "--split", "train"]) == 0
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 6
    assert T.main(["data", "--out", str(tmp_path / "x.jsonl"), "--n", "3", "--tasks", "nope"]) == 2


# --------------------------------------------------------------------------------------------
# strategy specs (shared with `adjust eval quality`)
# --------------------------------------------------------------------------------------------
def test_parse_strategy_specs():
    specs = parse_strategy_specs("exact, parallel:2,adjust:4,threshold:tau=0.9,factor:f=1;K=8,x:mode=fast")
    assert specs == [("exact", {}), ("parallel", {"tokens_per_pass": 2}), ("adjust", {"tokens_per_pass": 4}),
                     ("threshold", {"tau": 0.9}), ("factor", {"f": 1, "tokens_per_pass": 8}),
                     ("x", {"mode": "fast"})]
    assert [spec_label(*s) for s in specs[:4]] == ["exact", "parallel:2", "adjust:4", "threshold:tau=0.9"]
    for bad in ["", "parallel:two", ":2", "threshold:tau", "threshold:tau=1;tau=2"]:
        with pytest.raises(AdjustError):
            parse_strategy_specs(bad)
    assert build_strategy("parallel", {"tokens_per_pass": 3}).k == 3
    with pytest.raises(AdjustError):
        build_strategy("parallel", {"tau": 0.5})
    with pytest.raises(AdjustError):
        build_strategy("nope", {})


# --------------------------------------------------------------------------------------------
# evaluation on a tiny random model
# --------------------------------------------------------------------------------------------
def _prompts():
    return [ex.record() for name in T.TASKS for ex in T.examples(name, 3, seed=1, split="eval")]


def test_evaluate_tasks_on_a_random_model(tiny_base):
    from adjust.sampler import JointSampler, SamplerConfig

    torch.manual_seed(0)
    sampler = JointSampler(SamplerConfig.for_base(tiny_base)).eval()
    prompts = _prompts()
    res = T.evaluate_tasks(tiny_base, sampler, prompts, "exact,parallel:4,adjust:2", gen_length=8, seed=0)
    assert set(res["validity"]) == set(T.TASKS) | {"all"}
    assert set(res["validity"]["all"]) == {"exact", "parallel:4", "adjust:2"}
    rows = {(r["task"], r["label"]): r for r in res["results"]}
    assert len(rows) == 3 * (len(T.TASKS) + 1)
    for (task, label), r in rows.items():
        assert 0.0 <= r["valid"] <= 1.0
        assert r["n"] == (3 * len(T.TASKS) if task == "all" else 3)
    assert rows[("list", "exact")]["tokens_per_full_pass"] == 1.0
    assert rows[("all", "parallel:4")]["tokens_per_full_pass"] == 4.0 and rows[("all", "parallel:4")]["K"] == 4
    assert rows[("pick", "adjust:2")]["sampler_passes"] > 0
    json.dumps(res)  # serialisable
    # same seed, same answers
    again = T.evaluate_tasks(tiny_base, sampler, prompts, [("parallel", {"tokens_per_pass": 4})], gen_length=8)
    assert again["validity"]["all"]["parallel:4"] == res["validity"]["all"]["parallel:4"]


def test_evaluate_counts_valid_answers(tiny_base, monkeypatch):
    """Validity is the fraction of answers the validator accepts (generation stubbed)."""
    import adjust.decode as D

    answers = {LIST: " dog sun cat", PICK: " catmap", REVERSE: " sun dog cat"}

    def fake(base, prompts, strategy, sampling, **kw):
        stats = D.Stats(full_passes=2, row_passes=2 * len(prompts), new_tokens=kw["gen_length"], sequences=len(prompts))
        return [{"prompt": p, "text": answers[p]} for p in prompts], stats

    monkeypatch.setattr(D, "generate_texts", fake)
    res = T.evaluate_tasks(tiny_base, None, [LIST, PICK, REVERSE, LIST], "parallel:2", gen_length=8)
    assert res["validity"] == {"list": {"parallel:2": 1.0}, "pick": {"parallel:2": 0.0},
                               "reverse": {"parallel:2": 1.0}, "all": {"parallel:2": 0.75}}
    pick = next(r for r in res["results"] if r["task"] == "pick")
    assert pick["invalid_examples"] == [{"prompt": PICK, "answer": " catmap"}]


def test_cli_eval_tasks_prints_one_json_object(tiny_model_dir, tmp_path, capsys):
    from adjust.cli import main

    prompts = tmp_path / "p.jsonl"
    T.write_task_prompts(prompts, 2, seed=1)
    capsys.readouterr()
    rc = main(["eval", "tasks", "--base", str(tiny_model_dir), "--prompts", str(prompts), "--strategies",
               "exact,parallel:2", "--gen-length", "6", "--limit", "1", "--json", "--out-dir", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert set(res["validity"]["all"]) == {"exact", "parallel:2"}
    assert res["prompts"] == {name: 1 for name in T.TASKS}
    # the report: the same JSON, a Markdown table with one row per task, a PNG plot
    assert json.loads((tmp_path / "r" / "tasks.json").read_text())["validity"] == res["validity"]
    table = (tmp_path / "r" / "tasks.md").read_text().splitlines()
    assert table[0] == "| task | exact | parallel:2 |"
    assert [line.split(" | ")[0] for line in table[2:3 + len(T.TASKS)]] == [f"| {t}" for t in [*T.TASKS, "all"]]
    assert table[3 + len(T.TASKS)].startswith("| tokens / full pass | 1.00 | 2.00 |")
    assert (tmp_path / "r" / "tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = main(["eval", "tasks", "--base", str(tiny_model_dir), "--prompts", str(prompts), "--strategies", "adjust:2",
               "--json"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("adjust: error:") and "sampler" in err
    rc = main(["eval", "tasks", "--base", str(tiny_model_dir), "--prompts", str(prompts), "--strategies", "parallel:x"])
    assert rc == 2


# --------------------------------------------------------------------------------------------
# how held out the held-out prompts are; which code made a result
# --------------------------------------------------------------------------------------------
def test_heldout_overlap_counts_item_sets_trained_under_another_task():
    held = ["list: cat dog sun =", "list: red blue sky =", "reverse: hat cup pen =", PICK]
    train = ["reverse: sun dog cat =", "list: pen cup hat =", "list: cat dog =", {"prompt": "reverse: hat pen cup ="}]
    out = T.heldout_overlap(held, train)
    assert out["list"] == {"prompts": 2, "item_sets_in_training": 1, "by_training_task": {"reverse": 1}}
    assert out["reverse"] == {"prompts": 1, "item_sets_in_training": 1, "by_training_task": {"list": 1, "reverse": 1}}
    assert out["pick"]["item_sets_in_training"] == 0


def test_the_task_models_held_out_overlap_is_the_recorded_one():
    """The split holds out (task, item set) pairs, so a held-out `list` item set can be a training
    `shuffle` or `reverse` one. The task model's data (scripts/task_pipeline.sh: `data --n 200000 --seed 0`,
    40,000 examples a task) and held-out prompts (`prompts --n 200 --split eval --seed 1`) give the counts
    recorded in results/tasks_heldout_overlap.json, which docs/results.md states."""
    from pathlib import Path

    recorded = json.loads((Path(__file__).resolve().parents[2] / "results" / "tasks_heldout_overlap.json").read_text())
    train = [T.training_record(e) for task in T.TASKS for e in T.examples(task, 200000 // len(T.TASKS), seed=0)]
    held = [e.prompt for task in T.TASKS for e in T.examples(task, 200, seed=1, split="eval")]
    out = T.heldout_overlap(held, train)
    assert out == {task: recorded[task] for task in T.TASKS}


def test_module_main_reports_the_overlap(tmp_path, capsys):
    assert T.main(["data", "--out", str(tmp_path / "d.jsonl"), "--n", "20", "--tasks", "reverse"]) == 0
    rec = json.loads((tmp_path / "d.jsonl").read_text().splitlines()[0])
    (tmp_path / "p.txt").write_text(f"list: {' '.join(T.parse_prompt(rec['prompt'])[1])} =\n{LIST}\n")
    capsys.readouterr()
    assert T.main(["overlap", "--prompts", str(tmp_path / "p.txt"), "--train", str(tmp_path / "d.jsonl")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["list"]["prompts"] == 2 and got["list"]["item_sets_in_training"] >= 1
    assert "commit" in got["code_version"] or "package" in got["code_version"]


def test_evaluate_tasks_records_the_code_version(tiny_base):
    from adjust.provenance import code_version

    res = T.evaluate_tasks(tiny_base, None, [LIST], "parallel:4", gen_length=4)
    assert res["code_version"] == code_version()


def test_evaluate_tasks_with_cache(tiny_base, capsys, tiny_model_dir, tmp_path):
    """--block-length/--cache reach the decoding loop: a refresh on every pass gives the uncached answers."""
    from adjust.cli import main

    prompts = _prompts()
    plain = T.evaluate_tasks(tiny_base, None, prompts, "exact,parallel:2", gen_length=8, block_length=4)
    refreshed = T.evaluate_tasks(tiny_base, None, prompts, "exact,parallel:2", gen_length=8, block_length=4,
                                 cache="dual", cache_refresh=1)
    assert refreshed["cache"] == "dual" and refreshed["block_length"] == 4
    assert refreshed["validity"] == plain["validity"]
    assert [r["invalid_examples"] for r in refreshed["results"] if "invalid_examples" in r] == \
        [r["invalid_examples"] for r in plain["results"] if "invalid_examples" in r]
    verified = T.evaluate_tasks(tiny_base, None, prompts, "exact,parallel:2", gen_length=8, block_length=4,
                                cache="dual", cache_verify=64)  # every position verified: the uncached answers
    assert verified["cache_verify"] == 64 and verified["validity"] == plain["validity"]
    assert [r["invalid_examples"] for r in verified["results"] if "invalid_examples" in r] == \
        [r["invalid_examples"] for r in plain["results"] if "invalid_examples" in r]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    rc = main(["eval", "tasks", "--base", str(tiny_model_dir), "--prompts", str(f), "--cache", "prefix", "--json"])
    assert rc == 2 and "needs --block-length" in capsys.readouterr().err


def test_report_says_which_prompts_are_held_out(tiny_base):
    """A file of train-split prompts is reported as such, never as held-out; an eval-split file as before."""
    train = [e.prompt for task in ("list", "pick") for e in T.examples(task, 3, seed=2, split="train")]
    held = [e.prompt for task in ("list", "pick") for e in T.examples(task, 2, seed=2, split="eval")]
    res = T.evaluate_tasks(tiny_base, None, train + held[:2], "parallel:2", gen_length=4)
    assert res["prompts"] == {"list": 5, "pick": 3} and res["held_out"] == {"list": 2, "pick": 0}
    md = T.markdown_table(res)
    assert "prompts per task: list 5 (2 held out), pick 3 (0 held out);" in md and "held-out prompts" not in md
    md = T.markdown_table(T.evaluate_tasks(tiny_base, None, held, "parallel:2", gen_length=4))
    assert "held-out prompts per task: list 2, pick 2;" in md
