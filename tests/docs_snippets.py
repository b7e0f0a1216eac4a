"""Runs the ```python blocks of the docs (README.md, docs/*.md) as a reader would: page by page, top to bottom.

    python tests/docs_snippets.py README.md docs/design.md     # tests/test_docs.py runs every page

Every page runs in a fresh temporary working directory with a fresh namespace; its blocks run in order
in that namespace (a later block may use what an earlier one defined). Code blocks that are not meant
to run say so by their language (```text, ```console, ```bash, ```yaml, ...): every fence names one.

A block can be preceded (on the line right above its fence) by one HTML comment, invisible on the
rendered page, that says how the test runs it:

* ``<!-- docs-test: Trainer(max_steps=12) -->``: while the block runs, every ``lightning.Trainer`` it
  builds gets these keyword arguments instead of its own (a small run of a block that trains long);
* ``<!-- docs-test: namespace of `python examples/x.py --a 1` -->``: before the block, the script runs as
  ``__main__`` with those arguments in the page's directory, and the page's blocks run in its namespace
  (a block that continues a script).

Any other ``docs-test`` comment is an error.
"""

from __future__ import annotations

import ast
import os
import re
import runpy
import shlex
import sys
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[^\n`]*)\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<body>.*?)\s*-->")
TRAINER = re.compile(r"^Trainer\((?P<args>.*)\)$", re.S)
NAMESPACE = re.compile(r"^namespace of `python (?P<command>[^`]+)`$")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    trainer: dict[str, Any] = field(default_factory=dict)
    namespace_of: list[str] | None = None


def _parse_marker(body: str, where: str) -> dict[str, Any]:
    if m := TRAINER.match(body):
        call = ast.parse(f"f({m['args']})", mode="eval").body
        if call.args:
            raise ValueError(f"{where}: `docs-test: Trainer(...)` takes keyword arguments only: {body!r}")
        return {"trainer": {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}}
    if m := NAMESPACE.match(body):
        return {"namespace_of": shlex.split(m["command"])}
    raise ValueError(f"{where}: unknown `docs-test` marker {body!r} (see tests/docs_snippets.py)")


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, with the marker of the line above it, if any."""
    text = path.read_text()
    page = path.relative_to(ROOT).as_posix()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        block = Block(page, line, m["lang"].strip(), m["code"])
        above = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if marker := MARKER.search(above):
            for key, value in _parse_marker(marker["body"], f"{page}:{line - 1}").items():
                setattr(block, key, value)
        out.append(block)
    markers = [text.count("\n", 0, m.start()) + 1 for m in MARKER.finditer(text)]
    placed = {b.line - 1 for b in out if b.trainer or b.namespace_of}
    stray = [n for n in markers if n not in placed]
    if stray:
        raise ValueError(f"{page}: `docs-test` marker(s) on line(s) {stray} not directly above a code block")
    return out


@contextmanager
def _trainer_arguments(overrides: dict[str, Any]) -> Iterator[None]:
    if not overrides:
        yield
        return
    from lightning.pytorch import Trainer

    original = Trainer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **{**kwargs, **overrides})

    Trainer.__init__ = init
    try:
        yield
    finally:
        Trainer.__init__ = original


def run_page(path: Path, workdir: Path) -> list[str]:
    """Run the page's python blocks in ``workdir``; returns one message per failing block (empty: all ran)."""
    failures: list[str] = []
    python = [b for b in blocks(path) if b.lang == "python"]
    if not python:
        return failures
    cwd = os.getcwd()
    argv = sys.argv[:]
    workdir.mkdir(parents=True)
    os.chdir(workdir)
    sys.path.insert(0, str(workdir))
    namespace: dict[str, Any] = {"__name__": "__main__"}
    try:
        for block in python:
            where = f"{block.page}:{block.line}"
            try:
                if block.namespace_of:
                    script, *args = block.namespace_of
                    sys.argv = [script, *args]
                    namespace = dict(runpy.run_path(str(ROOT / script), run_name="__main__"))
                with _trainer_arguments(block.trainer):
                    exec(compile(block.code, where, "exec"), namespace)
            except BaseException:  # noqa: BLE001 - report every block, SystemExit included
                failures.append(f"{where}: the ```python block failed:\n{traceback.format_exc()}")
                break  # later blocks of the page build on this one
    finally:
        sys.argv = argv
        sys.path.remove(str(workdir))
        os.chdir(cwd)
    return failures


def main(argv: list[str]) -> int:
    """``[--workdir DIR] PAGE...``: the pages run in subfolders of DIR (default: a new temporary folder). The
    folder is left in place: a process that a block started (e.g. a process pool's fork server, which
    imports torch in the page's folder) may still be running when this one exits."""
    workdir = Path(argv[1]) if argv[:1] == ["--workdir"] else Path(tempfile.mkdtemp(prefix="docs-"))
    pages = argv[2:] if argv[:1] == ["--workdir"] else argv
    failures = []
    for i, page in enumerate(pages):
        print(f"[docs] {page}", flush=True)
        failures += run_page(ROOT / page, workdir / f"page{i}")
    for failure in failures:
        print(failure, file=sys.stderr)
    print(f"[docs] {len(pages)} page(s), {len(failures)} failing block(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
