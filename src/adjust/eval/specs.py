"""The `--strategies` syntax shared by the evaluation commands.

A comma-separated list of specs, each one of:
  name              the strategy with its defaults          (exact)
  name:K            K tokens per full pass                  (parallel:2, adjust:4)
  name:k=v;k=v      keyword arguments of the strategy       (threshold:tau=0.9, factor:f=1;k=8)
Values are read as int, then float, then left as text. The key `K` (or `k`) is an alias of
`tokens_per_pass`. Example: "exact,parallel:2,adjust:4,threshold:tau=0.9".
"""

from __future__ import annotations

from ..errors import AdjustError

K_ALIASES = ("K", "k")


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_strategy_specs(text: str) -> list[tuple[str, dict]]:
    """"parallel:2,adjust:4,threshold:tau=0.9" -> [("parallel", {"tokens_per_pass": 2}), ...]."""
    specs = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, rest = item.partition(":")
        name, rest = name.strip(), rest.strip()
        if not name:
            raise AdjustError(f"strategy spec {item!r} has no name (expected name, name:K or name:key=value)")
        params: dict = {}
        if rest and "=" not in rest:
            try:
                params["tokens_per_pass"] = int(rest)
            except ValueError:
                raise AdjustError(f"strategy spec {item!r}: {rest!r} is not an integer K "
                                  "(expected name:K or name:key=value;key=value)") from None
        elif rest:
            for pair in rest.split(";"):
                if not pair.strip():
                    continue
                key, eq, value = pair.partition("=")
                key, value = key.strip(), value.strip()
                if not eq or not key or not value:
                    raise AdjustError(f"strategy spec {item!r}: {pair!r} is not key=value")
                key = "tokens_per_pass" if key in K_ALIASES else key
                if key in params:
                    raise AdjustError(f"strategy spec {item!r} sets {key!r} twice")
                params[key] = _value(value)
        specs.append((name, params))
    if not specs:
        raise AdjustError("--strategies is empty; e.g. --strategies exact,parallel:2,adjust:2")
    return specs


def spec_label(name: str, params: dict) -> str:
    """A short stable label for a spec: "adjust:4", "threshold:tau=0.9", "exact"."""
    if not params:
        return name
    if set(params) == {"tokens_per_pass"}:
        return f"{name}:{params['tokens_per_pass']}"
    parts = [f"{spec_key(k)}={v}" for k, v in sorted(params.items())]
    return f"{name}:" + ";".join(parts)


def spec_key(param: str) -> str:
    """How a spec spells a strategy parameter: tokens_per_pass -> K, others as they are."""
    return "K" if param == "tokens_per_pass" else param


def build_strategy(name: str, params: dict):
    """The strategy object of a spec; unknown strategy names or keyword arguments are errors
    (the rule `adjust.strategies.build_strategy` also applies to the command line's flags)."""
    from .. import strategies

    return strategies.build_strategy(name, params, spell=spec_key)
