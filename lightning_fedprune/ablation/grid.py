"""The ablation grid: named configurations (overrides of one base ``fedprune fit`` YAML) times seeds.

A grid file (see docs/ablation.md and ``examples/ablation/grid.yaml``)::

    name: default
    base: base.yaml                 # a `fedprune fit` config, relative to this file
    out: runs/ablation              # one folder per cell under it
    page: docs/results.md           # the generated results page
    figure: docs/img/results.png
    seeds: [10, 11, 12]             # every configuration runs once per seed
    calibration_seeds: [0, 1000]    # seeds used to choose the setting: never test seeds (checked)
    statistics: {alpha: 0.05, margin: 0.01, power: 0.8}   # stated before the run (analysis.py)
    warm_start: {rounds: 10, configuration: fp}           # rounds 0-9 trained once per seed
    set: {trainer.max_steps: 60}    # overrides applied to every cell
    configurations:
      fp: {label: "FP, column, 50 %", set: {}}
      "col_{sparsity}":             # a matrix expands into one configuration per combination
        matrix: {sparsity: [0.3, 0.7]}
        set: {callbacks.SparsityRampCallback.target_sparsity: "{sparsity}"}
      fd: {warm_start: false, set: {...}}   # its first rounds differ: trained from round 0
    findings: {...}                 # which configurations each finding compares (analysis.py)
    baselines: {...}
    planning: {calibration: calibration.json, target_mde: 0.02}   # the power plan on the page
    readme: README.md               # the marked block `fedprune ablate` rewrites (report.py)
    full: {seeds: [0, 1, 2, 3, 4]}  # `--full`: merged over the grid (dicts merged, lists replaced)
    anchors: {targets: &targets '...'}  # not read: a place for YAML anchors used below (*targets)

**Shared warm start.** With ``warm_start``, the rounds before pruning are trained once per seed: a
*warm-start cell* runs ``warm_start.configuration`` for ``rounds`` rounds and saves a checkpoint, and every
configuration resumes from it (``ckpt_path``, ``model.resume_config_change: apply``) -- bit for bit what
an uninterrupted run does, since every random choice is a pure function of (seed, round, client). A
configuration whose first ``rounds`` rounds differ (another strategy from round 0, an importance that
needs statistics the warm start does not keep) sets ``warm_start: false`` (trained from round 0) or names
the configuration whose first rounds it shares (``warm_start: fp_gradient``: a warm start of its own).

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

from lightning_fedprune.validation import check_float, check_int, check_str, fail

#: modules whose classes a `callbacks.<Name>` override may add by their short name
CALLBACK_MODULES = ("lightning_fedprune.callbacks", "lightning_fedprune.baselines")
#: callbacks the harness adds to every cell itself (a base config's own are replaced)
HARNESS_CALLBACKS = ("RunSummary", "CellRecord", "WarmStartCheckpoint")
GRID_KEYS = ("name", "base", "out", "page", "figure", "seeds", "calibration_seeds", "statistics", "warm_start", "set",
             "configurations", "findings", "baselines", "planning", "readme", "description", "metric", "full", "jobs",
             "cell_timeout", "anchors")
#: the folder (under ``out``) of the warm-start cells, and the checkpoint file in each
WARM_DIR = "_warm_start"
WARM_CHECKPOINT = "warm_start.ckpt"


@dataclass(frozen=True)
class Statistics:
    """The test settings, stated in the grid file before the run (see :mod:`~lightning_fedprune.ablation.analysis`).

    Args:
        alpha: family-wise error rate of every test on the page (Holm–Bonferroni).
        margin: the equivalence margin: WER differences within ``±margin`` count as the same (TOST), and a
            gain smaller than it counts as none.
        power: the power at which the minimum detectable effect is stated.
        confidence: level of the confidence intervals of the mean differences.
    """

    alpha: float = 0.05
    margin: float = 0.01
    power: float = 0.8
    confidence: float = 0.95


@dataclass(frozen=True)
class WarmStart:
    """Train ``configuration``'s first ``rounds`` rounds once per seed; the cells resume from there."""

    rounds: int
    configuration: str


