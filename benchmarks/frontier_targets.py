"""Where a frontier report stands against the project's acceptance targets (kept out of the library).

Reads a frontier.json written by `adjust eval frontier` and checks, at the target batch size (batch 1, or
the smallest timed), per quality panel:

- validity (task prompts only): every peer point within MARGIN of exact's validity needs an ADJUST-family
  point at least as valid with >= SPEEDUP x its tokens/s;
- front: every point of the overall Pareto front faster than FRONT_SPEED x exact's tokens/s is
  ADJUST-family (for s above it, the best quality reachable at >= s tokens/s is then ADJUST's);
- pass-equivalent (issue 23; reports with a tokens-per-pass-equivalent column, `--unroll-cost` or
  `--pass-cost`): among the points within PE_MARGIN of exact's quality, an ADJUST-family point with >= PE_RATIO x
  the tokens per pass-equivalent of the best peer point there and >= PE_SPEED x that peer's measured tokens/s.
  On free text (a C2ST panel) "within" is within the exact-vs-exact noise: one standard error of exact's own AUC
  (its score is -|AUC - 0.5|, so a point counts when its AUC is that close to 0.5 as exact's, plus the error).

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
PE_MARGIN = 0.01  # "at validity within 1 point of exact"
PE_RATIO = 1.5  # >= 1.5x the best peer's tokens per pass-equivalent there
PE_SPEED = 1.0  # and >= 1.0x its measured tokens/s


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


def pass_equivalent_target(points: list[dict], exact_q: float, margin: float = PE_MARGIN, ratio: float = PE_RATIO,
                           speed: float = PE_SPEED) -> dict:
    """Among points within `margin` of exact's quality, the peer point with the most tokens per pass-equivalent
    ("e"; exact itself when no peer is that good) against the ADJUST-family points there: met when one has
    >= ratio x its e and >= speed x its tokens/s. "met" is None without an e column."""
    good = [p for p in points if p["q"] is not None and p["q"] >= exact_q - margin - 1e-12 and p.get("e") is not None]
    peers = [p for p in good if side(p["family"]) == "peer"] or [p for p in good if side(p["family"]) == "exact"]
    ours = [p for p in good if side(p["family"]) == "adjust"]
    if not peers:
        return {"met": None, "margin": margin, "ratio": ratio, "speed": speed}
    best = max(peers, key=lambda p: (p["e"], p["s"]))
    top = max(ours, key=lambda p: (p["e"], p["s"]), default=None)
    wins = [a for a in ours if a["e"] >= ratio * best["e"] and a["s"] >= speed * best["s"]]
    witness = max(wins, key=lambda p: (p["e"], p["s"]), default=None)

    def row(p):
        return None if p is None else {"label": p["label"], "quality": _v(p), "tokens_per_pass_equivalent": p["e"],
                                       "tokens_per_second": p["s"]}

    return {"met": witness is not None, "margin": margin, "ratio": ratio, "speed": speed, "exact_quality": exact_q,
            "best_peer": row(best), "best_adjust": row(top), "witness": row(witness),
            "best_adjust_ratios": None if top is None else {"pass_equivalent": round(top["e"] / best["e"], 4),
                                                           "tokens_per_second": round(top["s"] / best["s"], 4)}}


def _with_pass_equivalent(result: dict, panel: str, B: int) -> list[dict]:
    pts = points_at(result, panel, B)
    by_label = {p["label"]: p for p in result["points"]}
    for p in pts:
        p["e"] = by_label[p["label"]]["speed"][str(B)].get("tokens_per_pass_equivalent")
    return pts


def targets(result: dict) -> dict:
    """The targets at the report's target batch size, per panel."""
    B = result["settings"]["target_batch_size"]
    ref = result["settings"]["speed_reference"]
    out = {"batch_size": B, "validity": {} if result["mode"] == "validity" else None, "front": {},
           "pass_equivalent": {}, "report_code_version": result.get("code_version")}
    for panel in result["panels"]:
        pts = _with_pass_equivalent(result, panel, B)
        exact = next(p for p in pts if p["label"] == ref)
        out["front"][panel] = front_target(pts, exact["s"])
        if out["validity"] is not None:
            out["validity"][panel] = validity_target(pts, exact["q"])
        own = next(p for p in result["points"] if p["label"] == ref)["quality"][panel]
        if own.get("measure") == "c2st_auc":  # within the exact-vs-exact noise
            e = pass_equivalent_target(pts, exact["q"], margin=own["se"])
            e |= {"measure": "c2st_auc", "exact_auc": own["value"], "exact_se": own["se"]}
        else:
            e = pass_equivalent_target(pts, exact["q"])
        out["pass_equivalent"][panel] = e
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
    for panel, e in (t.get("pass_equivalent") or {}).items():
        if e["met"] is None:
            continue
        b, a = e["best_peer"], e["best_adjust"]
        near = (f"within exact's C2ST noise (AUC {e['exact_auc']:.3f} +- {e['exact_se']:.3f}: AUC within "
                f"{abs(e['exact_quality']) + e['margin']:.3f} of 0.5)" if e.get("measure") == "c2st_auc" else
                f"within {100 * e['margin']:.0f} point(s) of exact ({e['exact_quality']:.3f})")
        line = (f"- pass-equivalent, {panel}: {_verdict(e['met'])} -- {near} the best peer point is {b['label']} "
                f"({b['tokens_per_pass_equivalent']:.2f} tokens per pass-equivalent, {b['tokens_per_second']:.1f} "
                "tok/s); ")
        if a is None:
            line += "no ADJUST-family point is that valid"
        else:
            r = e["best_adjust_ratios"]
            line += (f"the best ADJUST-family point there, {a['label']}, has {r['pass_equivalent']:.2f}x its tokens per "
                     f"pass-equivalent and {r['tokens_per_second']:.2f}x its tokens/s (target >= {e['ratio']}x and "
                     f">= {e['speed']}x)")
            if e["witness"] is not None and e["witness"]["label"] != a["label"]:
                line += f"; {e['witness']['label']} meets both"
        lines.append(line)
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
