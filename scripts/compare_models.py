"""Compare a model directory and its sampler/ with another (a rebuild with the shipped pair).

    python scripts/compare_models.py runs/shakespeare/base models/shakespeare-base

For the base and for sampler/ (when both have one): whether model.safetensors holds bit-identical
tensors, else the largest absolute difference over the tensors they share (and the names only one
has), and the validation numbers each config.json records. Prints one JSON object, then a line per
model; exit status 0 either way (it reports, it does not judge). Reads safetensors only (no pickle).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def compare_weights(a, b) -> dict:
    """{"identical", "max_abs_diff", "tensors", "shape_mismatch", "only_in_first", "only_in_second"} of two
    safetensors files; max_abs_diff is over the shared tensors of equal shape."""
    x, y = load_file(str(a)), load_file(str(b))
    shared = sorted(set(x) & set(y))
    mismatch = [k for k in shared if x[k].shape != y[k].shape]
    diff = 0.0
    for k in shared:
        if k not in mismatch and (x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])):
            diff = max(diff, (x[k].double() - y[k].double()).abs().max().item())
    identical = set(x) == set(y) and not mismatch and diff == 0.0 and all(x[k].dtype == y[k].dtype for k in shared)
    return {"identical": identical, "max_abs_diff": diff, "tensors": len(shared), "shape_mismatch": mismatch,
            "only_in_first": sorted(set(x) - set(y)), "only_in_second": sorted(set(y) - set(x))}


def training_numbers(model_dir) -> dict:
    """The "training" record of a model directory's config.json (validation numbers, step), or {}."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    record = json.loads(path.read_text()).get("training", {})
    return record if isinstance(record, dict) else {}


def compare_dirs(new, shipped) -> dict:
    out = {}
    for name, sub in (("base", ""), ("sampler", "sampler")):
        a, b = Path(new) / sub / "model.safetensors", Path(shipped) / sub / "model.safetensors"
        if a.is_file() and b.is_file():
            out[name] = {**compare_weights(a, b), "new": training_numbers(a.parent),
                         "shipped": training_numbers(b.parent)}
    return out


def _line(name: str, r: dict) -> str:
    if r["identical"]:
        same = f"bit-identical ({r['tensors']} tensors)"
    else:
        comparable = r["tensors"] - len(r["shape_mismatch"])
        same = (f"differ: max abs difference {r['max_abs_diff']:.3g} over {comparable} tensors of the same name "
                f"and shape" if comparable else "differ: no tensor of the same name and shape")
        extra = len(r["shape_mismatch"]) + len(r["only_in_first"]) + len(r["only_in_second"])
        same += f", {extra} of another shape or in one file only" if extra else ""
    vals = {k: (r["new"].get(k), r["shipped"].get(k)) for k in sorted(set(r["new"]) | set(r["shipped"]))
            if k.startswith("val")}
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    return f"{name}: weights {same}; " + (", ".join(f"{k} {fmt(a)} rebuilt vs {fmt(b)} shipped"
                                                    for k, (a, b) in vals.items()) or "no validation numbers")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python scripts/compare_models.py NEW_DIR SHIPPED_DIR", file=sys.stderr)
        return 2
    report = compare_dirs(*argv)
    if not report:
        print(f"adjust: error: no model.safetensors to compare in {argv[0]} and {argv[1]}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    for name, r in report.items():
        print(_line(name, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
