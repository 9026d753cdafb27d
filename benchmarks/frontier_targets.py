"""Where a frontier report stands against the project's acceptance targets (kept out of the library).

Reads a frontier.json written by `adjust eval frontier` and checks, at the target batch size (batch 1, or
the smallest timed), per quality panel:

- validity (task prompts only): every peer point within MARGIN of exact's validity needs an ADJUST-family
  point at least as valid with >= SPEEDUP x its tokens/s;
- front: every point of the overall Pareto front faster than FRONT_SPEED x exact's tokens/s is
  ADJUST-family (for s above it, the best quality reachable at >= s tokens/s is then ADJUST's).

    python benchmarks/frontier_targets.py results/frontier_tasks/frontier.json [--md OUT.md] [--json OUT.json]

Prints the verdicts as Markdown; --md / --json also write them (atomically).
"""

from __future__ import annotations

import argparse
import json
import sys

from adjust.eval.frontier.analysis import _fastest, _v, pareto_front, points_at, side
from adjust.io import atomic_path, read_json

VALIDITY_MARGIN = 0.03  # "within 3 points of exact validity"
SPEEDUP_TARGET = 1.25  # an ADJUST-family point >= 1.25x the peer's tokens/s
FRONT_SPEED = 1.5  # the ADJUST family on the overall front above 1.5x exact's tokens/s


def validity_target(points: list[dict], exact_q: float, margin: float = VALIDITY_MARGIN,
                    speedup: float = SPEEDUP_TARGET) -> dict:
    """Every peer point with validity >= exact's - margin needs an ADJUST-family point at least as valid
    with tokens/s >= speedup x its own. {"met", "checked": [per peer point], "failed": [labels]}."""
    ours = [p for p in points if side(p["family"]) == "adjust" and p["q"] is not None and p["s"] is not None]
    checked = []
    for peer in points:
        if side(peer["family"]) != "peer" or peer["q"] is None or peer["s"] is None:
            continue
        if peer["q"] < exact_q - margin - 1e-12:
            continue
        best = _fastest([a for a in ours if a["q"] >= peer["q"] and a["s"] >= speedup * peer["s"]])
        near = _fastest([a for a in ours if a["q"] >= peer["q"]])  # the best an ADJUST point does at that validity
        checked.append({"peer": peer["label"], "family": peer["family"], "quality": _v(peer),
                        "tokens_per_second": peer["s"], "met": best is not None,
                        "witness": None if best is None else best["label"],
                        "witness_ratio": None if best is None or not peer["s"] else round(best["s"] / peer["s"], 4),
                        "fastest_as_valid": None if near is None else near["label"],
                        "fastest_as_valid_ratio": None if near is None or not peer["s"] else round(near["s"] / peer["s"], 4)})
    failed = [c["peer"] for c in checked if not c["met"]]
    return {"met": not failed, "vacuous": not checked, "margin": margin, "speedup": speedup, "exact_quality": exact_q,
            "checked": checked, "failed": failed}


def front_target(points: list[dict], exact_s: float, factor: float = FRONT_SPEED) -> dict:
    """Whether every point of the overall front faster than factor x exact's tokens/s is ADJUST-family.

    "met" is None when no front point is that fast (nothing to decide)."""
    front = pareto_front(points)
    fast = [p for p in front if p["s"] > factor * exact_s]
    peers = [p["label"] for p in fast if side(p["family"]) != "adjust"]
    return {"met": None if not fast else not peers, "factor": factor, "exact_tokens_per_second": exact_s,
            "front_above": [p["label"] for p in fast], "peers_on_front_above": peers,
            "front": [p["label"] for p in front]}


def targets(result: dict) -> dict:
    """Both targets at the report's target batch size, per panel."""
    B = result["settings"]["target_batch_size"]
    ref = result["settings"]["speed_reference"]
    out = {"batch_size": B, "validity": {} if result["mode"] == "validity" else None, "front": {},
           "report_code_version": result.get("code_version")}
    for panel in result["panels"]:
        pts = points_at(result, panel, B)
        exact = next(p for p in pts if p["label"] == ref)
        out["front"][panel] = front_target(pts, exact["s"])
        if out["validity"] is not None:
            out["validity"][panel] = validity_target(pts, exact["q"])
    return out


def _verdict(met) -> str:
    return "**met**" if met is True else "**not met**" if met is False else "**undecided**"


def markdown(t: dict) -> str:
    lines = [f"## Targets (batch {t['batch_size']})", ""]
    for panel, v in (t.get("validity") or {}).items():
        lines.append(f"- validity, {panel}: {_verdict(v['met'])}"
                     + (" (no peer point within 3 points of exact's validity)" if v["vacuous"] else "")
                     + f" -- every peer point within {100 * v['margin']:.0f} points of exact ({v['exact_quality']:.3f}) "
                     f"needs an ADJUST-family point at least as valid with >= {v['speedup']}x its tokens/s.")
        if panel == "all" or len(t["validity"]) == 1:
            for c in v["checked"]:
                head = f"  - {c['peer']} ({c['quality']:.3f}, {c['tokens_per_second']:.1f} tok/s): "
                if c["met"]:
                    lines.append(head + f"{c['witness']} is {c['witness_ratio']:.2f}x as fast")
                else:
                    near = ("no ADJUST-family point is as valid" if c["fastest_as_valid"] is None else
                            f"the fastest as valid, {c['fastest_as_valid']}, is {c['fastest_as_valid_ratio']:.2f}x")
                    lines.append(head + f"NOT met, {near}: the peer wins here")
    for panel, f in t["front"].items():
        fast = ", ".join(f["front_above"]) or "none"
        lines.append(f"- front above {f['factor']}x exact, {panel}: {_verdict(f['met'])} -- overall-front points "
                     f"faster than {f['factor']}x exact ({f['factor'] * f['exact_tokens_per_second']:.1f} tok/s): {fast}"
                     + (f"; peers among them: {', '.join(f['peers_on_front_above'])}" if f["peers_on_front_above"] else "")
                     + ("; no point is that fast" if f["met"] is None else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="frontier.json from `adjust eval frontier`")
    ap.add_argument("--md", default=None, help="also write the verdicts as Markdown here")
    ap.add_argument("--json", default=None, help="also write the verdicts as JSON here")
    args = ap.parse_args(argv)
    t = targets(read_json(args.report, "frontier report"))
    text = markdown(t)
    for path, body in ((args.md, text), (args.json, json.dumps(t, indent=1) + "\n")):
        if path:
            with atomic_path(path) as tmp:
                tmp.write_text(body)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
