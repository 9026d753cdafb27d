"""What the repository says about itself holds: its package list, its torch pin, the method page its
docstrings cite, and every results table against the file its command wrote."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_under_src_is_installed():
    """pyproject.toml lists the packages explicitly (for adjust.shipped_models): none under src/ is missing."""
    found = {str(p.parent.relative_to(ROOT / "src")).replace("/", ".") for p in (ROOT / "src").rglob("__init__.py")}
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    assert found <= listed and listed - found == {"adjust.shipped_models"}
    assert _pyproject()["tool"]["setuptools"]["package-dir"]["adjust.shipped_models"] == "models"


def test_the_pinned_torch_satisfies_the_declared_range():
    """constraints.txt (what is developed and tested on) pins a torch the package accepts."""
    from packaging.requirements import Requirement

    declared = next(Requirement(d.split("#")[0]) for d in _pyproject()["project"]["dependencies"]
                    if d.startswith("torch"))
    pins = [Requirement(line.split("#")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.split("#")[0].strip()]
    torch_pin = next(r for r in pins if r.name == "torch")
    version = next(iter(torch_pin.specifier)).version
    assert declared.specifier.contains(version)


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


def test_commit_subjects_fit_72_characters():
    """Every commit since the rule was set (bbb687f) has a subject of at most 72 characters, detail in the body."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    run = subprocess.run(["git", "log", "--format=%H %s", "bbb687f..HEAD"], cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip("history before bbb687f is not in this clone")
    landed_long = {"6b7f6af"}  # 73 characters, merged before this test could see it; history is not rewritten
    long = [line for line in run.stdout.splitlines()
            if len(line.split(" ", 1)[1]) > 72 and not line.startswith(tuple(landed_long))]
    assert not long, long


def _leaves(obj):
    """Every number in a JSON document."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def _named_files(text: str) -> list[Path]:
    """The files of results/ and models/ a text names (`results/x_{a,b}.json` expands; a directory gives its
    .json and .md files)."""
    import itertools

    out = []
    for name in re.findall(r"(?:results|models)/[\w./{},-]+", text):
        name = name.rstrip(".,)`")
        parts = re.split(r"\{([^}]*)\}", name)
        for combo in itertools.product(*[p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]):
            path = ROOT / "".join(combo)
            out += sorted(path.glob("*.json")) + sorted(path.glob("*.md")) if path.is_dir() else [path]
    return [p for p in out if p.is_file() and p.suffix in (".json", ".md")]


def test_every_results_table_figure_is_in_the_files_it_cites():
    """Each figure of each table of docs/results.md is in a file its section names above the table (or the
    table itself links): verbatim in a text file, or a number of a JSON file rounded as printed."""
    lines = (ROOT / "docs" / "results.md").read_text().splitlines()
    number = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")
    checked, missing, i = 0, [], 0
    while i < len(lines):
        if not lines[i].startswith("| "):
            i += 1
            continue
        end = i
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        section = i
        while section > 0 and not lines[section].startswith("## "):
            section -= 1
        files = _named_files("\n".join(lines[section:end]))
        assert files, f"the table at docs/results.md:{i + 1} names no results file"
        texts = [f.read_text() for f in files]
        numbers = [n for f, t in zip(files, texts) if f.suffix == ".json" for n in _leaves(json.loads(t))]
        for row in lines[i + 2:end]:
            for token in number.findall(row):
                value = float(token.replace(",", ""))
                half = 0.5 * 10 ** -len(token.split(".")[1]) if "." in token else 0.5
                checked += 1
                if not (any(token in t for t in texts) or any(abs(n - value) <= half + 1e-9 for n in numbers)):
                    missing.append(f"docs/results.md:{i + 1}: {token}")
        i = end
    assert checked > 500 and not missing, missing
