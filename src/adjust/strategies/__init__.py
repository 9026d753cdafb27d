"""Weight-free decoding policies chosen by name from a registry.

A strategy decides, in each step after one full pass, which positions to unmask and how
many; `adjust.decode.StepContext` does the sampling. Each class documents its rule.
"""

from __future__ import annotations

from ..errors import AdjustError

STRATEGIES: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return deco


class Strategy:
    name = ""
    uses_sampler = False  # True if it needs a trained joint sampler
    adaptive = False  # True if the tokens per full pass vary with the model's confidence

    def __init__(self, tokens_per_pass: int = 1):
        if not isinstance(tokens_per_pass, int) or tokens_per_pass < 1:
            raise AdjustError(f"--tokens-per-pass must be at least 1, got {tokens_per_pass}")
        self.k = tokens_per_pass

    def step(self, ctx) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}(K={self.k})"


def make_strategy(name: str, **kwargs) -> Strategy:
    from . import adaptive, adjust, fixed  # noqa: F401  (registers the built-in strategies)

    if name not in STRATEGIES:
        raise AdjustError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted and v is not None})


def strategy_names() -> list[str]:
    from . import adaptive, adjust, fixed  # noqa: F401

    return sorted(STRATEGIES)
