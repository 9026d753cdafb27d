"""Two-sided quality measures for free text: a strategy's samples against an independent set of exact ones.

A measure is a callable (base, exact_samples, strategy_samples) -> {"name", "value", "se"[, "score"]};
"score" orders points (higher = closer to exact) and defaults to -value (a distance to exact). Samples are
`decode.generate_texts`' dicts ({"prompt", "text", "token_ids", ...}). TWO_SIDED_MEASURES maps a name to a
factory that makes a fresh measure for one sweep (a measure may keep what it computed of the reference set
for that sweep only); DEFAULT_TWO_SIDED names the one `--quality auto` uses on free text.
"""

from __future__ import annotations

from typing import Callable


class C2stAuc:
    """The classifier two-sample test (adjust.eval.two_sample) of a strategy's samples against exact ones:
    held-out AUC (0.5 = indistinguishable), its standard error, and score -|AUC - 0.5| (higher = closer).

    One instance serves one sweep: the exact reference set is the same for every point, so its base features
    are computed once and kept with the set and base they belong to (another set or base recomputes them)."""

    min_samples = 10  # 5 cross-validation folds of at least 2 samples each
    measure_name = "c2st_auc"

    def __init__(self):
        self._reference: tuple | None = None  # (key of the set, the base, its features)

    def __call__(self, base, exact_samples, strategy_samples) -> dict:
        from ..two_sample import c2st

        key = tuple((s.get("prompt") or "", tuple(s["token_ids"])) for s in exact_samples)
        if self._reference is None or self._reference[0] != key or self._reference[1] is not base:
            self._reference = (key, base, self._features(base, exact_samples))
        r = c2st(self._reference[2], self._features(base, strategy_samples))
        return {"name": self.measure_name, "value": r["auc"], "se": r["auc_se"], "score": -abs(r["auc"] - 0.5)}

    @staticmethod
    def _features(base, samples):
        from ..two_sample import base_features

        return base_features(base, samples, [base.encode(s["prompt"]) if s.get("prompt") else [] for s in samples])


TWO_SIDED_MEASURES: dict[str, Callable[[], Callable]] = {"c2st": C2stAuc}
DEFAULT_TWO_SIDED: str | None = "c2st"
