"""Writing an evaluation's report: <stem>.json, <stem>.md (a table) and <stem>.png (a plot)."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_path, write_json


def save_figure(fig, path) -> None:
    """A matplotlib figure to PNG, atomically, then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_report(result: dict, out_dir, stem: str, markdown_table, plot) -> dict:
    """Write the three files into `out_dir` (each atomically); returns their paths (also stored in the JSON)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md"), "plot": str(out / f"{stem}.png")}
    with atomic_path(files["markdown"]) as tmp:
        tmp.write_text(markdown_table(result))
    plot(result, files["plot"])
    write_json(files["json"], {**result, "files": files})
    return files
