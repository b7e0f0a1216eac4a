"""Docs stay true: every snippet runs, every `fedprune` command line parses, the reference covers the public
API from its docstrings, the README's quick start is the YAML's run, no stale number or word about how the
project was made, links resolve.

How the ```python blocks run (and the comments that shrink a block that trains): tests/docs_snippets.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_snippets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: where `fedprune ...` command lines are looked for (YAML and TOML comments included)
COMMAND_FILES = [*DOCS, *sorted(p for p in (ROOT / "examples").rglob("*")
                                if p.is_file() and p.suffix in {".md", ".yaml", ".toml"})]
SUBCOMMANDS = {"fit", "validate", "test", "predict"}
OTHER_COMMANDS = {"export", "ablate"}


# ---------------------------------------------------------------------------------------------- snippets
def test_every_code_block_names_its_language():
    unnamed = [f"{b.page}:{b.line}" for doc in DOCS for b in docs_snippets.blocks(doc) if not b.lang]
    assert not unnamed, f"name the language of these blocks (```python runs; ```text, ```console ... do not): {unnamed}"


def test_every_python_block_runs(tmp_path):
    pages = [doc.relative_to(ROOT).as_posix() for doc in DOCS
             if any(b.lang == "python" for b in docs_snippets.blocks(doc))]
    assert "README.md" in pages and len(pages) >= 4
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "docs_snippets.py"), "--workdir", str(tmp_path),
                           *pages], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert f"[docs] {len(pages)} page(s), 0 failing block(s)" in proc.stdout


def test_docs_test_markers_are_checked(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: Trainer(max_steps=3) -->\n```python\nx = 1\n```\n")
    ((block,),) = [[b for b in _blocks(page)]]
    assert block.trainer == {"max_steps": 3}
    page.write_text("<!-- docs-test: skip please -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="unknown `docs-test` marker 'skip please'"):
        _blocks(page)
    page.write_text("<!-- docs-test: Trainer(max_steps=3) -->\n\ntext\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match=r"marker\(s\) on line\(s\) \[1\] not directly above a code block"):
        _blocks(page)


def _blocks(page: Path):
    old = docs_snippets.ROOT
    docs_snippets.ROOT = page.parent
    try:
        return docs_snippets.blocks(page)
    finally:
        docs_snippets.ROOT = old


# ---------------------------------------------------------------------------------------------- command lines
def command_lines() -> list[tuple[str, list[str]]]:
    """Every `fedprune <command> --option ...` in the docs, the examples' comments and READMEs.

    A command line is ``fedprune`` followed by a command word and at least one option (or by options
    only); mentions of a command without options (`fedprune fit`, `fedprune fit/validate`) are prose.
    Continuation lines (ending in a backslash) are joined, also inside ``#`` comments; the text ends at
    a backtick, and a ``#`` comment after the command is dropped."""
    found = []
    for path in COMMAND_FILES:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            start, text = i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + re.sub(r"^\s*#?", "", lines[i])
            i += 1
            for m in re.finditer(r"(?<![\w./-])fedprune (?P<rest>[^`\n]*)", text):
                try:
                    tokens = shlex.split(m["rest"], comments=True)
                except ValueError:
                    continue  # prose with an apostrophe
                if not tokens:
                    continue
                if tokens[0].startswith("-") or (re.fullmatch(r"[a-z]+", tokens[0])
                                                 and any(t.startswith("-") for t in tokens[1:])):
                    found.append((f"{path.relative_to(ROOT)}:{start + 1}", tokens))
    return found


@pytest.fixture(scope="module")
def fit_parser():
    """LightningCLI's parser of `fedprune` (FedPruneCLI), built once; nothing is instantiated or run."""
    from lightning_fedprune.cli import FedPruneCLI, build_cli

    class Parsed(Exception):
        pass

    class ParseOnly(FedPruneCLI):
        def _parse_ckpt_path(self) -> None:  # the checkpoint a command names need not exist here
            pass

        def before_instantiate_classes(self) -> None:
            raise Parsed(self)

    import lightning_fedprune.cli as cli_module

    original = cli_module.FedPruneCLI
    cli_module.FedPruneCLI = ParseOnly
    try:
        build_cli(["fit", "--config", str(ROOT / "examples/quickstart.yaml")])
    except Parsed as parsed:
        return parsed.args[0].parser
    finally:
        cli_module.FedPruneCLI = original
    raise AssertionError("the CLI was not parsed")


