"""Writing an evaluation's report: <stem>.json, <stem>.md (a table) and <stem>.png (a plot)."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdjustError
from ..io import atomic_path, write_json
from ..provenance import code_version


def save_figure(fig, path) -> None:
    """A matplotlib figure to PNG, atomically, then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def check_out_dir(out_dir) -> None:
    """Refuse an --out-dir that cannot hold a report, before any work is done."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AdjustError(f"--out-dir {out} exists and is not a directory")


def write_report(result: dict, out_dir, stem: str, markdown_table, plot) -> dict:
    """Write the three files into `out_dir` (each atomically); returns their paths (also stored in the JSON).

    The JSON always records the code version that made it (`adjust.provenance.code_version`).
    """
    result.setdefault("code_version", code_version())
    check_out_dir(out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md"), "plot": str(out / f"{stem}.png")}
    with atomic_path(files["markdown"]) as tmp:
        tmp.write_text(markdown_table(result))
    plot(result, files["plot"])
    write_json(files["json"], {**result, "files": files})
    return files
