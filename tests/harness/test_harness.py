"""The lm-eval model `adjust` and the adjust_* tasks, with the real lm_eval package (issue 15).

The model is the shipped task model (models/task-base, 0.92M parameters); one instance per module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from adjust.decode import generate_texts  # noqa: E402
from adjust.errors import AdjustError  # noqa: E402
from adjust.eval.tasks import DEFAULT_GEN_LENGTH, TASKS, is_valid, write_task_prompts  # noqa: E402
from adjust.harness import TASKS_DIR, AdjustLM, task_manager  # noqa: E402
from adjust.harness.model import cut_at_stops  # noqa: E402
from adjust.sampling import SamplingConfig  # noqa: E402
from adjust.strategies import make_strategy  # noqa: E402

TASK_BASE = Path(__file__).resolve().parents[2] / "models" / "task-base"


@pytest.fixture(scope="module")
def lm():
    return AdjustLM(base=str(TASK_BASE), strategy="exact", batch_size=8, mc_num=16)


def _gen(lm, context, **gen_kwargs):
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("adjust") is AdjustLM


def test_simple_evaluate_end_to_end_with_stop_sequence(lm, tmp_path):
    """A tiny task (4 list prompts, stop at a word the answers contain) through lm_eval.simple_evaluate:
    each answer is the one-loop generation for (seed, prompt) cut at the stop, and validity is scored."""
    prompts = ["list: cat dog sun =", "list: red blue fish bird =", "list: owl pig rat =", "list: map key bed egg ="]
    raw, _ = generate_texts(lm.base, prompts, make_strategy("exact"), SamplingConfig(), gen_length=16, seed=0)
    stop = " " + raw[0]["text"].split()[1]  # the first answer's second word: cut there at least once
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "tiny_stop.py").write_text(
        "import datasets, json, pathlib\n"
        "from adjust.eval.tasks import is_valid\n"
        "def docs(**kw):\n"
        "    f = pathlib.Path(__file__).with_name('prompts.jsonl')\n"
        "    return {'test': datasets.Dataset.from_list([json.loads(x) for x in f.read_text().splitlines()])}\n"
        "def score(doc, results):\n"
        "    return {'validity': float(is_valid(doc['prompt'], results[0]))}\n")
    (tmp_path / "tiny_stop.yaml").write_text(
        "task: tiny_stop\ndataset_path: ''\ncustom_dataset: !function tiny_stop.docs\noutput_type: generate_until\n"
        "test_split: test\ndoc_to_text: '{{prompt}}'\ndoc_to_target: ''\nprocess_results: !function tiny_stop.score\n"
        "metric_list:\n  - metric: validity\n    aggregation: mean\n    higher_is_better: true\n"
        f"generation_kwargs:\n  until: [{json.dumps(stop)}, \"\\n\"]\n  max_gen_toks: 16\n  do_sample: true\n"
        "  temperature: 1.0\nmetadata:\n  version: 1.0\n")
    tm = task_manager(str(tmp_path), include_defaults=False)  # lm-eval's own tasks: not needed, slow to index
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_stop"], task_manager=tm, log_samples=True)
    logged = {s["doc"]["prompt"]: s["filtered_resps"][0] for s in out["samples"]["tiny_stop"]}
    expected = {r["prompt"]: cut_at_stops(r["text"], [stop, "\n"]) for r in raw}
    assert logged == expected
    assert logged[prompts[0]] == raw[0]["text"][: raw[0]["text"].index(stop)]  # the stop did cut
    assert all(stop not in text for text in logged.values())
    validity = sum(is_valid(p, t) for p, t in expected.items()) / len(prompts)
    assert out["results"]["tiny_stop"]["validity,none"] == pytest.approx(validity)


def test_shipped_task_runs_and_matches_eval_tasks_answers(lm):
    """adjust_list (shipped YAML + prompts) with --limit 5: the answers are the one loop's, seed for seed."""
    out = lm_eval.simple_evaluate(model=lm, tasks=["adjust_list"], task_manager=task_manager(include_defaults=False),
                                  limit=5, log_samples=True)
    logged = out["samples"]["adjust_list"]
    prompts = [s["doc"]["prompt"] for s in logged]
    raw, _ = generate_texts(lm.base, prompts, make_strategy("exact"), SamplingConfig(), gen_length=DEFAULT_GEN_LENGTH,
                            seed=0, batch_size=64)
    assert [s["filtered_resps"][0] for s in logged] == [r["text"].split("\n")[0] for r in raw]
    valid = [is_valid(p, r["text"]) for p, r in zip(prompts, raw)]
    assert out["results"]["adjust_list"]["validity,none"] == pytest.approx(sum(valid) / len(valid))