@dataclass(frozen=True)
class Configuration:
    """One configuration of the grid: its name, a label for the page, and its overrides."""

    name: str
    label: str
    overrides: dict[str, Any]
    #: None: the grid's warm start (if any); False: trained from round 0; a name: that configuration's
    warm_start: str | bool | None = None


@dataclass(frozen=True)
class Cell:
    """One run: a configuration at one seed, in its own folder. A *warm-start* cell (``warm``) trains a
    configuration's first rounds and saves the checkpoint the cells of that seed resume from."""

    configuration: str
    seed: int
    dir: Path
    warm: bool = False

    @property
    def key(self) -> str:
        return f"{WARM_DIR + ':' if self.warm else ''}{self.configuration}/seed{self.seed}"


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
    calibration_seeds: list[int] = field(default_factory=list)
    statistics: Statistics = field(default_factory=Statistics)
    warm_start: WarmStart | None = None
    planning: dict[str, Any] = field(default_factory=dict)
    readme: Path | None = None
    #: the ``findings`` and ``baselines`` of the ``full`` section merged over this grid's (for the power plan of
    #: a default grid)
    full_findings: dict[str, Any] = field(default_factory=dict)
    full_baselines: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        """Every measured cell, seed-major (all configurations at the first seed first: a partial run then
        covers every configuration before it adds seeds)."""
        return [Cell(name, seed, self.out / name / f"seed{seed}") for seed in self.seeds for name in self.configurations]

    def warm_source(self, configuration: str) -> str | None:
        """The configuration whose warm start ``configuration`` resumes from (None: trained from round 0)."""
        if self.warm_start is None:
            return None
        choice = self.configurations[configuration].warm_start
        if choice is False:
            return None
        return self.warm_start.configuration if choice is None or choice is True else str(choice)

    def warm_cell(self, cell: Cell) -> Cell | None:
        """The warm-start cell ``cell`` resumes from (None when it trains from round 0)."""
        source = None if cell.warm else self.warm_source(cell.configuration)
        if source is None:
            return None
        return Cell(source, cell.seed, self.out / WARM_DIR / source / f"seed{cell.seed}", warm=True)

    def warm_cells(self) -> list[Cell]:
        """The warm-start cells the measured cells need, one per (source configuration, seed), seed-major."""
        out: dict[str, Cell] = {}
        for cell in self.cells():
            warm = self.warm_cell(cell)
            if warm is not None:
                out.setdefault(warm.key, warm)
        return list(out.values())

    def cell_config(self, cell: Cell) -> dict[str, Any]:
        """The complete ``fedprune fit`` config of ``cell``: base, the grid's and the configuration's
        overrides, the seed, and the harness's logger and record callbacks writing into the cell's folder.
        A warm-start cell stops after ``warm_start.rounds`` rounds and saves its checkpoint there; a cell
        with a warm start resumes from that checkpoint."""
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
                          "init_args": {"path": str(cell.dir / "summary.json"), "print_summary": False}})
        callbacks.append({"class_path": "lightning_fedprune.ablation.record.CellRecord",
                          "init_args": {"path": str(cell.dir / "record.json")}})
        if cell.warm:
            assert self.warm_start is not None
            callbacks.append({"class_path": "lightning_fedprune.ablation.record.WarmStartCheckpoint",
                              "init_args": {"round": self.warm_start.rounds, "path": str(cell.dir / WARM_CHECKPOINT)}})
            trainer["enable_checkpointing"] = True  # Lightning's switch for checkpoint callbacks; the only one here
        warm = self.warm_cell(cell)
        if warm is not None:
            cfg["ckpt_path"] = str(warm.dir / WARM_CHECKPOINT)
            cfg["model"]["resume_config_change"] = "apply"
        trainer["callbacks"] = callbacks
        return cfg

    def cell_digest(self, cell: Cell) -> str:
        """The hash that says whether ``cell`` is finished: of its config (with the cells' folder written as
        ``<out>``, so a grid's cells stay valid when the folder moves, e.g. copied back from the machine that
        ran them) and of its warm start's (a changed warm start reruns the cells that resume from it)."""
        text = json.dumps(self.cell_config(cell), sort_keys=True, default=str)
        for prefix in dict.fromkeys([str(self.out.resolve()), str(self.out)]):
            text = text.replace(json.dumps(prefix)[1:-1], "<out>")
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        warm = self.warm_cell(cell)
        if warm is not None:
            digest = config_hash({"cell": digest, "warm_start": self.cell_digest(warm)})
        return digest


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
    unknown = set(spec) - {"set", "label", "matrix", "warm_start"}
    if unknown:
        raise ValueError(f"configurations.{name}: unknown keys {sorted(unknown)} (expected set, label, matrix, "
                         "warm_start)")
    warm = spec.get("warm_start")
    if warm is not None and not isinstance(warm, (bool, str)):
        fail(f"configurations.{name}.warm_start", "false, true or the name of a configuration", warm)
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
        out.append(Configuration(str(cname), str(label), _substitute(overrides, variables),
                                 _substitute(warm, variables) if isinstance(warm, str) else warm))
    return out


