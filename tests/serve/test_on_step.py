"""decode.generate's on_step callback: it sees every unmasked position once, changes no token, and can stop
the loop (the server's streaming and cancellation rest on this)."""

from __future__ import annotations

import pytest
import torch

from adjust.decode import generate
from adjust.sampling import SamplingConfig
from adjust.strategies import make_strategy


@pytest.mark.parametrize("name,k,block", [("exact", 1, None), ("parallel", 3, 4), ("threshold", None, None)])
def test_on_step_observes_every_position_once_and_changes_nothing(tiny_base, tokenizer, name, k, block):
    prompts = [tokenizer.encode("The cat"), tokenizer.encode("A dog")]
    strategy = make_strategy(name, tokens_per_pass=k)
    plain = generate(tiny_base, prompts, strategy, SamplingConfig(), 10, block, seed=5)
    seen = []
    watched = generate(tiny_base, prompts, strategy, SamplingConfig(), 10, block, seed=5,
                       on_step=lambda step, r, c, t: seen.append((step, r.tolist(), c.tolist(), t.tolist())))
    assert torch.equal(plain.tokens, watched.tokens)
    assert [s[0] for s in seen] == list(range(watched.stats.full_passes))
    rebuilt = torch.full_like(plain.tokens, -1)
    for _, rows, cols, toks in seen:
        assert (rebuilt[rows, cols] == -1).all()  # each position exactly once
        rebuilt[rows, cols] = torch.tensor(toks)
    assert torch.equal(rebuilt, plain.tokens)


def test_on_step_exception_stops_generation(tiny_base, tokenizer):
    calls = []

    class Stop(Exception):
        pass

    def stop_after_two(step, *_):
        calls.append(step)
        if step == 1:
            raise Stop

    with pytest.raises(Stop):
        generate(tiny_base, [tokenizer.encode("The")], make_strategy("exact"), SamplingConfig(), 8,
                 on_step=stop_after_two)
    assert calls == [0, 1]