def _parse(parser, args: list[str]) -> str | None:
    """None if ``args`` parse (``--help``/``--print_config`` exit 0), else the parser's message."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            parser.parse_args(args)
    except SystemExit as stop:
        if stop.code in (0, None):
            return None
        errors = [line for line in err.getvalue().splitlines() if "error:" in line]
        return "\n    ".join(errors) or err.getvalue().strip()[-800:] or f"exit {stop.code}"
    return None


def test_every_fedprune_command_line_parses(fit_parser, monkeypatch):
    from lightning_fedprune.cli import command_parsers

    monkeypatch.chdir(ROOT)  # the docs' relative paths (examples/...) are from the repository root
    commands = command_lines()
    assert len(commands) >= 20
    others = command_parsers()
    failures = []
    for where, tokens in commands:
        if tokens[0] in OTHER_COMMANDS:
            message = _parse(others[tokens[0]], tokens[1:])
        elif tokens[0] in SUBCOMMANDS or tokens[0].startswith("-"):
            message = _parse(fit_parser, tokens)
        else:
            message = f"`fedprune {tokens[0]}` is not a command ({sorted(SUBCOMMANDS | OTHER_COMMANDS)})"
        if message:
            failures.append(f"{where}: fedprune {shlex.join(tokens)}\n    {message}")
    assert not failures, "\n".join(failures)


def test_a_renamed_argument_fails_the_command_check(fit_parser, monkeypatch):
    from lightning_fedprune.cli import command_parsers

    monkeypatch.chdir(ROOT)
    assert _parse(fit_parser, ["fit", "--config", "examples/quickstart.yaml", "--model.clients_per_round", "3"]) is None
    assert "clients_per_rnd" in _parse(fit_parser, ["fit", "--config", "examples/quickstart.yaml",
                                                    "--model.clients_per_rnd", "3"])
    assert "clients_per " in _parse(fit_parser, ["fit", "--config", "examples/quickstart.yaml",  # no abbreviations
                                                 "--model.clients_per", "3"]) + " "
    assert "--ckpt" in _parse(command_parsers()["export"], ["--ckpt", "a.ckpt", "--output", "b.ckpt"])  # no abbreviations
    assert "required: --ckpt_path" in _parse(command_parsers()["export"], ["--checkpoint", "a.ckpt", "--output", "b.ckpt"])


# ---------------------------------------------------------------------------------------------- quick start
def test_readme_quick_start_is_the_yaml_run(tmp_path, monkeypatch):
    """The README's Python quick start and `fedprune fit --config examples/quickstart.yaml` are one run: the
    same settings of the module, the pruning plan and the Trainer, the same observers, the same weights."""
    import lightning.pytorch as pl

    from lightning_fedprune.cli import build_cli
    from lightning_fedprune.federated.checkpoint import config_changes, run_config

    rounds = 3
    (quick_start,) = [b for b in docs_snippets.blocks(ROOT / "README.md") if b.lang == "python"][:1]
    monkeypatch.chdir(tmp_path)
    original = pl.Trainer.__init__
    monkeypatch.setattr(pl.Trainer, "__init__", lambda self, *a, **kw: original(self, *a, **{**kw, "max_steps": rounds}))
    namespace: dict = {"__name__": "__main__"}
    exec(compile(quick_start.code.replace('trainer.callback_metrics["val/acc"]', '"(no validation yet)"'),
                 "README.md", "exec"), namespace)
    monkeypatch.setattr(pl.Trainer, "__init__", original)
    fed, trainer = namespace["fed"], namespace["trainer"]
    cli = build_cli(["fit", "--config", str(ROOT / "examples/quickstart.yaml"), f"--trainer.max_steps={rounds}",
                     f"--trainer.logger.init_args.save_dir={tmp_path / 'cli'}"])

    assert config_changes(run_config(cli.model), run_config(fed)) == []
    for name in ("max_steps", "val_check_interval", "log_every_n_steps", "check_val_every_n_epoch", "precision"):
        assert getattr(trainer, name) == getattr(cli.trainer, name), name
    assert trainer.log_every_n_steps == 1  # one point per round in the loggers

    def observers(t):
        return [(type(c).__name__, {k: v for k, v in vars(c).items() if not k.startswith("_")
                                    and isinstance(v, (bool, int, float, str, type(None)))})
                for c in t.callbacks if type(c).__module__.startswith("lightning_fedprune.observers")]

    assert observers(trainer) == observers(cli.trainer) and len(observers(trainer)) == 2
    assert fed.global_step == cli.model.global_step == rounds
    weights, yaml_weights = fed.state_dict(), cli.model.state_dict()
    assert weights.keys() == yaml_weights.keys()
    assert all(torch.equal(weights[k], yaml_weights[k]) for k in weights)  # same seed, data, cohorts, steps


# ---------------------------------------------------------------------------------------------- reference
REFERENCE = ROOT / "docs" / "reference.md"
REQUIRED_IN_REFERENCE = {
    "lightning_fedprune.FederatedLightningModule", "lightning_fedprune.FederatedDataModule",
    "lightning_fedprune.Strategy", "lightning_fedprune.FedAvg", "lightning_fedprune.FedAvgM", "lightning_fedprune.FedAdam",
    "lightning_fedprune.Executor", "lightning_fedprune.SequentialExecutor", "lightning_fedprune.ProcessPoolExecutor",
    "lightning_fedprune.FederatedCallback", "lightning_fedprune.export_task_checkpoint",
}


def _directives() -> dict[str, str]:
    """``::: path`` directives of the reference and their option text."""
    text = REFERENCE.read_text()
    return {m[1]: m[2] for m in re.finditer(r"^::: (\S+)\n((?:    .*\n)*)", text, re.M)}


def _readme_imports() -> set[str]:
    code = [b for b in docs_snippets.blocks(ROOT / "README.md") if b.lang == "python"][0].code
    names = set()
    for module, imported in re.findall(r"^from (lightning_fedprune[\w.]*) import \(?([^)]*?)\)?$", code, re.M | re.S):
        names |= {f"{module}.{n.strip()}" for n in imported.replace("\n", " ").split(",") if n.strip()}
    return names


def test_reference_documents_the_public_api_the_quick_start_and_the_commands():
    directives = _directives()
    assert REQUIRED_IN_REFERENCE <= set(directives), REQUIRED_IN_REFERENCE - set(directives)
    assert _readme_imports() and _readme_imports() <= set(directives), _readme_imports() - set(directives)
    hooks = sorted(n for n in vars(__import__("lightning_fedprune").FederatedCallback) if n.startswith("on_fed_"))
    assert len(hooks) == 4
    members = re.search(r"members: \[(.*)\]", directives["lightning_fedprune.FederatedCallback"]).group(1)
    assert sorted(m.strip() for m in members.split(",")) == hooks
    markers = re.findall(r"^<!-- fedprune-help: (\w+) -->$", REFERENCE.read_text(), re.M)
    assert sorted(markers) == sorted(OTHER_COMMANDS)


def test_cli_help_markers_render_the_parsers_options():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import mkdocs_hooks
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from lightning_fedprune.cli import command_parsers

    page = mkdocs_hooks.render(REFERENCE.read_text())
    assert "<!-- fedprune-help" not in page
    for name, parser in command_parsers().items():
        assert f"usage: fedprune {name}" in page
        for action in parser._actions:
            assert all(option in page for option in action.option_strings), action.option_strings
    with pytest.raises(ValueError, match="no such command"):
        mkdocs_hooks.render("<!-- fedprune-help: nope -->")


def test_every_argument_has_its_own_description():
    """What the reference shows for a class or function is its docstring's Args (or, for a record,
    Attributes) section, read by griffe as the site build reads it: every constructor argument needs its
    own entry with a description, and no entry may name something else."""
    griffe = pytest.importorskip("griffe")
    package = griffe.load("lightning_fedprune", search_paths=[str(ROOT)], docstring_parser="google")
    skip = {"self", "cls"}
    problems = []
    for path in _directives():
        obj = package[path.removeprefix("lightning_fedprune.")]
        obj = obj.final_target if obj.is_alias else obj
        arguments = [p.name for p in obj.parameters if p.name not in skip
                     and p.kind.value not in ("variadic positional", "variadic keyword")]
        docstrings = [obj.docstring, getattr(obj.members.get("__init__"), "docstring", None)]
        entries = [entry for doc in docstrings if doc is not None for section in doc.parse("google")
                   if section.kind.value in ("parameters", "attributes") for entry in section.value]
        documented = [e.name for e in entries]
        missing = [n for n in arguments if n not in documented]
        unknown = [n for n in documented if n not in arguments]
        empty = [e.name for e in entries if not e.description.strip()]
        if missing or unknown or empty:
            problems.append(f"{path}: undocumented {missing}, not arguments {unknown}, without a description {empty}")
    assert not problems, "\n".join(problems)


def test_ci_builds_the_site_strictly_after_the_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci and "mkdocs build --strict" in ci
    assert ci.index("bash scripts/test.sh") < ci.index("mkdocs build --strict")
    assert "scripts/gen_reference.py" not in ci and not (ROOT / "scripts" / "gen_reference.py").exists()


# ---------------------------------------------------------------------------------------------- stale words
#: pages another part of the project writes from its own runs (fedprune ablate), checked there
GENERATED = {"docs/ablation.md", "docs/results.md"}
STALE = [
    (r"(?i)\bissues?[ -]?\d", "an issue number"),
    (r"(?i)\bthe issue\b", "the issue (how the project was made)"),
    (r"(?i)\b(first|second) landing\b", "a development history"),
    (r"(?i)ASR helper|other helpers|helpers' jobs|helper's measurement", "who took a measurement"),
    (r"farm-studio", "a development tool's command"),
    (r"~\s?120 M", "the paper preset's size (116.1 M, measured)"),
    (r"WER 0\.002\d*\b|0\.002 / 0\.008", "an old WER of the main job"),
    (r'start_method="spawn"` \(the default\)', "the default start method (forkserver)"),
    (r"from an empty cache \(corpus generation included\), the\ncommand above printed", "a run said cached and uncached"),
]


def _user_text() -> list[tuple[str, str]]:
    files = [*DOCS, *sorted((ROOT / "examples").rglob("*.yaml")), *sorted((ROOT / "examples").rglob("*.md"))]
    return [(p.relative_to(ROOT).as_posix(), p.read_text()) for p in files
            if p.relative_to(ROOT).as_posix() not in GENERATED and "examples/ablation/" not in p.as_posix()]


@pytest.mark.parametrize("pattern, what", STALE, ids=[w for _, w in STALE])
def test_no_stale_numbers_or_words_about_how_the_project_was_made(pattern, what):
    hits = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
            for name, text in _user_text() for m in re.finditer(pattern, text)]
    assert not hits, f"{what}: {hits}"


def test_the_readme_and_the_asr_page_show_the_main_jobs_current_numbers():
    readme, asr = (ROOT / "README.md").read_text(), (ROOT / "docs" / "asr.md").read_text()
    block = re.search(r"```text\n(Federated pruning summary.*?)```", readme, re.S).group(1)
    assert block in asr  # one run, shown the same on both pages
    # the documented run meets the main job's goals: WER <= 0.01 at the 30 % target, every pruned layer compact
    wer = float(re.search(r"val/wer +([0-9.]+)\n", block).group(1))
    assert wer <= 0.01 and re.search(r"sparsity +0\.30\d \(target 0\.300,", block)
    assert re.search(r"client layers +\d+ compact .*, 0 masked-dense", block)


# ---------------------------------------------------------------------------------------------- links and nav
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