def _seeds(value: Any, key: str, default: list[int] | None = None) -> list[int]:
    if value is None and default is not None:
        return default
    if not isinstance(value, list) or (not value and default is None):
        fail(key, "a non-empty list of integers" if default is None else "a list of integers", value)
    seeds = [check_int(s, f"{key}[]") for s in value]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"`{key}` lists a seed twice: {seeds}")
    return seeds


def _statistics(value: Any) -> Statistics:
    if value is None:
        return Statistics()
    if not isinstance(value, dict):
        fail("statistics", "a mapping with alpha, margin, power, confidence", value)
    unknown = set(value) - {"alpha", "margin", "power", "confidence"}
    if unknown:
        raise ValueError(f"statistics: unknown keys {sorted(unknown)} (expected alpha, margin, power, confidence)")
    default = Statistics()
    return Statistics(
        alpha=check_float(value.get("alpha", default.alpha), "statistics.alpha", min=0, max=1, min_open=True,
                          max_open=True),
        margin=check_float(value.get("margin", default.margin), "statistics.margin", min=0, min_open=True),
        power=check_float(value.get("power", default.power), "statistics.power", min=0, max=1, min_open=True,
                          max_open=True),
        confidence=check_float(value.get("confidence", default.confidence), "statistics.confidence", min=0, max=1,
                               min_open=True, max_open=True),
    )


def _warm_start(value: Any) -> WarmStart | None:
    if value is None or value is False:
        return None
    if not isinstance(value, dict) or set(value) != {"rounds", "configuration"}:
        fail("warm_start", "a mapping {rounds: <int >= 1>, configuration: <name>} (or null)", value)
    return WarmStart(rounds=check_int(value["rounds"], "warm_start.rounds", min=1),
                     configuration=check_str(value["configuration"], "warm_start.configuration"))


