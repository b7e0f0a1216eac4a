"""The ablation grid: named configurations (overrides of one base ``fedprune fit`` YAML) times seeds.

A grid file (see docs/ablation.md and ``examples/ablation/grid.yaml``)::

    name: default
    base: base.yaml                 # a `fedprune fit` config, relative to this file
    out: runs/ablation              # one folder per cell under it
    page: docs/results.md           # the generated results page
    figure: docs/img/results.png
    seeds: [0, 1, 2]                # every configuration runs once per seed
    set: {trainer.max_steps: 60}    # overrides applied to every cell
    configurations:
      fp: {label: "FP, column, 50 %", set: {}}
      "col_{sparsity}":             # a matrix expands into one configuration per combination
        matrix: {sparsity: [0.3, 0.7]}
        set: {callbacks.SparsityRampCallback.target_sparsity: "{sparsity}"}
    findings: {...}                 # which configurations each finding compares (analysis.py)
    baselines: {...}
    full: {seeds: [0, 1, 2, 3, 4]}  # `--full`: merged over the grid (dicts merged, lists replaced)
    anchors: {targets: &targets '...'}  # not read: a place for YAML anchors used below (*targets)

An override key is a dotted path into the base config (``model.clients_per_round``,
``data.init_args.corpus.noise_snr_db``), or ``callbacks.<ClassName>[.<init arg>...]`` for the entry
of ``trainer.callbacks`` whose class is ``<ClassName>``: ``null`` removes it, a mapping replaces its
``init_args`` (or adds it: a name of :mod:`lightning_fedprune.callbacks` or
:mod:`lightning_fedprune.baselines`, or a mapping with a ``class_path``).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_fedprune.validation import check_int, check_str, fail

#: modules whose classes a `callbacks.<Name>` override may add by their short name
CALLBACK_MODULES = ("lightning_fedprune.callbacks", "lightning_fedprune.baselines")
#: callbacks the harness adds to every cell itself (a base config's own are replaced)
HARNESS_CALLBACKS = ("RunSummary", "CellRecord")
GRID_KEYS = ("name", "base", "out", "page", "figure", "seeds", "set", "configurations", "findings", "baselines",
             "description", "metric", "full", "jobs", "cell_timeout", "anchors")


@dataclass(frozen=True)
class Configuration:
    """One configuration of the grid: its name, a label for the page, and its overrides."""

    name: str
    label: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Cell:
    """One run: a configuration at one seed, in its own folder."""

    configuration: str
    seed: int
    dir: Path

    @property
    def key(self) -> str:
        return f"{self.configuration}/seed{self.seed}"


@dataclass
class Grid:
    """A loaded grid (``--full`` already merged)."""

    path: Path
    name: str
    base: dict[str, Any]
    base_path: Path
    out: Path
    page: Path
    figure: Path
    seeds: list[int]
    overrides: dict[str, Any]
    configurations: dict[str, Configuration]
    findings: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, str] = field(default_factory=dict)
    description: str = ""
    metric: str = "val/wer"
    full: bool = False
    jobs: int = 1
    cell_timeout: float = 3600.0

    def cells(self) -> list[Cell]:
        """Every cell, seed-major (all configurations at the first seed first: a partial run then covers
        every configuration before it adds seeds)."""
        return [Cell(name, seed, self.out / name / f"seed{seed}") for seed in self.seeds for name in self.configurations]

    def cell_config(self, cell: Cell) -> dict[str, Any]:
        """The complete ``fedprune fit`` config of ``cell``: base, the grid's and the configuration's
        overrides, the seed, and the harness's logger and summary callbacks writing into the cell's folder."""
        cfg = copy.deepcopy(self.base)
        apply_overrides(cfg, self.overrides)
        apply_overrides(cfg, self.configurations[cell.configuration].overrides)
        cfg["seed_everything"] = cell.seed
        cfg.setdefault("model", {})["seed"] = cell.seed
        cfg["quiet"] = True
        trainer = cfg.setdefault("trainer", {})
        trainer.setdefault("enable_checkpointing", False)
        trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                             "init_args": {"save_dir": str(cell.dir), "name": "logs", "version": 0}}
        callbacks = [c for c in trainer.get("callbacks") or [] if _class_name(c) not in HARNESS_CALLBACKS]
        callbacks.append({"class_path": "lightning_fedprune.observers.summary.RunSummary",
                          "init_args": {"path": str(cell.dir / "summary.json")}})
        callbacks.append({"class_path": "lightning_fedprune.ablation.record.CellRecord",
                          "init_args": {"path": str(cell.dir / "record.json")}})
        trainer["callbacks"] = callbacks
        return cfg


def config_hash(cfg: dict[str, Any]) -> str:
    """A short hash of a cell's config: a finished cell whose config changed is run again."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _class_name(entry: Any) -> str | None:
    if isinstance(entry, dict) and isinstance(entry.get("class_path"), str):
        return entry["class_path"].rpartition(".")[2]
    return None


