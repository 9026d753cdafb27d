"""What the repository says about itself holds: its license, its torch floor, the method page its
docstrings cite, and the licence of what the `eval` extra installs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_declared_license_is_shipped():
    assert _pyproject()["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert text.startswith("Copyright 2026 the adjust authors")


def test_readme_names_the_gpl_dependency_of_the_eval_extra():
    assert any(dep.startswith("mauve-text") for dep in _pyproject()["project"]["optional-dependencies"]["eval"])
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"`eval` extra installs mauve-text \(GPL-3\.0\)", readme)


def test_makefile_states_the_same_torch_floor_as_pyproject():
    floor = next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch"))
    floor = floor.split("#")[0].strip()  # "torch>=2.4"
    makefile = (ROOT / "Makefile").read_text()
    stated = re.findall(r"torch>=[0-9.]+", makefile)
    assert stated and set(stated) == {floor}


def test_docstrings_cite_the_method_page_that_exists():
    page = (ROOT / "docs" / "method.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\.", page, flags=re.M)}
    assert sections == set(range(1, 10))
    cited = set()
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "docs").glob("*.md"), *(ROOT / "models").rglob("*.md"),
                 ROOT / "README.md"]:
        text = path.read_text()
        assert "METHOD.md" not in text, f"{path} cites METHOD.md, which is not in this repository"
        for first, last in re.findall(r"method\.md sections? (\d+)(?:-(\d+))?", text):
            cited |= set(range(int(first), int(last or first) + 1))
    assert cited and cited <= sections


@pytest.mark.parametrize("page", ["README.md", "docs/results.md"])
def test_joint_kl_table_is_the_report_as_written(page):
    """The headline joint-KL table (README) and its section (docs/results.md) are the Markdown file the command
    above them wrote, verbatim."""
    text = (ROOT / page).read_text()
    table = (ROOT / "results" / "joint_kl.md").read_text()
    command = "adjust eval joint-kl --rollouts runs/shakespeare/rollouts -K 2,4,8"
    assert table in text and text.index(command) < text.index(table)


def test_results_tables_are_the_reports_as_written():
    """The joint-KL and task tables are the Markdown files their commands wrote, verbatim, under the
    command that writes them, and their JSON records a clean code version."""
    import json

    readme = (ROOT / "docs" / "results.md").read_text()
    for stem, command in (("results/joint_kl", "adjust eval joint-kl --rollouts runs/shakespeare/rollouts -K 2,4,8"),
                          ("results/tasks", "adjust eval tasks --base models/task-base --prompts runs/tasks/eval_prompts.jsonl --out-dir results"),
                          ("results/frontier_shakespeare/frontier", "--out-dir results/frontier_shakespeare")):
        table = (ROOT / f"{stem}.md").read_text()
        if stem.endswith("frontier"):  # the report's table of points (its first Markdown table), as written
            table = table[table.index("\n| point |") + 1:].split("\n\n", 1)[0]
        assert table in readme
        assert readme.index(command) < readme.index(table)
        version = json.loads((ROOT / f"{stem}.json").read_text())["code_version"]
        assert version["dirty"] is False and len(version["commit"]) == 40


def test_results_frontier_rows_are_the_reports_rows():
    """The selected frontier rows of docs/results.md are lines of the report the command above them wrote, and
    that report's JSON records a clean code version."""
    import json

    readme = (ROOT / "docs" / "results.md").read_text()
    report = (ROOT / "results" / "frontier_tasks" / "frontier.md").read_text().splitlines()
    command = "--out-dir results/frontier_tasks"
    start = readme.index(command)
    section = readme[start:].split("### ", 1)[0].split("**Shipped model**", 1)[0]  # the task model's part
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 5
    assert all(row in report for row in rows), [row for row in rows if row not in report]
    version = json.loads((ROOT / "results" / "frontier_tasks" / "frontier.json").read_text())["code_version"]
    assert version["dirty"] is False and len(version["commit"]) == 40
