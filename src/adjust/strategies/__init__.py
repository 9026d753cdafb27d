"""Weight-free decoding policies chosen by name from a registry.

A strategy decides, in each step after one full pass, which positions to unmask and how
many; `adjust.decode.StepContext` does the sampling. Each class documents its rule.
"""

from __future__ import annotations

from ..errors import AdjustError

STRATEGIES: dict[str, type] = {}
# Every keyword parameter of any strategy, and those that are integers: the one list the command line, the
# server and the lm-eval model read (each strategy refuses the ones it does not take).
STRATEGY_PARAMS = ("tokens_per_pass", "tau", "gamma", "factor", "max_tokens_per_pass", "group", "depth", "drafter",
                   "branch", "rule", "target", "spacing")
# the integer ones, each with its smallest value
INT_PARAMS = {"tokens_per_pass": 1, "max_tokens_per_pass": 1, "group": 1, "depth": 1, "branch": 0, "spacing": 0}
STR_PARAMS = ("drafter", "rule", "target")  # those that are strings (the others are numbers)


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
    uses_order = True  # False if it ranks positions by its own rule, never by the order rule (--order)
    takes_sampler = False  # True if it uses a joint sampler when one is given, and runs without one too

    def full_pass(self, loop):
        """The step's pass of the base: the canvas's hidden states (B, L, H). A strategy may compute more rows in it."""
        return loop.full_pass()

    def __init__(self, tokens_per_pass: int = 1):
        if not isinstance(tokens_per_pass, int) or tokens_per_pass < 1:
            raise AdjustError(f"--tokens-per-pass must be at least 1, got {tokens_per_pass}")
        self.k = tokens_per_pass

    def step(self, ctx) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}(K={self.k})"


def cli_flag(param: str) -> str:
    """The command-line flag of a strategy parameter: tau -> --tau, tokens_per_pass -> -K/--tokens-per-pass."""
    return "-K/--tokens-per-pass" if param == "tokens_per_pass" else "--" + param.replace("_", "-")


def accepted_params(name: str) -> list[str]:
    """The keyword parameters strategy `name` takes (AdjustError for an unknown name)."""
    import inspect

    strategy_names()  # registers the built-in strategies
    if name not in STRATEGIES:
        raise AdjustError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    return [p for p in inspect.signature(STRATEGIES[name].__init__).parameters if p not in ("self", "args", "kwargs")]


def build_strategy(name: str, params: dict, spell=cli_flag) -> Strategy:
    """Strategy `name` with `params`; a value of None means "not given" (the strategy's default).

    The one rule for the command line's flags and `eval --strategies` specs: a parameter the
    strategy does not take is refused, never ignored. `spell` names parameters in the message
    as the user wrote them (CLI flags by default; `adjust.eval.specs` spells spec keys).
    """
    accepted = accepted_params(name)
    given = {k: v for k, v in params.items() if v is not None}
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise AdjustError(f"strategy {name!r} takes no {', '.join(map(spell, unknown))}; it accepts: "
                          f"{', '.join(map(spell, accepted)) or 'nothing'}")
    return STRATEGIES[name](**given)


def unused_setting(strategy: Strategy, spell=cli_flag, *, order: bool = False, unroll: str | None = None,
                   sampler: bool = False) -> tuple[str, str] | None:
    """(setting, message) for the first decoding setting given that `strategy` would not use (None: all used): an
    order rule for a strategy that ranks by its own rule, a fast unroll or a sampler for one without a sampler.
    `unroll`: the mode given (None: not given, so the default, which any strategy takes). The one rule for the
    command line's flags and the server's fields: refused, never ignored."""
    if order and not strategy.uses_order:
        return "order", (f"strategy {strategy.name!r} ranks positions by its own rule, not the order rule; "
                         f"drop {spell('order')}")
    if unroll not in (None, "full") and not strategy.uses_sampler:
        return "unroll", (f"{spell('unroll')} {unroll} changes ADJUST's sampler unrolls; strategy {strategy.name!r} "
                          "has none")
    if sampler and not (strategy.uses_sampler or strategy.takes_sampler):
        return "sampler", f"strategy {strategy.name!r} uses no joint sampler; drop {spell('sampler')}"
    return None


def sampler_need(strategy: Strategy) -> str:
    """How `loader.load_models` looks for a joint sampler for `strategy`: "required", "optional" (used if one is
    given or beside the base) or "none"."""
    return "required" if strategy.uses_sampler else "optional" if strategy.takes_sampler else "none"


def make_strategy(name: str, /, **params) -> Strategy:
    """`build_strategy` with keyword parameters: make_strategy("adjust", tokens_per_pass=4)."""
    return build_strategy(name, params)


def strategy_names() -> list[str]:
    from . import adaptive, adjust, fixed, speculative  # noqa: F401

    return sorted(STRATEGIES)