def _resolve_callback(name: str) -> str:
    import importlib

    for module in CALLBACK_MODULES:
        if getattr(importlib.import_module(module), name, None) is not None:
            return f"{module}.{name}"
    raise ValueError(f"override `callbacks.{name}`: the base config has no {name} callback and it is not a class of "
                     f"{' or '.join(CALLBACK_MODULES)}; give a mapping with its `class_path`.")


def apply_overrides(cfg: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Apply dotted-path overrides to a ``fedprune fit`` config dict in place (see the module docstring)."""
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            fail("override key", "a dotted path such as 'model.clients_per_round'", key)
        parts = key.split(".")
        if parts[0] == "callbacks":
            if len(parts) < 2:
                fail("override key", "'callbacks.<ClassName>[.<argument>]'", key)
            _override_callback(cfg, parts[1], parts[2:], copy.deepcopy(value))
            continue
        node = cfg
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {key!r}: {part!r} is {child!r} in the base config, not a mapping")
            node = child
        node[parts[-1]] = copy.deepcopy(value)


def _override_callback(cfg: dict[str, Any], name: str, path: list[str], value: Any) -> None:
    callbacks = cfg.setdefault("trainer", {}).get("callbacks") or []
    cfg["trainer"]["callbacks"] = callbacks
    index = next((i for i, c in enumerate(callbacks) if _class_name(c) == name), None)
    if not path:
        if value is None:
            if index is not None:
                del callbacks[index]
            return
        if not isinstance(value, dict):
            fail(f"callbacks.{name}", "null (remove it) or a mapping of its init_args (or with a class_path)", value)
        entry = value if "class_path" in value else {
            "class_path": callbacks[index]["class_path"] if index is not None else _resolve_callback(name),
            "init_args": value}
        if index is None:
            callbacks.append(entry)
        else:
            callbacks[index] = entry
        return
    if index is None:
        raise ValueError(f"override `callbacks.{name}.{'.'.join(path)}`: the config has no {name} callback to change "
                         f"(add it with `callbacks.{name}: {{...}}` first)")
    node = callbacks[index].setdefault("init_args", {}) or {}
    callbacks[index]["init_args"] = node
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


# ---------------------------------------------------------------------------------------------- loading
def _merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base``: mappings key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return over


def _substitute(value: Any, variables: dict[str, Any]) -> Any:
    """``"{var}"`` becomes the variable's value (its type kept); ``{var}`` inside a longer string is
    replaced by its text. Only the matrix's variables are replaced (regular expressions keep their braces)."""
    if isinstance(value, dict):
        return {_substitute(k, variables): _substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, str) and variables:
        names = "|".join(re.escape(n) for n in variables)
        whole = re.fullmatch(r"\{(" + names + r")\}", value)
        if whole:
            return variables[whole.group(1)]
        return re.sub(r"\{(" + names + r")\}", lambda m: str(variables[m.group(1)]), value)
    return value


def _expand(name: str, spec: Any) -> list[Configuration]:
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        fail(f"configurations.{name}", "a mapping with `set` (and optionally `label`, `matrix`)", spec)
    unknown = set(spec) - {"set", "label", "matrix"}
    if unknown:
        raise ValueError(f"configurations.{name}: unknown keys {sorted(unknown)} (expected set, label, matrix)")
    overrides = spec.get("set") or {}
    if not isinstance(overrides, dict):
        fail(f"configurations.{name}.set", "a mapping of dotted override keys", overrides)
    matrix = spec.get("matrix") or {}
    if not isinstance(matrix, dict) or not all(isinstance(v, list) and v for v in matrix.values()):
        fail(f"configurations.{name}.matrix", "a mapping variable -> non-empty list of values", matrix)
    out = []
    for combo in itertools.product(*matrix.values()) if matrix else [()]:
        variables = dict(zip(matrix, combo))
        cname = _substitute(name, variables)
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(cname)):
            fail("configuration name", "letters, digits and _ . + - (it names a folder)", cname)
        label = _substitute(spec.get("label", cname), variables)
        out.append(Configuration(str(cname), str(label), _substitute(overrides, variables)))
    return out