def _planning(value: Any, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        fail("planning", "a mapping {calibration: <results JSON>, target_mde: <float>}", value)
    unknown = set(value) - {"calibration", "target_mde"}
    if unknown:
        raise ValueError(f"planning: unknown keys {sorted(unknown)} (expected calibration, target_mde)")
    calibration = (path.parent / check_str(value.get("calibration"), "planning.calibration")).resolve()
    if not calibration.is_file():
        raise FileNotFoundError(f"grid {path}: planning.calibration {str(calibration)!r} does not exist")
    return {"calibration": calibration,
            "target_mde": check_float(value.get("target_mde"), "planning.target_mde", min=0, min_open=True)}


def load_grid(path: str | Path, full: bool = False) -> Grid:
    """Read a grid file (``full``: merge its ``full`` section first) and its base config. Every key is
    checked here, with a message naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`--config`: grid file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"grid {path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        fail("grid", "a YAML mapping", raw)
    unknown = set(raw) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"grid {path}: unknown keys {sorted(unknown)}; expected some of {GRID_KEYS}")
    full_section = raw.pop("full", None) or {}
    if not isinstance(full_section, dict):
        fail("full", "a mapping merged over the grid by `--full`", full_section)
    unknown = set(full_section) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"grid {path}: unknown keys {sorted(unknown)} in `full`; expected some of {GRID_KEYS}")
    full_findings = dict(_merge(raw.get("findings") or {}, full_section.get("findings") or {})) \
        if full_section and not full else {}
    full_baselines = dict(_merge(raw.get("baselines") or {}, full_section.get("baselines") or {})) \
        if full_section and not full else {}
    if full:
        if not full_section:
            raise ValueError(f"`--full`: grid {path} has no `full` section")
        raw = _merge(raw, full_section)
    base_path = (path.parent / check_str(raw.get("base"), "base")).resolve()
    if not base_path.is_file():
        raise FileNotFoundError(f"grid {path}: base config {str(base_path)!r} does not exist")
    base = yaml.safe_load(base_path.read_text()) or {}
    seeds = _seeds(raw.get("seeds", [0]), "seeds")
    calibration_seeds = _seeds(raw.get("calibration_seeds"), "calibration_seeds", default=[])
    reused = sorted(set(seeds) & set(calibration_seeds))
    if reused:
        raise ValueError(f"grid {path}: `seeds` {reused} are also `calibration_seeds`: a seed used to choose the "
                         "setting must never be a test seed; use fresh seeds")
    configurations: dict[str, Configuration] = {}
    specs = raw.get("configurations")
    if not isinstance(specs, dict) or not specs:
        fail("configurations", "a non-empty mapping name -> {set: {...}}", specs)
    for name, spec in specs.items():
        for conf in _expand(str(name), spec):
            if conf.name in configurations:
                raise ValueError(f"configuration {conf.name!r} is defined twice")
            configurations[conf.name] = conf
    for key in ("findings", "baselines", "set"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            fail(key, "a mapping", raw[key])
    readme = raw.get("readme")
    grid = Grid(
        path=path, name=str(raw.get("name", path.stem)), base=base, base_path=base_path,
        out=Path(raw.get("out", "runs/ablation")), page=Path(raw.get("page", "docs/results.md")),
        figure=Path(raw.get("figure", "docs/img/results.png")), seeds=seeds, overrides=dict(raw.get("set") or {}),
        configurations=configurations, findings=dict(raw.get("findings") or {}),
        baselines=dict(raw.get("baselines") or {}), description=str(raw.get("description") or ""),
        metric=str(raw.get("metric", "val/wer")), full=full,
        jobs=check_int(raw.get("jobs", 1), "jobs", min=1),
        cell_timeout=check_float(raw.get("cell_timeout", 3600.0), "cell_timeout", min=0, min_open=True),
        calibration_seeds=calibration_seeds, statistics=_statistics(raw.get("statistics")),
        warm_start=_warm_start(raw.get("warm_start")), planning=_planning(raw.get("planning"), path),
        readme=Path(check_str(readme, "readme")) if readme is not None else None, full_findings=full_findings,
        full_baselines=full_baselines,
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
    if grid.warm_start is not None and grid.warm_start.configuration not in grid.configurations:
        raise ValueError(f"grid {grid.path}: `warm_start.configuration` {grid.warm_start.configuration!r} is not a "
                         "configuration of the grid")
    for conf in grid.configurations.values():
        if isinstance(conf.warm_start, str):
            if conf.warm_start not in grid.configurations:
                raise ValueError(f"grid {grid.path}: configurations.{conf.name}.warm_start names "
                                 f"{conf.warm_start!r}, which is not a configuration of the grid")
            if grid.warm_start is None:
                raise ValueError(f"grid {grid.path}: configurations.{conf.name}.warm_start needs the grid's "
                                 "`warm_start: {rounds: ..., configuration: ...}`")
