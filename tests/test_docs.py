"""Docs stay true: the reference is generated from the code, links resolve, the README quick start runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_reference_is_generated_from_the_code():
    proc = subprocess.run([sys.executable, "scripts/gen_reference.py", "--check"], cwd=ROOT)
    assert proc.returncode == 0, "docs/reference.md is stale: run `python scripts/gen_reference.py`"


def test_every_public_argument_is_documented():
    text = (ROOT / "docs" / "reference.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \| (.*) \|$", text, re.M)
    assert len(rows) > 60
    missing = [name for name, _, meaning in rows if not meaning.strip()]
    assert not missing, f"arguments without a description in their class docstring: {missing}"


def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_mkdocs_nav_lists_existing_pages():
    nav = re.findall(r":\s*([\w.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert nav and all((ROOT / "docs" / page).exists() for page in nav)
    assert {p.name for p in (ROOT / "docs").glob("*.md")} <= set(nav)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["bash scripts/main_job.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
