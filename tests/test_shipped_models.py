"""The models shipped in models/: they load, each sampler belongs to its base, each card's figures are
those its model recorded, and the task model shows what its README claims (the joint matters on `list`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adjust.base import load_base
from adjust.eval import tasks as T
from adjust.sampler import JointSampler

MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED = ["shakespeare-base", "task-base"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_and_sampler_load(name):
    base = load_base(MODELS / name)
    sampler = JointSampler.load(MODELS / name / "sampler", base)  # raises if it belongs to another base
    assert sampler.cfg.hidden_size == base.hidden_size


def _numbers(card: Path, row: str) -> list[str]:
    """The numbers of a card's table row `| row | ... |`, as printed (thousands separators dropped)."""
    line = next(line for line in card.read_text().splitlines() if line.startswith(f"| {row} |"))
    return [n.replace(",", "") for n in re.findall(r"\d[\d,]*(?:\.\d+)?", line.split("|")[2])]


def _printed(value: float, text: str) -> bool:
    """`text` is `value` rounded to the decimals it shows."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return round(value, decimals) == float(text)


@pytest.mark.parametrize("name", SHIPPED)
def test_model_cards_state_the_figures_their_models_recorded(name):
    """A card's final loss is the first figure of its row and equals what training wrote into the model's
    config.json (the base's validation bound; the sampler's held-out KL, and without the sampler)."""
    base_card, sampler_card = MODELS / name / "README.md", MODELS / name / "sampler" / "README.md"
    trained = json.loads((MODELS / name / "config.json").read_text())["training"]
    assert _printed(trained["val_loss"], _numbers(base_card, "final loss")[0])
    assert _numbers(base_card, "seed") == ["0"]
    distilled = json.loads((MODELS / name / "sampler" / "config.json").read_text())["training"]
    loss = _numbers(sampler_card, "final loss")
    assert _printed(distilled["val_kl"], loss[0])
    assert any(_printed(distilled["val_kl_parallel"], n) for n in loss)  # the figure without the sampler
    assert int(_numbers(sampler_card, "steps")[0]) == distilled["step"]


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
