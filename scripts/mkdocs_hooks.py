"""mkdocs hook (mkdocs.yml `hooks:`): pages show the options of `fedprune export` / `fedprune ablate` as the
commands' own parsers print them, so the docs cannot fall behind the code.

A line ``<!-- fedprune-help: export -->`` in a page becomes a ``text`` block with the output of
``fedprune export --help`` (likewise ``ablate``). ``tests/test_docs.py`` checks every marker names a command.
"""

from __future__ import annotations

import os
import re
from typing import Any

MARKER = re.compile(r"^<!-- fedprune-help: (?P<command>[a-z]+) -->$", re.M)


def command_help(command: str) -> str:
    """``fedprune <command> --help``, formatted for 100 columns."""
    from lightning_fedprune.cli import command_parsers

    parsers = command_parsers()
    if command not in parsers:
        raise ValueError(f"`fedprune-help: {command}`: no such command; the commands are {sorted(parsers)}")
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return parsers[command].format_help().rstrip()
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def render(markdown: str) -> str:
    return MARKER.sub(lambda m: f"```text\n{command_help(m['command'])}\n```", markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return render(markdown)