def test_shipped_task_yamls_generate_the_tasks_region():
    """Each shipped task's max_gen_toks is the region `adjust eval tasks` decodes (tasks.DEFAULT_GEN_LENGTH)."""
    import re

    for name in TASKS:
        text = (TASKS_DIR / f"adjust_{name}.yaml").read_text()
        assert re.search(r"^\s*max_gen_toks: (\d+)$", text, re.M).group(1) == str(DEFAULT_GEN_LENGTH), name


def test_shipped_prompts_are_the_writer_output(tmp_path):
    """The task data is exactly `python -m adjust.eval.tasks prompts --n 200 --split eval --seed 1`."""
    write_task_prompts(tmp_path / "p.jsonl", 200, seed=1, split="eval")
    assert (tmp_path / "p.jsonl").read_bytes() == (TASKS_DIR / "eval_prompts.jsonl").read_bytes()


def test_max_gen_toks_and_repeats(lm):
    """max_gen_toks keeps that many tokens of a longer region; repeats of a context are sample 0, 1, ..."""
    p = "list: cat dog sun ="
    full, _ = generate_texts(lm.base, [p], make_strategy("exact"), SamplingConfig(), gen_length=16, num_samples=2)
    lm16 = AdjustLM(base=str(TASK_BASE), gen_length=16)
    (short,) = lm16.generate_until([_gen(lm16, p, max_gen_toks=3, until=[])])
    assert short == lm.base.decode(full[0]["token_ids"][:3])
    a, b = lm.generate_until([_gen(lm, p, max_gen_toks=16), _gen(lm, p, max_gen_toks=16)])
    assert [a, b] == [s["text"] for s in full]


def test_do_sample_false_is_greedy(lm):
    p = "reverse: cat dog sun ="
    raw, _ = generate_texts(lm.base, [p], make_strategy("exact"), SamplingConfig(temperature=0.0), gen_length=16)
    (out,) = lm.generate_until([_gen(lm, p, max_gen_toks=16, do_sample=False, until=[])])
    assert out == raw[0]["text"]


def test_loglikelihood_ranks_valid_answer_above_corrupted(lm):
    """On the task model, a valid answer's bound beats a corrupted one (a word repeated, one dropped)."""
    prompts = ["list: cat dog sun =", "list: red blue fish bird =", "reverse: owl pig rat =", "list: map key bed ="]
    reqs, n = [], 0
    for p in prompts:
        items = p.split(":")[1].split("=")[0].split()
        good = " " + " ".join(items[::-1])
        bad = " " + " ".join([items[0]] * 2 + items[2:])
        assert is_valid(p, good) and not is_valid(p, bad)
        reqs += [Instance("loglikelihood", {}, (p, good), n), Instance("loglikelihood", {}, (p, bad), n + 1)]
        n += 2
    res = lm.loglikelihood(reqs)
    for k in range(0, len(res), 2):
        (good_lp, _), (bad_lp, _) = res[k], res[k + 1]
        assert math.isfinite(good_lp) and good_lp < 0
        assert good_lp > bad_lp + 1.0, (prompts[k // 2], good_lp, bad_lp)


def test_loglikelihood_is_the_training_bound_and_is_greedy(lm):
    """The score is -(tokens) x estimate_nll of the continuation (training's routine; one draw per pass
    at batch_size 1), it does not depend on the other requests, and is_greedy is True exactly for the
    greedy decode's own tokens."""
    from adjust.likelihood import estimate_nll

    p = "reverse: cat dog sun ="
    raw, _ = generate_texts(lm.base, [p], make_strategy("exact"), SamplingConfig(temperature=0.0), gen_length=4)
    greedy_ids = raw[0]["token_ids"]
    greedy_text = lm.base.tokenizer.decode(greedy_ids)
    ctx, cont = lm._encode_pair(p, greedy_text)
    assert cont == greedy_ids  # the greedy answer re-encodes to its own tokens
    [(lp, is_greedy), (_, other)] = lm.loglikelihood([Instance("loglikelihood", {}, (p, greedy_text), 0),
                                                     Instance("loglikelihood", {}, (p, " cat cat"), 1)])
    assert is_greedy and not other
    [(alone, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (p, greedy_text), 0)])
    assert alone == lp
    one = AdjustLM(base=str(TASK_BASE), batch_size=1, mc_num=16, check_greedy=False)
    [(lp1, flag)] = one.loglikelihood([Instance("loglikelihood", {}, (p, greedy_text), 0)])
    assert flag is False
    ids = torch.tensor([ctx + cont])
    eligible = torch.zeros_like(ids, dtype=torch.bool)
    eligible[0, len(ctx):] = True
    nll = estimate_nll(one.base, ids, eligible, draws=16, seed=0)
    assert lp1 == pytest.approx(-float(nll[0]) * len(cont), rel=1e-5)


def test_loglikelihood_rolling_windows(lm):
    """A text longer than the context (40 tokens) is scored in windows; a short one equals loglikelihood("", text)."""
    short = "list: cat dog sun = sun cat dog"
    long = " ".join(["list: cat dog sun = sun cat dog"] * 8)
    assert len(lm._bare(long)) > lm.base.max_length
    r_short, r_long = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0),
                                                Instance("loglikelihood_rolling", {}, (long,), 1)])
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("", short), 0)])
    assert r_short == pytest.approx(ll, rel=1e-5)
    assert math.isfinite(r_long) and r_long < r_short < 0


