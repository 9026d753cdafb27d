"""The models shipped in models/: they load, each sampler belongs to its base, each has a card,
and the task model shows what its README claims (the joint matters on `list`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adjust.base import load_base
from adjust.eval import tasks as T
from adjust.sampler import JointSampler

MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED = ["shakespeare-base", "task-base"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_and_sampler_load_with_cards(name):
    base = load_base(MODELS / name)
    sampler = JointSampler.load(MODELS / name / "sampler", base)  # raises if it belongs to another base
    assert sampler.cfg.hidden_size == base.hidden_size
    for card in (MODELS / name / "README.md", MODELS / name / "sampler" / "README.md"):
        text = card.read_text()
        assert "Reproduce" in text and "final loss" in text and "seed" in text


def test_task_model_needs_the_joint_on_list():
    """Held-out `list` prompts: exact decoding is mostly valid, independent draws of 4 positions
    mostly not, and ADJUST at K = 4 recovers most of the gap (README: 0.895 / 0.105 / 0.870 on 200;
    0.825 / 0.05 / 0.775 on these 40)."""
    base = load_base(MODELS / "task-base")
    sampler = JointSampler.load(MODELS / "task-base" / "sampler", base)
    prompts = [e.prompt for e in T.examples("list", 40, seed=1, split="eval")]
    res = T.evaluate_tasks(base, sampler, prompts, "exact,parallel:4,adjust:4", gen_length=16, seed=0)
    v = res["validity"]["list"]
    assert v["exact"] >= 0.7, v
    assert v["parallel:4"] <= 0.3, v
    assert v["adjust:4"] >= v["parallel:4"] + 0.5, v
    assert v["adjust:4"] >= v["exact"] - 0.15, v
