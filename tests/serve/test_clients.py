"""`adjust serve` driven by clients nobody here wrote: the openai SDK (sync, async, streaming, models.retrieve),
langchain-openai, litellm, and lm-evaluation-harness's own API models (local-completions on a multiple-choice
task and a generation task, with only base_url and model; local-chat-completions on an instruct-layout LLaDA
checkpoint). Also the log-likelihood definition the server returns, against the library's one routine."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from .conftest import CHAT_TEMPLATE, ROOT, LiveServer
from .test_serve_api import post

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "base"))  # published.py: checkpoint writers
openai = pytest.importorskip("openai")
TASK_BASE = ROOT / "models" / "task-base"


@pytest.fixture(scope="module")
def chat_server(make_server):
    return make_server(chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def task_server():
    from adjust.loader import ModelSpec, load_models
    from adjust.serve.app import create_app

    base, sampler = load_models(ModelSpec(base=str(TASK_BASE)), "optional")
    s = LiveServer(create_app(base, sampler, batch_wait_ms=5))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def instruct_server(tmp_path_factory):
    from published import write_llada

    from adjust.loader import ModelSpec, load_models
    from adjust.serve.app import create_app

    path = write_llada(tmp_path_factory.mktemp("instruct") / "LLaDA-tiny-Instruct", seed=4)
    base, _ = load_models(ModelSpec(base=str(path)), "none")
    s = LiveServer(create_app(base, None, batch_wait_ms=5))
    s.path = path
    yield s
    s.stop()


# ---------------------------------------------------------------------------------------------
# the openai SDK
# ---------------------------------------------------------------------------------------------
def test_openai_models_retrieve_and_openai_404(chat_server):
    c = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="x", max_retries=0)
    m = c.models.retrieve("shakespeare-base")
    assert m.id == "shakespeare-base" and m.model_extra["max_model_len"] == 128
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found"


def test_openai_async_completion_and_chat_stream(chat_server):
    async def run():
        c = openai.AsyncOpenAI(base_url=chat_server.url + "/v1", api_key="x", max_retries=0)
        r = await c.completions.create(model="shakespeare-base", prompt="ROMEO:", max_tokens=8, seed=3)
        parts = []
        stream = await c.chat.completions.create(model="shakespeare-base", max_tokens=12, seed=3, stream=True,
                                                 messages=[{"role": "user", "content": "Speak"}],
                                                 stream_options={"include_usage": True})
        async for chunk in stream:
            parts.append(chunk)
        return r, parts

    r, parts = asyncio.run(run())
    assert r.choices[0].text and r.usage.completion_tokens <= 8
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert parts[-1].usage is not None and parts[-1].choices == []
    finish = [p.choices[0].finish_reason for p in parts if p.choices and p.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    status, plain = post(chat_server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "Speak"}],
                                                                    "max_tokens": 12, "seed": 3})
    assert text == plain["choices"][0]["message"]["content"]


def test_extension_step_chunks_carry_empty_choices(chat_server):
    c = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="x", max_retries=0)
    kinds = set()
    for chunk in c.completions.create(model="shakespeare-base", prompt="ROMEO:", max_tokens=8, stream=True,
                                      extra_body={"stream_options": {"include_steps": True}}):
        for choice in chunk.choices:  # a plain SDK loop: every chunk has choices (adjust.step: [])
            kinds.add(type(choice.text).__name__)
        kinds.add(chunk.object)
    assert "adjust.step" in kinds and "text_completion" in kinds


# ---------------------------------------------------------------------------------------------
# LangChain and LiteLLM
# ---------------------------------------------------------------------------------------------
def test_langchain_openai_invoke_and_stream(chat_server):
    lc = pytest.importorskip("langchain_openai")
    chat = lc.ChatOpenAI(base_url=chat_server.url + "/v1", api_key="x", model="shakespeare-base", max_tokens=12,
                         max_retries=0, seed=5)
    answer = chat.invoke("Speak").content
    streamed = "".join(c.content for c in chat.stream("Speak"))
    assert isinstance(answer, str) and answer == streamed  # same seed, same text
    completion = lc.OpenAI(base_url=chat_server.url + "/v1", api_key="x", model="shakespeare-base", max_tokens=8,
                           max_retries=0).invoke("ROMEO:")
    assert isinstance(completion, str) and completion


def test_litellm_completion_and_stream(chat_server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    litellm = pytest.importorskip("litellm")
    kw = dict(model="openai/shakespeare-base", api_base=chat_server.url + "/v1", api_key="x", max_tokens=12, seed=5,
              messages=[{"role": "user", "content": "Speak"}])
    r = litellm.completion(**kw)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in litellm.completion(stream=True, **kw))
    assert r.choices[0].message.content == streamed
    assert r.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------------------------
# log-likelihoods
# ---------------------------------------------------------------------------------------------
def test_echo_logprobs_are_the_chain_rule(task_server):
    from adjust.likelihood import chain_logprobs

    base = task_server.batcher.base
    ids = base.encode("reverse: bee ink key pen egg = egg pen key ink bee")
    status, out = post(task_server.url + "/v1/completions", {"prompt": ids, "echo": True, "logprobs": 3,
                                                             "max_tokens": 0})
    assert status == 200
    lp = out["choices"][0]["logprobs"]
    want, top_ids, top_lp = chain_logprobs(base, ids, 0, 3)
    assert lp["token_logprobs"] == pytest.approx(want.tolist(), abs=1e-5)
    assert len(lp["tokens"]) == len(ids) and len(lp["top_logprobs"]) == len(ids)
    assert all(max(d.values()) == pytest.approx(float(v[0]), abs=1e-5) for d, v in zip(lp["top_logprobs"], top_lp))
    assert out["choices"][0]["text"] == base.tokenizer.decode(ids) and out["usage"]["completion_tokens"] == 0
    # the sum over any suffix is that suffix's log-probability given the rest: the same whatever the split
    for split in (3, 7):
        assert sum(lp["token_logprobs"][split:]) == pytest.approx(
            float(chain_logprobs(base, ids, split)[0].sum()), abs=1e-4)


def test_generated_logprobs_are_the_drawn_tokens_probabilities(task_server):
    status, out = post(task_server.url + "/v1/completions", {"prompt": "reverse: bee ink key =", "logprobs": 2,
                                                             "max_tokens": 6, "temperature": 0, "seed": 1})
    assert status == 200
    c = out["choices"][0]
    lp = c["logprobs"]
    assert "".join(lp["tokens"]).startswith(c["text"]) and len(lp["tokens"]) >= out["usage"]["completion_tokens"]
    for tok_lp, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert tok_lp <= 0 and tok_lp == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the top token


def test_scoring_row_limit_is_a_clear_400(make_server):
    from adjust.serve.limits import Limits

    s = make_server(limits=Limits(max_scored_tokens=8))
    status, out = post(s.url + "/v1/completions", {"prompt": "To be, or not to be, that is", "echo": True,
                                                   "logprobs": 0, "max_tokens": 0})
    assert status == 400 and out["error"]["code"] == "too_many_tokens" and "--max-scored-tokens" in out["error"]["message"]


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness's own API models, with only base_url and model
# ---------------------------------------------------------------------------------------------
def _evaluate(model: str, model_args: str, task: str, limit: int, **kw) -> dict:
    import lm_eval

    import adjust.harness

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=limit,
                                  task_manager=adjust.harness.task_manager(), **kw)
    return out["results"][task]


def test_lm_eval_local_completions_multiple_choice_equals_in_process(task_server):
    pytest.importorskip("lm_eval")
    served = _evaluate("local-completions", f"base_url={task_server.url}/v1/completions,model=task-base",
                       "adjust_reverse_mc", 12)
    local = _evaluate("adjust", f"base={TASK_BASE},likelihood=chain,check_greedy=false", "adjust_reverse_mc", 12)
    assert served["acc,none"] == local["acc,none"]
    assert served["acc,none"] > 0.5  # the task model tells the reversed words from wrong orders


def test_lm_eval_local_completions_generate_until(task_server):
    pytest.importorskip("lm_eval")
    res = _evaluate("local-completions", f"base_url={task_server.url}/v1/completions,model=task-base",
                    "adjust_reverse", 4)
    assert 0.0 <= res["validity,none"] <= 1.0


def test_lm_eval_local_chat_completions_on_an_instruct_checkpoint(instruct_server):
    pytest.importorskip("lm_eval")
    name = instruct_server.path.name
    res = _evaluate("local-chat-completions", f"base_url={instruct_server.url}/v1/chat/completions,model={name}",
                    "adjust_reverse", 2, apply_chat_template=True)
    assert 0.0 <= res["validity,none"] <= 1.0


# ---------------------------------------------------------------------------------------------
# chat on an instruct checkpoint: how answers end, usage, and the CLI's tokens
# ---------------------------------------------------------------------------------------------
def test_instruct_chat_matches_generate_chat_and_reports_stops(instruct_server, capsys):
    from adjust.cli import main

    name = instruct_server.path.name
    c = openai.OpenAI(base_url=instruct_server.url + "/v1", api_key="x", max_retries=0)
    r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "the fox"}], n=8, seed=7,
                                  max_tokens=16)
    capsys.readouterr()
    assert main(["generate", "--base", str(instruct_server.path), "--chat", "--prompt", "the fox",
                 "--num-samples", "8", "--seed", "7", "--gen-length", "16", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    base = instruct_server.batcher.base
    samples = cli["samples"] if isinstance(cli, dict) else cli
    for choice, sample in zip(r.choices, samples):
        assert choice.message.content == sample["text"]
        ids = sample["token_ids"]
        cut = next((i for i, t in enumerate(ids) if t in base.stop_ids), None)
        assert choice.finish_reason == ("length" if cut is None else "stop")
    stops = [i for s in samples for i in [next((k for k, t in enumerate(s["token_ids"]) if t in base.stop_ids),
                                               len(s["token_ids"]))]]
    assert r.usage.completion_tokens == sum(stops)


def test_model_id_is_the_directory_name(instruct_server):
    c = openai.OpenAI(base_url=instruct_server.url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in c.models.list().data] == ["LLaDA-tiny-Instruct"]


def test_shipped_tokenizers_are_complete_for_transformers():
    from transformers import AutoTokenizer

    from adjust.base import load_base

    for d in ("shakespeare-base", "task-base"):
        ours = load_base(str(ROOT / "models" / d))
        auto = AutoTokenizer.from_pretrained(str(ROOT / "models" / d))
        assert (auto.eos_token_id, auto.mask_token_id, auto.pad_token_id) == (ours.eos_id, ours.mask_id, ours.pad_id)
        text = "ROMEO: What light,  through yonder?\n"
        assert auto.encode(text, add_special_tokens=False) == ours.encode(text)


def test_harness_cli_passes_lm_eval_models_through():
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    code = ("import adjust.harness; from lm_eval.api.registry import get_model; "
            "print(get_model('local-completions').__name__, get_model('adjust').__name__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["LocalCompletionsAPI", "AdjustLM"]


def test_chat_without_max_tokens_runs_to_the_end_of_turn_or_the_canvas(chat_server):
    status, out = post(chat_server.url + "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "Speak"}], "seed": 2, "strategy": "exact"})
    assert status == 200
    c, used = out["choices"][0], out["usage"]
    room = 128 - used["prompt_tokens"]  # the shipped model's context, less the prompt
    if c["finish_reason"] == "length":
        assert used["completion_tokens"] == room  # the whole canvas, not OpenAI's 16 of a completion
    else:
        assert c["finish_reason"] == "stop" and out["adjust_stats"]["full_passes"] <= room
    assert out["adjust_stats"]["full_passes"] > 16