@pytest.mark.parametrize("args, message", [
    ({"strategy": "exact", "tau": 0.9}, "takes no model arg tau"),
    ({"strategy": "parallel", "group": 2}, "takes no model arg group"),
    ({"unroll": "faster"}, "unknown --unroll 'faster'"),
    ({"strategy": "adjust", "tokens_per_pass": 2, "group": 3}, "group must be an integer from 1 to K (2)"),
    ({"strategy": "adjust", "group": "two"}, "model arg group='two' is not an integer"),
    ({"strategy": "adjust-threshold", "max_tokens_per_pass": 0}, "model arg max_tokens_per_pass must be at least 1"),
    ({"strategy": "threshold-adjust", "spacing": -1}, "model arg spacing must be at least 0"),
    ({"strategy": "speculative", "branch": -1}, "model arg branch must be at least 0"),
    ({"cache": "prefix"}, "needs --block-length"),
    ({"cache": "disk", "block_length": 4}, "unknown --cache"),
    ({"cache_verify": 2}, "there is none with --cache none"),
    ({"cache": "dual", "block_length": 4, "cache_verify": -1}, "model arg cache_verify must be at least 0"),
    ({"bogus": 1}, "unknown model arg(s) bogus"),
    ({"mc_num": 0}, "mc_num must be at least 1"),
    ({"temperature": -1}, "--temperature"),
    ({"strategy": "adjust", "tokens_per_pass": 2, "sampler": "/nonexistent/sampler"}, "not found"),
    ({"chat": True}, "no chat template"),
])
def test_bad_model_args_are_refused(args, message):
    with pytest.raises(AdjustError, match=None) as e:
        AdjustLM(base=str(TASK_BASE), **args)
    assert message in str(e.value)


def test_integer_args_that_may_be_zero_are_taken():
    """spacing and branch are 0 at their smallest (spacing 0: the hybrid's rule without it); the others 1."""
    assert AdjustLM(base=str(TASK_BASE), strategy="threshold-adjust", spacing="0").strategy.spacing == 0
    assert AdjustLM(base=str(TASK_BASE), strategy="speculative", branch=0).strategy.branch == 0


def test_chat_template(lm):
    """--apply_chat_template uses the tokenizer's template; a model without one is refused clearly."""
    with pytest.raises(AdjustError, match="no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])
    chat = AdjustLM(base=str(TASK_BASE))
    chat.base.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} ={% endfor %}"
    assert chat.apply_chat_template([{"role": "user", "content": "list: cat dog sun"}]) == "list: cat dog sun ="
    chat.chat = True
    with pytest.raises(AdjustError, match="not both"):  # chat=true and --apply_chat_template would wrap twice
        chat.apply_chat_template([{"role": "user", "content": "list: cat dog sun"}])
    (out,) = chat.generate_until([_gen(chat, "list: cat dog sun", max_gen_toks=16, until=["\n"])])
    raw, _ = generate_texts(chat.base, ["list: cat dog sun ="], make_strategy("exact"), SamplingConfig(),
                            gen_length=16)
    assert out == raw[0]["text"].split("\n")[0]


