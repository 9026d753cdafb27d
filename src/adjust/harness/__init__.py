"""lm-evaluation-harness integration (`pip install adjust-dlm[harness]`).

Importing this package registers the lm-eval model `adjust` (`adjust.harness.model.AdjustLM`);
lm-eval 0.4.13 discovers no models from installed packages, so run lm-eval through
`python -m adjust.harness ...` (registers the model, adds our tasks, then runs lm-eval's own
command line), or in Python:

    import adjust.harness, lm_eval
    lm_eval.simple_evaluate(model="adjust", model_args="base=models/task-base,strategy=adjust,tokens_per_pass=4",
                            tasks=["adjust_list"], task_manager=adjust.harness.task_manager())

Our verifiable tasks (`adjust_list`, `adjust_shuffle`, `adjust_pick`, `adjust_reverse`, `adjust_either`; tag `adjust_tasks`) live in
TASKS_DIR as lm-eval YAML with their prompts shipped beside them (no download).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AdjustError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LM_EVAL_VERSION = "0.4.13"  # the version tested; pinned by the `harness` extra

try:
    import lm_eval  # noqa: F401
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry loads them only while empty)
except ImportError:  # pragma: no cover - depends on the environment
    raise AdjustError("the lm-eval integration needs lm-eval: pip install 'adjust-dlm[harness]'") from None

from .model import AdjustLM  # noqa: E402  (registers the model "adjust")


def task_manager(include_path=None, **kwargs):
    """An lm-eval TaskManager that knows our tasks (and any `include_path` folders of yours)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([] if include_path is None else
                                [include_path] if isinstance(include_path, (str, Path)) else list(include_path))
    return TaskManager(include_path=[str(p) for p in paths], **kwargs)


__all__ = ["AdjustLM", "TASKS_DIR", "task_manager"]
