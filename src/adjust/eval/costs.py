"""The cost of one base pass of r rows, and tokens per pass-equivalent (docs/speculative.md, "The cost of rows").

A pass-cost report (benchmarks/pass_cost.py on the CPU, benchmarks/gpu_bench.py at Dream-7B shape) holds, per
model, the wall-clock of one base pass of r rows relative to one row, for two kinds of pass: "full" (the whole
canvas, no cache) and "span" (the active block only, after `base.cache_pass`), and optionally the cost of one
sampler unroll relative to one "full" pass of one row, per unroll mode (adjust.decode): "unroll_cost" for the
full unroll, "unroll_cost_fast" for `--unroll fast` (its once-per-step keys/values shared out over the step's
K - 1 unrolls):

    {"pass_cost": {MODEL: {"full": {"1": 1.0, "2": 1.4, ...}, "span": {...}, "unroll_cost": 0.3,
                           "unroll_cost_fast": 0.05}}, ...}

Those unroll costs leave out the LM head on both sides. A benchmarks/gpu_bench.py report also times, in its
"pass_vs_unroll" at batch 1, each mode's unroll as the decoding loop runs it, LM head included, against a full pass
with its LM head; where it has those, they are the c read (`read_pass_costs`).

cost(r) between measured r is linear interpolation, past the last measured r the last segment's slope.

Tokens per pass-equivalent = decoded tokens / (sum over full passes of cost(rows of that pass) + c x unrolls),
per sequence: a pass of B canvases that computed r rows in all (drafted ones included) counts
cost(r) / cost(B) for each of its sequences still decoding (at batch 1: cost(r)), with the table of its kind
("full" for whole-canvas passes, "span" for cached ones); c is one sampler unroll's cost relative to one pass,
and the unrolls are counted per decoding sequence. c is that of the decoding's unroll mode
(`unroll_cost_of`): a report without "unroll_cost_fast" charges a fast unroll as a full one (an upper bound);
--unroll-cost sets c for every mode, or per mode ("full=0.13,fast=0.15"). Without a report every cost(r) is 1:
rows are free (as batch-1 passes of a short span nearly are on a GPU, where they are memory-bound; whole
512-token canvases at Dream-7B shape are not, docs/speculative.md), and tokens per pass-equivalent is then
tokens per full pass less the unrolls' share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import AdjustError

KINDS = ("full", "span")
UNROLL_KEYS = {"full": "unroll_cost", "fast": "unroll_cost_fast"}  # unroll mode -> its key in a report
ROWS = tuple(range(1, 17))


def _interpolate(table: dict[int, float], r: float) -> float:
    xs = sorted(table)
    if len(xs) == 1 or r <= xs[0]:
        return table[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if r <= b:
            return table[a] + (r - a) * (table[b] - table[a]) / (b - a)
    a, b = xs[-2], xs[-1]
    return table[b] + (r - b) * (table[b] - table[a]) / (b - a)


@dataclass(frozen=True)
class PassCost:
    """cost(kind, r): one base pass of r rows relative to one row, per kind of pass ("full", "span")."""

    tables: dict = field(default_factory=lambda: {k: {1: 1.0} for k in KINDS})
    unroll_cost: float | None = None  # one full sampler unroll relative to one pass of one row, if the report has it
    source: str = "none: rows assumed free, cost(r) = 1 for every r"
    unroll_cost_fast: float | None = None  # one fast unroll (--unroll fast) likewise, if the report has it

    def cost(self, kind: str, rows: float) -> float:
        return _interpolate(self.tables.get(kind) or self.tables["full"], rows)

    def describe(self, unroll_cost) -> str:
        """`unroll_cost`: c, or {unroll mode: c} (`unroll_costs_of`), written per mode when they differ."""
        if isinstance(unroll_cost, dict) and len(set(unroll_cost.values())) == 1:
            unroll_cost = next(iter(unroll_cost.values()))
        if isinstance(unroll_cost, dict):
            c = ", ".join(f"{v:g} ({m} unroll)" for m, v in unroll_cost.items())
        else:
            c = f"{unroll_cost:g}"
        return (f"pass cost: {self.source}; unroll cost c = {c} of a one-row pass. Tokens per "
                "pass-equivalent = decoded tokens / (sum over full passes of cost(rows) + c x unrolls)")


FREE = PassCost()


def _table(obj, where: str) -> dict[int, float]:
    if not isinstance(obj, dict) or not obj:
        raise AdjustError(f"{where}: expected an object of rows -> relative cost")
    out = {}
    for k, v in obj.items():
        try:
            r = int(k)
        except (TypeError, ValueError):
            raise AdjustError(f"{where}: row count {k!r} is not an integer") from None
        if r < 1 or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise AdjustError(f"{where}: entry {k!r}: {v!r} (rows must be >= 1, costs positive numbers)")
        out[r] = float(v)
    if 1 not in out:
        raise AdjustError(f"{where}: no entry for 1 row (the costs are relative to it)")
    return out


def read_pass_costs(path) -> dict[str, PassCost]:
    """Every model's cost tables in the pass-cost report at `path`, all checked; AdjustError naming the file and
    what is wrong with it."""
    from ..io import read_json

    obj = read_json(path, "--pass-cost report")
    models = obj.get("pass_cost") if isinstance(obj, dict) else None
    if not isinstance(models, dict) or not models:
        raise AdjustError(f"--pass-cost {path}: no \"pass_cost\" object of model -> tables "
                          "(write one with benchmarks/pass_cost.py or benchmarks/gpu_bench.py)")
    loop_c = _loop_unroll_costs(obj.get("pass_vs_unroll"), path)
    out = {}
    for name, entry in models.items():
        if not isinstance(entry, dict) or "full" not in entry:
            raise AdjustError(f"--pass-cost {path}: model {name!r} has no \"full\" table")
        tables = {k: _table(entry[k], f"--pass-cost {path}: {name}.{k}") for k in KINDS if k in entry}
        c = {key: _cost_or_none(entry.get(key), f"--pass-cost {path}: {name}.{key}") for key in UNROLL_KEYS.values()}
        source = f"{path} ({name})"
        if loop_c:  # a GPU bench report: the loop's unrolls, LM heads included, at batch 1
            c.update(loop_c)
            source += ", c from its pass_vs_unroll at batch 1"
        out[name] = PassCost(tables, c["unroll_cost"], source, c["unroll_cost_fast"])
    return out


def _cost_or_none(v, where: str) -> float | None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
        raise AdjustError(f"{where} must be a number >= 0, got {v!r}")
    return None if v is None else float(v)


def _loop_unroll_costs(pass_vs_unroll, path) -> dict[str, float]:
    """{"unroll_cost": c, "unroll_cost_fast": c} from a benchmarks/gpu_bench.py report's `pass_vs_unroll` at batch 1
    (each mode's unroll as the decoding loop runs it, with its LM head, over one full pass with its LM head), or {}
    where the report has none. Those, not the head-free `pass_cost` figures, are what the loop pays: at Dream-7B
    shape the LM head is most of an unroll's weights (docs/results.md, the GPU section)."""
    one = pass_vs_unroll.get("1") if isinstance(pass_vs_unroll, dict) else None
    modes = one.get("modes") if isinstance(one, dict) else None
    if not isinstance(modes, dict):
        return {}
    out = {UNROLL_KEYS[m]: _cost_or_none(v.get("unroll_cost") if isinstance(v, dict) else v,
                                         f"--pass-cost {path}: pass_vs_unroll.1.modes.{m}.unroll_cost")
           for m, v in modes.items() if m in UNROLL_KEYS}
    return {k: c for k, c in out.items() if c is not None}  # a mode it did not time keeps pass_cost's figure


def pick_pass_cost(costs: dict[str, PassCost], model: str | None, path) -> PassCost:
    """The tables of `model` (the base's name), or the only ones of a one-model report."""
    if model in costs:
        return costs[model]
    if len(costs) == 1:
        return next(iter(costs.values()))
    raise AdjustError(f"--pass-cost {path}: no table for model {model!r}; it has {', '.join(sorted(costs))}")


def read_pass_cost(path, model: str | None = None) -> PassCost:
    """`pick_pass_cost(read_pass_costs(path), model, path)`."""
    return pick_pass_cost(read_pass_costs(path), model, path)


def parse_unroll_cost(text: str | None) -> float | dict[str, float] | None:
    """--unroll-cost: "C" (every unroll mode) or "full=C1,fast=C2" (per mode; a mode left out takes the
    report's); AdjustError on anything else."""
    if text is None:
        return None
    if "=" not in text:
        return check_unroll_cost(_cost_number(text, text))
    out = {}
    for part in text.split(","):
        mode, _, value = part.partition("=")
        mode = mode.strip()
        if mode not in UNROLL_KEYS or mode in out:
            raise AdjustError(f"--unroll-cost {text!r}: {'repeated' if mode in out else 'unknown'} unroll mode "
                              f"{mode!r} (give C, or MODE=C for the modes {', '.join(UNROLL_KEYS)})")
        out[mode] = _cost_number(value, text)
    return check_unroll_cost(out)


def _cost_number(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise AdjustError(f"--unroll-cost {text!r}: {value.strip()!r} is not a number") from None


def check_unroll_cost(c):
    """c (a number, or {unroll mode: number}) if every number is finite and >= 0, else AdjustError."""
    for v in (c.values() if isinstance(c, dict) else [c]):
        _cost_or_none(v, "--unroll-cost")
    return c


def unroll_cost_of(cost: PassCost, given: float | dict | None, unroll: str = "full") -> float:
    """c of unroll mode `unroll` ("full", "fast"): the one given (--unroll-cost: one number for every mode, or
    {mode: c} for the modes it names), else the report's for that mode, else (a fast unroll) the report's full
    unroll's, an upper bound; else 0 (unrolls free)."""
    if isinstance(given, dict):
        given = given.get(unroll)
    if given is not None:
        return given
    if unroll == "fast" and cost.unroll_cost_fast is not None:
        return cost.unroll_cost_fast
    return cost.unroll_cost if cost.unroll_cost is not None else 0.0


def unroll_costs_of(cost: PassCost, given: float | dict | None, unrolls=("full",)) -> dict[str, float]:
    """{unroll mode: c} for every mode of `unrolls` (`unroll_cost_of`)."""
    return {u: unroll_cost_of(cost, given, u) for u in dict.fromkeys(unrolls)}


def pass_equivalents(stats, cost: PassCost = FREE, unroll_cost: float = 0.0) -> float:
    """Per sequence: the sum over `stats`' full passes of cost(rows) / cost(canvases), + c x unrolls."""
    total = 0.0
    for key, sequences in stats.pass_shapes.items():
        kind, canvases, rows = key.split()
        total += sequences * cost.cost(kind, int(rows)) / cost.cost(kind, int(canvases))
    return total + unroll_cost * stats.row_unrolls


def tokens_per_pass_equivalent(stats, cost: PassCost = FREE, unroll_cost: float = 0.0) -> float:
    """Decoded tokens per pass-equivalent (module docstring); 0.0 when nothing was computed."""
    eq = pass_equivalents(stats, cost, unroll_cost)
    return stats.decoded_tokens / eq if eq > 0 else 0.0


# --- measuring it ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def measure_pass_cost(base, canvas: torch.Tensor, block: tuple[int, int], rows=ROWS, repeats: int = 20,
                      warmup: int = 2, kinds=KINDS, sampler=None, unroll_k: int = 4) -> dict:
    """Median wall-clock of one base pass of r rows (the canvas `canvas` (L,) repeated r times) for each r in
    `rows`, relative to r = 1: "full" = `base.hidden_states` on the whole canvas; "refresh" = `base.cache_pass`
    (the whole canvas, keeping the keys/values); "span" = `base.span_hidden` on `block` (lo, hi) after a
    `cache_pass` of the same rows (untimed). Repeats interleaved: repeat i times every (kind, r), the order
    rotated by i. With `sampler`: one sampler unroll on the one-row canvas, relative to the one-row "full" pass
    ("unroll_cost"), and one fast unroll ("unroll_cost_fast"), as `--unroll fast` computes one in a step of a
    strategy writing `unroll_k` tokens per full pass (decode.StepContext.unroll_sampler): the sampler's
    keys/values once, then K - 1 unrolls of 2(K - 1) kept rows + the one the step wrote before them (the first
    rows of `block`), the whole divided by K - 1. As for the full unroll, no LM head is timed."""
    from .bench import time_call

    rows = sorted(set(rows) | {1})
    x = {r: canvas[None].repeat(r, 1).to(base.device) for r in rows}
    kv = {r: base.cache_pass(x[r])[1] for r in rows} if "span" in kinds else {}
    lo, hi = block
    fns = {}
    for r in rows:
        if "full" in kinds:
            fns[("full", r)] = lambda r=r: base.hidden_states(x[r])
        if "refresh" in kinds:
            fns[("refresh", r)] = lambda r=r: base.cache_pass(x[r])
        if "span" in kinds:
            fns[("span", r)] = lambda r=r: base.span_hidden(x[r], None, kv[r], lo, hi)
    if sampler is not None:
        prior = base.hidden_states(x[1])
        fns[("unroll", 1)] = lambda: sampler(base, x[1], prior, None)
        from ..decode import FastUnroll

        per = max(1, unroll_k - 1)
        n_fast = FastUnroll().count(unroll_k) + 1  # the kept positions + the token written from the full pass
        at = (lo + torch.arange(n_fast, device=base.device)).clamp(max=x[1].shape[1] - 1)[None]

        def fast_step():
            kv_s = sampler.keys_values(base, x[1], prior, None)
            for _ in range(per):
                sampler.forward_rows(base, x[1], prior, None, kv_s, at)

        fns[("unroll_fast", 1)] = fast_step
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(fns[name], base.device))
    import statistics

    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    out = {"canvas": int(canvas.shape[0]), "block": [lo, hi], "repeats": repeats, "rows": rows}
    for kind in kinds:
        out[f"{kind}_ms"] = {str(r): round(ms[(kind, r)], 4) for r in rows}
        out[kind] = {str(r): round(ms[(kind, r)] / ms[(kind, 1)], 4) for r in rows}
    if sampler is not None:
        out["unroll_ms"] = round(ms[("unroll", 1)], 4)
        out["unroll_cost"] = round(ms[("unroll", 1)] / ms[("full", 1)], 4)
        out["unroll_fast_ms"] = round(ms[("unroll_fast", 1)] / per, 4)
        out["unroll_cost_fast"] = round(ms[("unroll_fast", 1)] / per / ms[("full", 1)], 4)
        out["unroll_fast_rows"], out["unroll_k"] = n_fast, unroll_k
    return out


def cost_table_markdown(tables: dict, kinds=KINDS) -> str:
    """One Markdown table: a row per (model, kind), a column per r; the ms of one row in the first column."""
    rows = sorted({int(r) for t in tables.values() for k in kinds if k in t for r in t[k]})
    lines = ["| model | pass | 1 row (ms) | " + " | ".join(f"r={r}" for r in rows) + " |",
             "|---|---|---|" + "---|" * len(rows)]
    for name, t in tables.items():
        for k in kinds:
            if k in t:
                lines.append(f"| {name} | {k} | {t[f'{k}_ms']['1']:.3f} | "
                             + " | ".join(f"{t[k][str(r)]:.2f}" if str(r) in t[k] else "-" for r in rows) + " |")
    return "\n".join(lines)