def test_wrapper_bad_base_is_one_line(capsys):
    from adjust.harness.__main__ import main

    rc = main(["--model", "adjust", "--model_args", "base=/nonexistent/model", "--tasks", "adjust_list",
               "--limit", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("adjust: error: base model directory not found")
    assert not any("Traceback" in line for line in err)


def test_task_files_are_package_data():
    """Every file of the task folder is matched by pyproject's package-data, so a wheel ships it."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    cfg = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["adjust.harness"]
    files = [p.relative_to(TASKS_DIR.parent).as_posix() for p in TASKS_DIR.iterdir() if p.is_file()]
    assert {"tasks/adjust_list.yaml", "tasks/eval_prompts.jsonl", "tasks/utils.py"} <= set(files)
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), files


def test_model_args_win_over_lm_eval_defaults():
    """lm-eval's CLI always passes batch_size 1 and device cuda:0: model_args win, and a missing GPU
    falls back to the CPU instead of failing (`--model_args batch_size=4` with no GPU here)."""
    made = AdjustLM.create_from_arg_string(f"base={TASK_BASE},batch_size=4",
                                           {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"})
    assert made.batch_size == 4
    if not torch.cuda.is_available():
        assert made.device.type == "cpu"


def test_unroll_reaches_the_decoding_loop():
    """model arg unroll: generate_until decodes ADJUST's unrolls in that mode, as generate_texts does (on the
    shipped model at K = 8 the two modes give different text here, so the arg is not ignored)."""
    shipped = TASK_BASE.parent / "shakespeare-base"
    p, texts = "KING HENRY.", {}
    for mode in ("full", "fast"):
        lm = AdjustLM(base=str(shipped), strategy="adjust", tokens_per_pass=8, unroll=mode, seed=3)
        (texts[mode],) = lm.generate_until([_gen(lm, p, max_gen_toks=32, until=[])])
        want, stats = generate_texts(lm.base, [p], make_strategy("adjust", tokens_per_pass=8), SamplingConfig(),
                                     gen_length=32, seed=3, sampler=lm.sampler, unroll=mode)
        assert texts[mode] == want[0]["text"] and stats.to_dict()["unroll"] == mode
    assert texts["full"] != texts["fast"]
    lm = AdjustLM(base=str(shipped), strategy="adjust", tokens_per_pass=8, seed=3)  # not given: the fast unroll
    assert lm.unroll == "fast" and lm.generate_until([_gen(lm, p, max_gen_toks=32, until=[])]) == [texts["fast"]]
    assert AdjustLM(base=str(shipped), strategy="exact", seed=3).unroll == "full"  # no unrolls to make fast


def test_cache_reaches_the_decoding_loop():
    """model arg cache: generate_until decodes with the loop's key/value cache, as generate_texts does with it."""
    p = "list: cat dog sun ="
    cached = AdjustLM(base=str(TASK_BASE), gen_length=16, block_length=8, cache="dual")
    (out,) = cached.generate_until([_gen(cached, p, max_gen_toks=16, until=[])])
    want, stats = generate_texts(cached.base, [p], make_strategy("exact"), SamplingConfig(), gen_length=16,
                                 block_length=8, cache="dual")
    assert out == want[0]["text"] and stats.to_dict()["cache"] == "dual"
    verified = AdjustLM(base=str(TASK_BASE), gen_length=16, block_length=8, cache="dual", cache_verify=3)
    (out,) = verified.generate_until([_gen(verified, p, max_gen_toks=16, until=[])])
    want, stats = generate_texts(verified.base, [p], make_strategy("exact"), SamplingConfig(), gen_length=16,
                                 block_length=8, cache="dual", cache_verify=3)
    L = len(verified.base.encode(p)) + 16  # 2 blocks: a refresh and 7 passes of the block and 3 verified positions
    assert out == want[0]["text"] and stats.positions == 2 * L + 14 * (8 + 3)


def test_speculative_gives_exact_answers_with_the_sampler_beside_the_base():
    """model args strategy=speculative,depth=3: exact's text for the same seed; the sampler beside the base drafts."""
    p = "list: cat dog sun ="
    spec = AdjustLM(base=str(TASK_BASE), strategy="speculative", depth=3, seed=2)
    assert spec.sampler is not None  # optional for it: loaded when present
    (out,) = spec.generate_until([_gen(spec, p, max_gen_toks=16, until=[])])
    want, _ = generate_texts(spec.base, [p], make_strategy("exact"), SamplingConfig(), gen_length=16, seed=2)
    assert out == want[0]["text"]


@pytest.mark.parametrize("unroll", ["full", "fast"])
def test_compare_gives_identical_answers_on_both_sides(unroll):
    """python -m adjust.harness.compare: `adjust eval tasks`' evaluation and lm-eval's answer with the same tokens,
    ADJUST's unrolls in the same mode on both sides (the harness model alone would default to fast)."""
    from adjust.harness.compare import compare

    out = compare(str(TASK_BASE), ["either"], "adjust:4", seed=0, limit=3, unroll=unroll)
    (row,) = out["rows"]
    assert row["n"] == 3 and row["identical_answers"] == 3 and row["eval_tasks_valid"] == row["harness_valid"]
    assert out["unroll"] == unroll
