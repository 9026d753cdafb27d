"""Writing an evaluation's report: <stem>.json, <stem>.md (a table) and <stem>.png (a plot)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import AdjustError
from ..io import atomic_path
from ..provenance import code_version


def save_figure(fig, path) -> None:
    """A matplotlib figure to PNG, atomically, then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def benchmark_arg_error(bounds, out: str | None) -> str | None:
    """A benchmark script's argument check before any work: `bounds` (flag, value, lowest allowed) and `--out`
    (a stem whose folder must exist); the error line to print (exit 2), or None."""
    for flag, value, low in bounds:
        if value < low:
            return f"adjust: error: {flag} must be at least {low}, got {value}"
    if out is not None and not Path(out).parent.is_dir():
        return f"adjust: error: --out {out}: its folder does not exist"
    return None


def print_and_write(report: dict, markdown: str, stem: str | None) -> None:
    """A benchmark's end: its Markdown printed, and with `stem` written as <stem>.json and <stem>.md (each
    atomically)."""
    from ..io import write_json

    print(markdown)
    if stem:
        write_json(Path(stem + ".json"), report)
        with atomic_path(Path(stem + ".md")) as tmp:
            tmp.write_text(markdown)


def check_out_dir(out_dir) -> None:
    """Refuse an --out-dir that cannot hold a report (not a directory, or no plotting library for its plot),
    before any work is done."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AdjustError(f"--out-dir {out} exists and is not a directory")
    # the directory, or its nearest existing parent (nothing is created before the work), must be writable
    near = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not near.is_dir():
        raise AdjustError(f"--out-dir {out} cannot hold a report: {near} is not a directory")
    if not os.access(near, os.W_OK | os.X_OK):
        raise AdjustError(f"--out-dir {out} cannot hold a report: {near} is not writable")
    if out.is_dir():
        try:  # a probe file, removed again (catches a read-only file system)
            with tempfile.NamedTemporaryFile(dir=out, prefix=".probe.", suffix=".tmp"):
                pass
        except OSError as e:
            raise AdjustError(f"--out-dir {out} cannot hold a report: {e.strerror or e}") from None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise AdjustError("--out-dir writes a plot beside the tables and needs matplotlib: "
                          "pip install 'adjust-dlm[eval]' (or leave out --out-dir)") from None


def write_report(result: dict, out_dir, stem: str, markdown_table, plot) -> dict:
    """Write the three files into `out_dir` as one set: each is made under a temporary name, and they are renamed
    into place only once all three exist (a failure leaves the previous set whole); returns their paths (also
    stored in the JSON).

    The JSON always records the code version that made it (`adjust.provenance.code_version`).
    """
    from contextlib import ExitStack

    result.setdefault("code_version", code_version())
    check_out_dir(out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md"), "plot": str(out / f"{stem}.png")}
    with ExitStack() as stack:  # the renames happen as the stack unwinds, after every file was written
        md, png, js = (stack.enter_context(atomic_path(files[k])) for k in ("markdown", "plot", "json"))
        md.write_text(markdown_table(result))
        plot(result, png)
        js.write_text(json.dumps({**result, "files": files}, indent=2) + "\n")
    return files