def load_grid(path: str | Path, full: bool = False) -> Grid:
    """Read a grid file (``full``: merge its ``full`` section first) and its base config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`--config`: grid file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        fail("grid", "a YAML mapping", raw)
    unknown = set(raw) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"grid {path}: unknown keys {sorted(unknown)}; expected some of {GRID_KEYS}")
    full_section = raw.pop("full", None) or {}
    if full:
        if not full_section:
            raise ValueError(f"`--full`: grid {path} has no `full` section")
        raw = _merge(raw, full_section)
    base_path = (path.parent / check_str(raw.get("base"), "base")).resolve()
    if not base_path.is_file():
        raise FileNotFoundError(f"grid {path}: base config {str(base_path)!r} does not exist")
    base = yaml.safe_load(base_path.read_text()) or {}
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        fail("seeds", "a non-empty list of integers", seeds)
    seeds = [check_int(s, "seeds[]") for s in seeds]
    configurations: dict[str, Configuration] = {}
    specs = raw.get("configurations")
    if not isinstance(specs, dict) or not specs:
        fail("configurations", "a non-empty mapping name -> {set: {...}}", specs)
    for name, spec in specs.items():
        for conf in _expand(str(name), spec):
            if conf.name in configurations:
                raise ValueError(f"configuration {conf.name!r} is defined twice")
            configurations[conf.name] = conf
    grid = Grid(
        path=path, name=str(raw.get("name", path.stem)), base=base, base_path=base_path,
        out=Path(raw.get("out", "runs/ablation")), page=Path(raw.get("page", "docs/results.md")),
        figure=Path(raw.get("figure", "docs/img/results.png")), seeds=seeds, overrides=dict(raw.get("set") or {}),
        configurations=configurations, findings=dict(raw.get("findings") or {}),
        baselines=dict(raw.get("baselines") or {}), description=str(raw.get("description") or ""),
        metric=str(raw.get("metric", "val/wer")), full=full,
        jobs=check_int(raw.get("jobs", 1), "jobs", min=1), cell_timeout=float(raw.get("cell_timeout", 3600.0)),
    )
    _check_references(grid)
    return grid


def configuration_names(spec: Any) -> list[str]:
    """The configuration names a findings or baselines spec refers to: its string leaves, in order.

    >>> configuration_names({"uniform": "fp", "adaptive": {"power": "fp_p"}, "threshold": 0.3})
    ['fp', 'fp_p']
    """
    if isinstance(spec, dict):
        return [n for v in spec.values() for n in configuration_names(v)]
    if isinstance(spec, list):
        return [n for v in spec for n in configuration_names(v)]
    return [spec] if isinstance(spec, str) else []


def _check_references(grid: Grid) -> None:
    names = configuration_names(grid.findings) + configuration_names(grid.baselines)
    missing = sorted({n for n in names if n not in grid.configurations})
    if missing:
        raise ValueError(f"grid {grid.path}: findings/baselines name configurations that are not defined: {missing}")
