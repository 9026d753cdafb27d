"""The frontier's analysis: Pareto fronts and dominance, pure functions of measured points.

A point here is {"label", "family", "q", "s"[, "v"]}: q the quality score (higher = better), s tokens/s,
v the quality as reported (default q). Exact is the K = 1 point of the parallel and adjust families
(`ANCHORED`), so it joins their fronts. For every peer point on its family's front, `dominance` names
the fastest ADJUST-family point that dominates it (quality at least as good, tokens/s higher), or none.
"""

from __future__ import annotations

PEER_FAMILIES = ("parallel", "threshold", "factor", "entropy-bound")
# speculative is lossless (exact's tokens at fewer passes); with the sampler drafting it is ADJUST's, and its
# --drafter self points (the base's own marginals, as the lossless peers draft) sit in the same family
ADJUST_FAMILIES = ("adjust", "adjust-threshold", "threshold-adjust", "speculative")
ANCHORED = ("parallel", "adjust")  # exact is their K = 1 point


def side(family: str) -> str:
    """"adjust" (the ADJUST family), "peer" or "exact"."""
    return "adjust" if family in ADJUST_FAMILIES else "peer" if family in PEER_FAMILIES else "exact"



def _v(p: dict):
    return p.get("v", p["q"])


def dominates(a: dict, b: dict) -> bool:
    """a is at least as good as b in quality `q` and speed `s`, and better in one of them."""
    return a["q"] >= b["q"] and a["s"] >= b["s"] and (a["q"] > b["q"] or a["s"] > b["s"])


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point dominates (identical points are all kept), fastest first."""
    pts = [p for p in points if p["q"] is not None and p["s"] is not None]
    front = [p for p in pts if not any(dominates(o, p) for o in pts)]
    return sorted(front, key=lambda p: (-p["s"], -p["q"], p["label"]))


def family_fronts(points: list[dict]) -> dict[str, list[dict]]:
    """Each family's front; exact points join the parallel and adjust families (their K = 1)."""
    families = list(dict.fromkeys(p["family"] for p in points if p["family"] != "exact"))
    exact = [p for p in points if p["family"] == "exact"]
    return {f: pareto_front([p for p in points if p["family"] == f] + (exact if f in ANCHORED else []))
            for f in families}


def _fastest(candidates: list[dict]) -> dict | None:
    return max(candidates, key=lambda p: (p["s"], p["q"]), default=None)


def dominance(points: list[dict], fronts: dict[str, list[dict]] | None = None) -> list[dict]:
    """For each peer point on its family's front: the fastest ADJUST-family point with quality >= its
    quality and higher tokens/s (`dominated_by`, None if there is none), the tokens/s ratio, and how
    many ADJUST-family points dominate it."""
    fronts = family_fronts(points) if fronts is None else fronts
    ours = [p for p in points if side(p["family"]) == "adjust" and p["q"] is not None and p["s"] is not None]
    out = []
    for family, front in fronts.items():
        if side(family) != "peer":
            continue
        for peer in front:
            if peer["family"] != family:
                continue  # exact on the parallel front
            winners = [a for a in ours if a["q"] >= peer["q"] and a["s"] > peer["s"]]
            best = _fastest(winners)
            out.append({"peer": peer["label"], "family": family, "quality": _v(peer), "tokens_per_second": peer["s"],
                        "dominated_by": None if best is None else best["label"],
                        "by_family": None if best is None else best["family"],
                        "by_quality": None if best is None else _v(best),
                        "by_tokens_per_second": None if best is None else best["s"],
                        "speed_ratio": None if best is None or not peer["s"] else round(best["s"] / peer["s"], 4),
                        "dominators": len(winners)})
    return out


def points_at(result: dict, panel: str, B: int) -> list[dict]:
    """A frontier result's points as {"label", "family", "q", "v", "s"} for one quality panel and batch size."""
    return [{"label": p["label"], "family": p["family"], "q": p["quality"][panel]["score"],
             "v": p["quality"][panel]["value"], "s": p["speed"][str(B)]["tokens_per_second"]}
            for p in result["points"] if panel in p["quality"]]


def analyse(result: dict) -> dict:
    """{batch size: {panel: {"fronts": {family: [labels]}, "overall": [labels], "dominance": [...]}}}."""
    out = {}
    for B in result["settings"]["batch_sizes"]:
        out[str(B)] = {}
        for panel in result["panels"]:
            pts = points_at(result, panel, B)
            fronts = family_fronts(pts)
            out[str(B)][panel] = {"fronts": {f: [p["label"] for p in fr] for f, fr in fronts.items()},
                                  "overall": [p["label"] for p in pareto_front(pts)],
                                  "dominance": dominance(pts, fronts)}
    return out
