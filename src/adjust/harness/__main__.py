"""`python -m adjust.harness <lm-eval arguments>`: lm-eval's own command line, with the model
`adjust` registered and our task folder added to --include_path (beside any folder you give).

    python -m adjust.harness --model adjust \\
        --model_args base=models/task-base,strategy=adjust,tokens_per_pass=4 --tasks adjust_list

Bad input to our model (a wrong model arg, a missing model directory) is one line
`adjust: error: ...` and exit status 2, as for the `adjust` command.
"""

from __future__ import annotations

import sys

from ..errors import AdjustError


def main(argv=None) -> int:
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging

        from . import TASKS_DIR

        sys.argv = ["lm-eval"] + list(sys.argv[1:] if argv is None else argv)
        setup_logging()
        parser = HarnessCLI()
        args = parser.parse_args()  # lm-eval's legacy form (no subcommand) means `run`
        if hasattr(args, "include_path"):  # run, ls, validate: lm-eval's TaskManager takes a list of folders
            args.include_path = [p for p in [args.include_path] if p] + [str(TASKS_DIR)]
        parser.execute(args)
    except AdjustError as e:
        print(f"adjust: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
