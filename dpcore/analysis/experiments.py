"""Named, versioned experiments: one TOML file = one comparison (arms) that trains as ordinary stored runs.

An experiment file (``experiments/<name>.toml``) holds a base run config, a list of arms (a label plus
config overrides), optionally an ε grid every arm is crossed with, what the experiment needs on this
machine (data folders, hub weights, local weights files, an offline ``pretrain`` step) and which
metrics its comparison table shows. Every arm is validated as a :class:`RunConfig` when the file is
loaded, so a broken file fails at once with the file, the key and the fix.

Each arm trains as a normal run in the run store; which runs belong to which experiment (name,
version, arm label) is kept beside the store in ``<runs>/experiments.json`` (the store's own schema is
untouched). :func:`comparison` rebuilds the table from the stored runs, so it works for experiments run
from the CLI, from the app or by another process. No UI code here.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpcore.config import RunConfig
from dpcore.errors import ConfigError, DPCoreError
from dpcore.store.events import Event, Listener
from dpcore.analysis import run_review

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = REPO_ROOT / "experiments"
EXPERIMENTS_ENV = "DPCORE_EXPERIMENTS_DIR"
SHARED_DATA_ENV = "DPCORE_SHARED_DATA"
DATA_DIR_ENV = "DPCORE_DATA_DIR"
TAGS_FILE = "experiments.json"
WEIGHTS_DIR = "experiment_weights"
PRETRAIN = "pretrain"  # the `pretrained` value (and needs.weights entry) meaning "the file the pretrain step makes"

# columns the comparison table can show, with their titles
METRICS = {
    "target_epsilon": "target ε",
    "epsilon": "ε spent",
    "patient_epsilon": "ε per patient",
    "patient_delta": "δ per patient",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "roc_auc": "ROC-AUC",
    "duration_s": "time (s)",
}
DEFAULT_METRICS = ("epsilon", "accuracy", "balanced_accuracy", "roc_auc", "duration_s")
_TOP_KEYS = {"name", "version", "title", "description", "needs", "pretrain", "base", "grid", "arms", "table", "notes"}
_PRETRAIN_KEYS = {"dataset", "data_dir", "backbone", "image_size", "epochs", "public", "options"}
_ARM_META = {"label", "reference", "non_private", "report"}
REPORTS = ("raw", "ema")  # which weights' test metrics an arm reports (default: those the run evaluated)


class ExperimentError(DPCoreError):
    """An experiment file is invalid, or an experiment cannot run here; names the file, key and fix."""

    def __init__(self, where: str, key: str, problem: str, fix: str):
        self.where, self.key, self.problem, self.fix = where, key, problem, fix
        super().__init__(f"{where}: {key}: {problem}. Fix: {fix}")


# -- the experiment ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    label: str  # unique within the experiment, e.g. "+augmult · ε=0.5"
    group: str  # the arm's label in the file (before crossing with the ε grid)
    overrides: dict[str, Any]  # RunConfig fields on top of the base (epsilon None = non-private)
    reference: dict[str, Any] = field(default_factory=dict)  # published numbers to compare with
    report: str | None = None  # "raw" / "ema": that weight set's metrics from the run's card (None: the run's own)

    @property
    def private(self) -> bool:
        return self.overrides.get("epsilon", 1.0) is not None


@dataclass(frozen=True)
class PretrainStep:
    """A non-private pretraining run on data declared public, made once and cached under the runs dir."""

    dataset: str
    data_dir: str | None
    backbone: str
    image_size: int | None
    epochs: int
    public: str  # why these data may be treated as public (shown with the experiment)
    options: dict[str, Any] = field(default_factory=dict)  # further keyword arguments of the engine

    def key(self) -> str:
        spec = {"dataset": self.dataset, "data_dir": self.data_dir, "backbone": self.backbone,
                "image_size": self.image_size, "epochs": self.epochs, "options": self.options}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Experiment:
    name: str
    version: int
    title: str
    description: str
    path: Path
    base: dict[str, Any]
    arms: tuple[Arm, ...]
    metrics: tuple[str, ...]
    needs_data: tuple[str, ...] = ()
    needs_weights: tuple[str, ...] = ()
    pretrain: PretrainStep | None = None
    notes: str = ""

    @property
    def tag(self) -> str:
        return f"{self.name}@v{self.version}"

    def arm(self, label: str) -> Arm:
        for a in self.arms:
            if a.label == label:
                return a
        raise ExperimentError(str(self.path), "arms", f"no arm labelled {label!r}",
                              f"use one of: {', '.join(a.label for a in self.arms)}")

    def select(self, only: Sequence[str] | str | None) -> list[Arm]:
        """The arms named in `only` (full labels or file labels, which take all their ε); all when empty."""
        if not only:
            return list(self.arms)
        wanted = [s.strip() for s in (only.split(",") if isinstance(only, str) else only) if s.strip()]
        chosen, unknown = [], []
        for w in wanted:
            hits = [a for a in self.arms if a.label == w or a.group == w]
            if not hits:
                unknown.append(w)
            chosen += [a for a in hits if a not in chosen]
        if unknown:
            raise ExperimentError(self.name, "--only", f"no arm labelled {', '.join(map(repr, unknown))}",
                                  "use arm labels as listed by --dry-run (or an arm's label from the file, for "
                                  "all its ε): " + ", ".join(sorted({a.group for a in self.arms})))
        return chosen

    def weights_path(self, runs_dir: str | Path) -> Path | None:
        """Where the pretrain step's output is cached (None: the experiment has no pretrain step)."""
        if self.pretrain is None:
            return None
        return Path(runs_dir) / WEIGHTS_DIR / f"{self.name}-v{self.version}-{self.pretrain.key()}.safetensors"

    def config(self, arm: Arm, data_root: str | Path | None = None, runs_dir: str | Path = "runs") -> RunConfig:
        """The arm's run config, with relative data paths under `data_root` and `pretrain` resolved."""
        root = resolve_data_root(data_root)
        values = dict(self.base)
        values.update(arm.overrides)
        if values.get("data_dir"):
            values["data_dir"] = str(_resolve(values["data_dir"], root))
        pre = values.get("pretrained")
        if pre == PRETRAIN:
            values["pretrained"] = str(self.weights_path(runs_dir))
        elif isinstance(pre, str) and pre.endswith(".safetensors"):
            values["pretrained"] = str(_resolve(pre, root))
        return RunConfig.from_dict(values)

    def configs(self, data_root: str | Path | None = None, runs_dir: str | Path = "runs",
                only: Sequence[str] | str | None = None) -> list[tuple[Arm, RunConfig]]:
        return [(a, self.config(a, data_root, runs_dir)) for a in self.select(only)]

    def uses_pretrain(self, arms: Sequence[Arm] | None = None) -> bool:
        return any({**self.base, **a.overrides}.get("pretrained") == PRETRAIN for a in (arms or self.arms))


def _resolve(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """`data_root`, else $DPCORE_SHARED_DATA, else $DPCORE_DATA_DIR, else <repo>/../shared/data."""
    if data_root:
        return Path(data_root).expanduser()
    for env in (SHARED_DATA_ENV, DATA_DIR_ENV):
        if os.environ.get(env):
            return Path(os.environ[env]).expanduser()
    return (REPO_ROOT.parent / "shared" / "data").resolve()


def experiments_dir(directory: str | Path | None = None) -> Path:
    if directory:
        return Path(directory)
    return Path(os.environ.get(EXPERIMENTS_ENV) or EXPERIMENTS_DIR)


# -- loading and validation ----------------------------------------------------------------------
def _need(cond: bool, where: str, key: str, problem: str, fix: str) -> None:
    if not cond:
        raise ExperimentError(where, key, problem, fix)


def _timm_name(backbone: str) -> str | None:
    from models import get_spec

    return get_spec(backbone).timm_name


def parse_experiment(data: dict[str, Any], path: Path) -> Experiment:
    """Build and validate an Experiment from a parsed TOML table (every arm must make a valid RunConfig)."""
    where = str(path)
    unknown = sorted(set(data) - _TOP_KEYS)
    _need(not unknown, where, unknown[0] if unknown else "", "is not an experiment key",
          f"remove it; valid keys: {', '.join(sorted(_TOP_KEYS))}")
    name = data.get("name")
    _need(isinstance(name, str) and name.strip() != "", where, "name", "is missing or empty",
          f'add name = "{path.stem}"')
    _need(name == path.stem, where, "name", f"{name!r} differs from the file name {path.stem!r}",
          f'rename the file to {name}.toml or set name = "{path.stem}"')
    version = data.get("version")
    _need(isinstance(version, int) and not isinstance(version, bool) and version >= 1, where, "version",
          f"must be a whole number ≥ 1, got {version!r}", "add version = 1 (raise it whenever the arms change)")
    description = data.get("description", "")
    _need(isinstance(description, str) and description.strip() != "", where, "description", "is missing",
          'add description = """what the experiment compares and why"""')

    base = data.get("base", {})
    _need(isinstance(base, dict), where, "base", "must be a table of run-config fields", "write it as [base]")
    _need("epsilon" not in base or isinstance(base["epsilon"], (int, float)), where, "base.epsilon",
          "must be a number", "set a number, or use non_private = true in an arm")

    grid = data.get("grid", {})
    _need(isinstance(grid, dict) and set(grid) <= {"epsilon"}, where, "grid",
          f"only 'epsilon' may be gridded, got {sorted(grid) if isinstance(grid, dict) else grid!r}",
          "write [grid] epsilon = [0.5, 1, 2, 8]")
    grid_eps = grid.get("epsilon", [])
    _need(isinstance(grid_eps, list) and all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                             and e > 0 and math.isfinite(e) for e in grid_eps),
          where, "grid.epsilon", f"must be a list of positive numbers, got {grid_eps!r}", "e.g. [0.5, 1, 2, 8]")

    raw_arms = data.get("arms")
    _need(isinstance(raw_arms, list) and raw_arms and all(isinstance(a, dict) for a in raw_arms), where, "arms",
          "needs at least one [[arms]] table", '[[arms]] label = "baseline" (plus run-config overrides)')
    arms: list[Arm] = []
    for i, raw in enumerate(raw_arms):
        key = f"arms[{i}]"
        label = raw.get("label")
        _need(isinstance(label, str) and label.strip() != "", where, f"{key}.label", "is missing",
              'give every arm a label, e.g. label = "baseline"')
        key = f"arms[{i}] ({label})"
        ref = raw.get("reference", {})
        _need(isinstance(ref, dict), where, f"{key}.reference", "must be a table",
              "write reference = { accuracy = 0.8253, source = \"...\" }")
        overrides = {k: v for k, v in raw.items() if k not in _ARM_META}
        non_private = raw.get("non_private", False)
        _need(isinstance(non_private, bool), where, f"{key}.non_private", "must be true or false",
              "write non_private = true")
        _need(not (non_private and "epsilon" in overrides), where, f"{key}", "sets both epsilon and non_private",
              "keep one of them")
        report = raw.get("report")
        _need(report is None or report in REPORTS, where, f"{key}.report", f"must be one of {list(REPORTS)}, "
              f"got {report!r}", 'write report = "raw" (last iterate) or report = "ema" (parameter average)')
        _need(report != "ema" or overrides.get("ema_decay", base.get("ema_decay")) is not None, where,
              f"{key}.report", "is 'ema' but the arm keeps no EMA", "set ema_decay = 0.99 in the arm or the base")
        if non_private:
            arms.append(Arm(label, label, {**overrides, "epsilon": None}, ref, report))
        elif "epsilon" in overrides or not grid_eps:
            arms.append(Arm(label, label, overrides, ref, report))
        else:
            for e in grid_eps:
                arms.append(Arm(f"{label} · ε={e:g}", label, {**overrides, "epsilon": float(e)}, ref, report))
    labels = [a.label for a in arms]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    _need(not dupes, where, "arms", f"duplicate arm labels {dupes}", "give every arm its own label")

    table = data.get("table", {})
    metrics = table.get("metrics", list(DEFAULT_METRICS)) if isinstance(table, dict) else None
    _need(isinstance(metrics, list) and metrics and all(m in METRICS for m in metrics), where, "table.metrics",
          f"must be a non-empty list of {list(METRICS)}, got {metrics!r}", 'e.g. metrics = ["epsilon", "accuracy"]')

    pretrain = None
    if "pretrain" in data:
        raw = data["pretrain"]
        _need(isinstance(raw, dict), where, "pretrain", "must be a table", "write it as [pretrain]")
        bad = sorted(set(raw) - _PRETRAIN_KEYS)
        _need(not bad, where, f"pretrain.{bad[0] if bad else ''}", "is not a pretrain key",
              f"use {sorted(_PRETRAIN_KEYS)}")
        for k in ("dataset", "backbone", "public"):
            _need(isinstance(raw.get(k), str) and raw[k].strip() != "", where, f"pretrain.{k}", "is missing",
                  "the pretrain step needs dataset, backbone, epochs and public (why its data count as public)")
        epochs = raw.get("epochs")
        _need(isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1, where, "pretrain.epochs",
              f"must be a whole number ≥ 1, got {epochs!r}", "e.g. epochs = 5")
        pretrain = PretrainStep(dataset=raw["dataset"], data_dir=raw.get("data_dir"), backbone=raw["backbone"],
                                image_size=raw.get("image_size"), epochs=epochs, public=raw["public"].strip(),
                                options=dict(raw.get("options", {})))
        try:  # the pretrain step's data set and backbone must be registered too
            RunConfig(dataset=pretrain.dataset, backbone=pretrain.backbone, image_size=pretrain.image_size,
                      epochs=pretrain.epochs, epsilon=None)
        except ConfigError as exc:
            raise ExperimentError(where, f"pretrain.{exc.field}", exc.problem, exc.fix) from None

    needs = data.get("needs", {})
    _need(isinstance(needs, dict) and set(needs) <= {"data", "weights"}, where, "needs",
          "must be a table with 'data' and/or 'weights'", 'write [needs] data = ["chest_xray"]')
    needs_data = needs.get("data", [])
    needs_weights = needs.get("weights", [])
    for k, v in (("needs.data", needs_data), ("needs.weights", needs_weights)):
        _need(isinstance(v, list) and all(isinstance(s, str) and s for s in v), where, k,
              "must be a list of strings", 'e.g. data = ["chest_xray"], weights = ["hub:vgg11.tv_in1k"]')
    for w in needs_weights:
        _need(w == PRETRAIN or w.startswith(("hub:", "bundled:", "default:")) or w.endswith(".safetensors"), where,
              "needs.weights", f"{w!r} is neither 'hub:<timm name>', 'bundled:<backbone>', 'default:<backbone>', "
              "a .safetensors path nor 'pretrain'", 'write e.g. "hub:beit_base_patch16_224.in22k_ft_in22k"')
    _need(pretrain is None or PRETRAIN in needs_weights, where, "needs.weights",
          "the experiment has a [pretrain] step but does not list it", 'add "pretrain" to needs.weights')

    exp = Experiment(name=name, version=version, title=str(data.get("title") or name), description=description.strip(),
                     path=path, base=dict(base), arms=tuple(arms), metrics=tuple(metrics),
                     needs_data=tuple(needs_data), needs_weights=tuple(needs_weights), pretrain=pretrain,
                     notes=str(data.get("notes", "")).strip())
    # every arm must be a valid RunConfig, and everything it uses must be declared in [needs]
    for i, arm in enumerate(exp.arms):
        try:
            cfg_values = {**exp.base, **arm.overrides}
            if cfg_values.get("pretrained") == PRETRAIN and pretrain is None:
                raise ExperimentError(where, f"arm {arm.label!r}: pretrained", "is 'pretrain' but the experiment "
                                      "has no [pretrain] step", "add a [pretrain] table, or use none / hub / a path")
            exp.config(arm, data_root=Path("/data-root"), runs_dir=Path("/runs"))
        except ConfigError as exc:
            fix = exc.fix
            if exc.problem == "is not a run-config field":
                valid = exc.fix.split("valid fields: ", 1)[-1]
                fix = (f"fix its spelling or remove it (if another part of DP Explorer is adding this field, update "
                       f"this checkout); valid fields: {valid}")
            raise ExperimentError(where, f"arm {arm.label!r}: {exc.field}", exc.problem, fix) from None
        pre = cfg_values.get("pretrained", "none")
        if pre == "hub":
            timm = _timm_name(cfg_values.get("backbone", RunConfig().backbone))
            _need(f"hub:{timm}" in needs_weights, where, "needs.weights",
                  f"arm {arm.label!r} uses hub weights {timm} but does not declare them", f'add "hub:{timm}"')
        elif pre in ("bundled", "default"):
            bb = cfg_values.get("backbone", RunConfig().backbone)
            _need(f"{pre}:{bb}" in needs_weights, where, "needs.weights",
                  f"arm {arm.label!r} uses {pre} weights for {bb} but does not declare them", f'add "{pre}:{bb}"')
        elif isinstance(pre, str) and pre.endswith(".safetensors"):
            _need(pre in needs_weights, where, "needs.weights", f"arm {arm.label!r} uses {pre} but does not "
                  "declare it", f'add "{pre}"')
        d = cfg_values.get("data_dir")
        _need(not d or d in needs_data or Path(d).is_absolute(), where, "needs.data",
              f"arm {arm.label!r} reads {d} but does not declare it", f'add "{d}" to needs.data')
    if pretrain is not None and pretrain.data_dir:
        _need(pretrain.data_dir in needs_data or Path(pretrain.data_dir).is_absolute(), where, "needs.data",
              f"the pretrain step reads {pretrain.data_dir} but does not declare it",
              f'add "{pretrain.data_dir}" to needs.data')
    return exp


def load_experiment(name_or_path: str | Path, directory: str | Path | None = None) -> Experiment:
    """Load `experiments/<name>.toml` (or a path to a .toml file) and validate it."""
    p = Path(name_or_path)
    if p.suffix != ".toml":
        p = experiments_dir(directory) / f"{name_or_path}.toml"
    if not p.is_file():
        have = ", ".join(experiment_names(directory)) or "none"
        raise ExperimentError(str(p), "name", f"no experiment {str(name_or_path)!r}",
                              f"use one of: {have} (python -m dpcore experiment --list)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(str(p), "TOML", f"is not valid TOML ({exc})", "fix the syntax at that line") from None
    return parse_experiment(data, p)


def experiment_names(directory: str | Path | None = None) -> list[str]:
    d = experiments_dir(directory)
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def list_experiments(directory: str | Path | None = None) -> list[tuple[str, Experiment | ExperimentError]]:
    """(name, experiment) for every file, or (name, error) for a file that does not validate."""
    out = []
    for name in experiment_names(directory):
        try:
            out.append((name, load_experiment(name, directory)))
        except ExperimentError as exc:
            out.append((name, exc))
    return out


# -- what this machine lacks -----------------------------------------------------------------------
def _hub_online() -> bool:
    from dpcore.training.presets import _hub_online as probe

    return probe()


def _pretrain_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dpcore.training.pretrain") is not None


def check_needs(exp: Experiment, data_root: str | Path | None = None, runs_dir: str | Path | None = None,
                *, online: bool | None = None, arms: Sequence[Arm] | None = None,
                engine: bool | None = None) -> list[str]:
    """What this machine lacks to run `exp` (or just `arms`), in plain words with the fix; [] when ready.

    `online`: whether the Hugging Face Hub can be reached (None: probe it, ≤ 2 s, only when some hub
    weights are not cached). `engine`: whether a pretraining engine is at hand (None: dpcore.training.pretrain).
    """
    from dpcore.environment import _hub_cached

    root = resolve_data_root(data_root)
    arms = list(arms) if arms is not None else list(exp.arms)
    values = [{**exp.base, **a.overrides} for a in arms]
    missing: list[str] = []
    data_needed = [d for d in exp.needs_data if any(v.get("data_dir") == d for v in values)
                   or (exp.pretrain is not None and exp.pretrain.data_dir == d and exp.uses_pretrain(arms))]
    for d in data_needed:
        where = _resolve(d, root)
        if not where.exists():
            missing.append(f"data folder {where} is absent: put the {d} data there, or pass --data-root with the "
                           f"folder that holds {d}/ (now {root}; $DPCORE_SHARED_DATA sets the default)")
        elif where.is_dir() and "ham10000" in {v.get("dataset") for v in values if v.get("data_dir") == d} | (
                {exp.pretrain.dataset} if exp.pretrain and exp.pretrain.data_dir == d else set()):
            if not (where / "HAM10000_metadata.csv").is_file():
                missing.append(f"{where} has no HAM10000_metadata.csv: put the official metadata file there")
    hub = sorted({_timm_name(v.get("backbone", RunConfig().backbone)) for v in values if v.get("pretrained") == "hub"})
    uncached = [t for t in hub if not _hub_cached(t)]
    if uncached and not (_hub_online() if online is None else online):
        for t in uncached:
            missing.append(f"pretrained weights {t} are not in the local Hugging Face cache and the Hub cannot be "
                           "reached: run this experiment once on a machine with internet (they are cached in "
                           "~/.cache/huggingface), or copy that cache here")
    offline = sorted({(v.get("pretrained"), v.get("backbone", RunConfig().backbone)) for v in values
                      if v.get("pretrained") in ("bundled", "default")})
    if offline:
        from models.weight_sources import WeightsError, get_spec, resolve as resolve_weights
    for pre, bb in offline:
        try:
            resolve_weights(get_spec(bb), pre)
        except WeightsError as e:
            missing.append(str(e))
    for v in values:
        pre = v.get("pretrained")
        if isinstance(pre, str) and pre.endswith(".safetensors"):
            where = _resolve(pre, root)
            if not where.is_file() and f"weights file {where}" not in " ".join(missing):
                missing.append(f"weights file {where} does not exist: put the .safetensors file there")
    if exp.pretrain is not None and exp.uses_pretrain(arms):
        cached = runs_dir is not None and exp.weights_path(runs_dir).is_file()
        if not cached and not (_pretrain_available() if engine is None else engine):
            missing.append("the pretrain step needs the pretraining engine (dpcore/training/pretrain.py, `python -m dpcore "
                           "pretrain`), which this checkout does not have yet: update DP Explorer")
    return missing


# -- which runs belong to which experiment ---------------------------------------------------------
_TAG_LOCK = threading.Lock()


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One writer at a time across threads (a lock) and processes (flock on a side file)."""
    with _TAG_LOCK:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / (TAGS_FILE + ".lock"), "w") as fh:
            try:
                import fcntl

                fcntl.flock(fh, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover (Windows)
                pass
            yield


def read_tags(runs_dir: str | Path) -> dict[str, dict[str, Any]]:
    """run_id → {experiment, version, arm, group, tagged_at} from <runs>/experiments.json."""
    path = Path(runs_dir) / TAGS_FILE
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("runs", {}))
    except (json.JSONDecodeError, AttributeError):
        return {}


def tag_run(runs_dir: str | Path, run_id: str, exp: Experiment, arm: Arm,
            also: Sequence[Arm] = ()) -> None:
    """Tag `run_id` as `arm`'s run (and as the run of the arms in `also`, which share its exact config)."""
    root = Path(runs_dir)
    with _locked(root):
        tags = read_tags(root)
        tags[run_id] = {"experiment": exp.name, "version": exp.version, "arm": arm.label, "group": arm.group,
                        "tagged_at": time.time()}
        if also:
            tags[run_id]["also"] = [a.label for a in also]
        tmp = root / (TAGS_FILE + ".tmp")
        tmp.write_text(json.dumps({"format": 1, "runs": tags}, indent=1, sort_keys=True))
        tmp.replace(root / TAGS_FILE)


def experiment_runs(store, exp: Experiment, version: int | None = None) -> dict[str, list]:
    """arm label → its tagged runs still in the store (RunRecords, oldest first), for one version."""
    version = exp.version if version is None else version
    tags = read_tags(store.root)
    by_id = {r.run_id: r for r in store.list_runs()}
    out: dict[str, list] = {}
    for run_id, t in tags.items():
        if t.get("experiment") == exp.name and t.get("version") == version and run_id in by_id:
            for label in [t.get("arm"), *t.get("also", [])]:
                out.setdefault(label, []).append(by_id[run_id])
    for recs in out.values():
        recs.sort(key=lambda r: r.created_at)
    return out


# -- the comparison --------------------------------------------------------------------------------
@dataclass
class Comparison:
    experiment: Experiment
    rows: list[dict[str, Any]]  # one per arm, in file order

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.experiment.metrics

    @property
    def done(self) -> int:
        return sum(r["status"] == "done" for r in self.rows)

    def headline(self) -> dict[str, Any]:
        """A compact, machine-readable summary: every arm's ε spent and test metrics."""
        return {"experiment": self.experiment.name, "version": self.experiment.version,
                "arms": len(self.rows), "done": self.done,
                "rows": {r["arm"]: {k: r.get(k) for k in ("status", "epsilon", "accuracy", "balanced_accuracy",
                                                          "roc_auc", "duration_s", "run_id")} for r in self.rows}}


def _reported_metrics(arm: Arm, rec, store) -> dict[str, Any]:
    """The run's metrics, or (arm.report) those of its raw / EMA weights as the run's card keeps them."""
    if arm.report is None or store is None or rec.status != "done":
        return rec.metrics or {}
    try:
        card = store.card(rec.run_id)
    except DPCoreError:
        return {}
    return card.get(f"metrics_{arm.report}") or {}


def _row(exp: Experiment, arm: Arm, rec, store=None) -> dict[str, Any]:
    target = {"epsilon": RunConfig().epsilon, **exp.base, **arm.overrides}["epsilon"]
    row = {"arm": arm.label, "group": arm.group, "private": arm.private, "target_epsilon": target,
           "status": "not run", "run_id": None, "epsilon": None, "accuracy": None, "balanced_accuracy": None,
           "roc_auc": None, "duration_s": None, "patient_epsilon": None, "patient_delta": None,
           "reference_accuracy": arm.reference.get("accuracy"), "reference_roc_auc": arm.reference.get("roc_auc"),
           "reference_source": arm.reference.get("source")}
    if rec is None:
        return row
    m, p = _reported_metrics(arm, rec, store), rec.privacy or {}
    row.update(status=rec.status, run_id=rec.run_id, target_epsilon=rec.target_epsilon, private=rec.private,
               epsilon=run_review.guaranteed_epsilon(p) if rec.private else None, accuracy=m.get("accuracy"),
               balanced_accuracy=m.get("balanced_accuracy"), roc_auc=m.get("roc_auc"),
               duration_s=rec.duration if rec.status != "queued" else None)
    if rec.private:
        row["patient_epsilon"], row["patient_delta"] = run_review.owner_guarantee(p)
    return row


def comparison(name_or_exp: str | Experiment, store, *, version: int | None = None,
               directory: str | Path | None = None) -> Comparison:
    """The experiment's table from the stored runs: per arm its latest finished run (else its latest run)."""
    exp = name_or_exp if isinstance(name_or_exp, Experiment) else load_experiment(name_or_exp, directory)
    runs = experiment_runs(store, exp, version)
    rows = []
    for arm in exp.arms:
        recs = runs.get(arm.label, [])
        done = [r for r in recs if r.status == "done"]
        rows.append(_row(exp, arm, (done or recs or [None])[-1], store))
    return Comparison(exp, rows)


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key in ("accuracy", "balanced_accuracy", "roc_auc"):
        return f"{v:.4f}"
    if key == "epsilon":
        return f"{v:.4f}"
    if key in ("patient_epsilon", "patient_delta"):
        return "∞" if v == math.inf else f"{v:.3g}"
    if key == "target_epsilon":
        return f"{v:g}"
    if key == "duration_s":
        return f"{v:.0f}"
    return str(v)


def format_table(comp: Comparison) -> str:
    """Plain-text table: arm, status, the experiment's metrics, the seed's reference where given, run id."""
    cols = list(comp.metrics)
    has_ref = any(r["reference_accuracy"] is not None or r["reference_roc_auc"] is not None for r in comp.rows)
    width = max([len("arm")] + [len(r["arm"]) for r in comp.rows])
    head = f"{'arm':<{width}}  {'status':<9} " + " ".join(f"{METRICS[c]:>{max(9, len(METRICS[c]))}}" for c in cols)
    if has_ref:
        head += f" {'reported':>20}"
    lines = [head + "  run id"]
    for r in comp.rows:
        vals = []
        for c in cols:
            v = r.get(c)
            if c == "epsilon" and v is None and not r["private"]:
                v = "nonDP"
            vals.append(f"{_fmt(c, v) if not isinstance(v, str) else v:>{max(9, len(METRICS[c]))}}")
        line = f"{r['arm']:<{width}}  {r['status']:<9} " + " ".join(vals)
        if has_ref:
            ref = []
            if r["reference_accuracy"] is not None:
                ref.append(f"acc {r['reference_accuracy']:.3f}")
            if r["reference_roc_auc"] is not None:
                ref.append(f"AUC {r['reference_roc_auc']:.3f}")
            line += f" {', '.join(ref) or '-':>20}"
        lines.append(line + f"  {r['run_id'] or '-'}")
    return "\n".join(lines)


# -- the pretrain step -----------------------------------------------------------------------------
_PRETRAIN_LOCK = threading.Lock()


def ensure_pretrained(exp: Experiment, runs_dir: str | Path, data_root: str | Path | None = None,
                      listener: Listener | None = None, pretrain_fn: Callable[..., Any] | None = None) -> Path:
    """The pretrain step's weights file: made once (by dpcore.training.pretrain) and then reused from the runs dir."""
    out = exp.weights_path(runs_dir)
    if out is None:
        raise ExperimentError(exp.name, "pretrain", "the experiment has no pretrain step", "add a [pretrain] table")
    with _PRETRAIN_LOCK:
        if out.is_file():
            return out
        step = exp.pretrain
        if pretrain_fn is None:
            if not _pretrain_available():
                raise ExperimentError(exp.name, "pretrain", "this checkout has no pretraining engine "
                                      "(dpcore/training/pretrain.py)", "update DP Explorer, or run the arms that do not "
                                      "use pretrained = 'pretrain' (--only)")
            from dpcore.training import pretrain as engine

            pretrain_fn = engine.pretrain
        root = resolve_data_root(data_root)
        data_dir = str(_resolve(step.data_dir, root)) if step.data_dir else None
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.stem + ".partial.safetensors")
        if listener is not None:
            listener(Event("log", f"pretrain-{exp.name}", message=(
                f"pretraining {step.backbone} on {step.dataset} ({data_dir}) for {step.epochs} epochs, "
                f"non-private (declared public) → {out}")))
        t0 = time.time()
        _call_pretrain(pretrain_fn, exp, dict(dataset=step.dataset, data_dir=data_dir, backbone=step.backbone,
                                              image_size=step.image_size, epochs=step.epochs, out=str(tmp),
                                              **step.options))
        if not tmp.is_file():
            raise ExperimentError(exp.name, "pretrain", f"the pretraining engine wrote no file at {tmp}",
                                  "check `python -m dpcore pretrain` on its own")
        tmp.replace(out)
        # one sidecar beside the final file: the engine's facts (sha256, data, recipe) plus the experiment's
        engine_side = tmp.with_suffix(".json")
        facts: dict[str, Any] = {}
        if engine_side.is_file():
            try:
                facts = json.loads(engine_side.read_text())
            except json.JSONDecodeError:
                facts = {}
            engine_side.unlink()
        facts.update({"weights_file": out.name, "experiment": exp.name, "version": exp.version,
                      "dataset": step.dataset, "data_dir": data_dir, "backbone": step.backbone,
                      "image_size": step.image_size, "epochs": step.epochs, "options": step.options,
                      "public": step.public, "seconds": round(time.time() - t0, 1)})
        out.with_suffix(".json").write_text(json.dumps(facts, indent=2, default=list))
        if listener is not None:
            listener(Event("log", f"pretrain-{exp.name}", message=f"pretraining done in {time.time() - t0:.0f} s"))
        return out


def _call_pretrain(fn: Callable[..., Any], exp: Experiment, kwargs: dict[str, Any]) -> None:
    """Call the engine with the step's settings as keywords (`out` under the name the engine uses for it)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if params and "out" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        alt = next((a for a in ("out_path", "output", "weights_out", "path") if a in params), None)
        if alt is not None:
            kwargs[alt] = kwargs.pop("out")
    try:
        inspect.signature(fn).bind(**kwargs) if params else None
    except TypeError as exc:
        raise ExperimentError(str(exp.path), "pretrain", f"the pretraining engine does not take these settings "
                              f"({exc}; it takes {list(params)})", "use the engine's argument names in [pretrain] "
                              "(options = {...} passes further ones)") from None
    fn(**kwargs)


# -- running ---------------------------------------------------------------------------------------
def _prepare(exp: Experiment, store, data_root, only, rerun: bool, online: bool | None, engine: bool | None = None):
    """The arms to train (done ones skipped unless rerun) and their configs; raises when something is missing."""
    arms = exp.select(only)
    if not rerun:
        have = experiment_runs(store, exp)
        arms = [a for a in arms if not any(r.status == "done" for r in have.get(a.label, []))]
    missing = check_needs(exp, data_root, store.root, online=online, arms=arms, engine=engine) if arms else []
    if missing:
        raise ExperimentError(exp.name, "needs", "this machine lacks:\n  - " + "\n  - ".join(missing),
                              "see each item; `python -m dpcore experiment --list` re-checks")
    return arms


def run_experiment(name_or_exp: str | Experiment, store, *, data_root: str | Path | None = None,
                   only: Sequence[str] | str | None = None, rerun: bool = False, listener: Listener | None = None,
                   cancel: threading.Event | None = None, on_arm: Callable[[str, Any], None] | None = None,
                   train_fn=None, pretrain_fn=None, online: bool | None = None,
                   directory: str | Path | None = None, allow_over_budget: bool = False) -> Comparison:
    """Train the experiment's arms (those without a finished run of this version, unless `rerun`) in turn.

    Every arm is an ordinary stored run, tagged with the experiment's name, version and arm label. A failed
    arm is recorded and the others still run; `cancel` stops the current arm and skips the rest.
    Returns the comparison table read back from the store. An arm that would take an image past a privacy
    budget is refused by the trainer (recorded as failed) unless ``allow_over_budget``.
    """
    from dpcore.training.sweep import run_sweep

    exp = name_or_exp if isinstance(name_or_exp, Experiment) else load_experiment(name_or_exp, directory)
    arms = _prepare(exp, store, data_root, only, rerun, online, engine=True if pretrain_fn else None)
    if arms and exp.uses_pretrain(arms):
        ensure_pretrained(exp, store.root, data_root, listener, pretrain_fn)
    configs = [exp.config(a, data_root, store.root) for a in arms]
    if allow_over_budget:
        configs = [c.replace(allow_over_budget=True) for c in configs]
    for cfg in configs:
        cfg.check_paths()
    run_ids, train_configs, label_of = [], [], {}
    for (arm, cfg), also in _share_runs(arms, configs):
        run_id = store.create_run(cfg, status="queued")
        tag_run(store.root, run_id, exp, arm, also)
        run_ids.append(run_id)
        train_configs.append(cfg)
        label_of[run_id] = arm.label
    run_sweep(train_configs, store, run_ids=run_ids, listener=listener, cancel=cancel, train_fn=train_fn,
              on_point=(lambda p: on_arm(label_of[p.run_id], p)) if on_arm else None)
    return comparison(exp, store)


def _share_runs(arms: Sequence[Arm], configs: Sequence[RunConfig]) -> list[tuple[tuple[Arm, RunConfig], list[Arm]]]:
    """Arms whose run configs are identical share one run (e.g. the raw and EMA reports of one training):
    [((arm that trains, its config), [arms that read the same run])], in arm order."""
    out: list[tuple[tuple[Arm, RunConfig], list[Arm]]] = []
    by_key: dict[str, list[Arm]] = {}
    for arm, cfg in zip(arms, configs):
        key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        if key in by_key:
            by_key[key].append(arm)
        else:
            by_key[key] = []
            out.append(((arm, cfg), by_key[key]))
    return out


class ExperimentLaunch:
    """An experiment launched in the background through a JobManager: one job per arm, queued in order.

    With a pretrain step still to make, a small thread makes it first (after the queue has gone idle)
    and then queues the arms. `run_ids` fill in as arms are queued; the comparison reads the store.
    """

    def __init__(self, exp: Experiment, manager, arms: list[Arm], data_root: Path):
        self.experiment, self.manager, self.arms, self.data_root = exp, manager, arms, data_root
        self.id = f"{exp.name}-v{exp.version}-{int(time.time() * 1000)}"
        self.run_ids: dict[str, str] = {}
        self.status = "starting"  # starting | pretraining | queued | failed | cancelled
        self.error: str | None = None
        self.log: list[str] = []
        self._cancelled = threading.Event()
        self.submitted_at = time.time()

    def _queue_arms(self) -> None:
        store = self.manager.store
        configs = [self.experiment.config(a, self.data_root, store.root) for a in self.arms]
        for cfg in configs:
            cfg.check_paths()
        for (arm, cfg), also in _share_runs(self.arms, configs):
            if self._cancelled.is_set():
                break
            job = self.manager.submit(cfg, label=f"{self.experiment.name} · {arm.label}")
            tag_run(store.root, job.run_id, self.experiment, arm, also)
            for a in (arm, *also):
                self.run_ids[a.label] = job.run_id
        self.status = "cancelled" if self._cancelled.is_set() else "queued"

    def _pretrain_then_queue(self) -> None:
        try:
            self.status = "pretraining"
            while self.manager.current() is not None or self.manager.queued():  # don't share 2 cores with a run
                if self._cancelled.wait(0.5):
                    self.status = "cancelled"
                    return
            ensure_pretrained(self.experiment, self.manager.store.root, self.data_root,
                              listener=lambda ev: self.log.append(ev.message or ""))
            if self._cancelled.is_set():
                self.status = "cancelled"
                return
            self._queue_arms()
        except Exception as exc:  # shown on the page
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"

    def jobs(self) -> list:
        return [j for j in (self.manager.get(r) for r in self.run_ids.values()) if j is not None]

    @property
    def finished(self) -> bool:
        if self.status in ("failed", "cancelled"):
            return True
        if self.status != "queued":
            return False
        jobs = self.jobs()
        return len(jobs) == len(self.arms) and all(j.finished for j in jobs)

    @property
    def progress(self) -> float:
        return sum(j.finished for j in self.jobs()) / max(len(self.arms), 1)

    def cancel(self) -> None:
        self._cancelled.set()
        for run_id in self.run_ids.values():
            self.manager.cancel(run_id)


_LAUNCHES: dict[str, ExperimentLaunch] = {}


def launch_experiment(name_or_exp: str | Experiment, manager, *, data_root: str | Path | None = None,
                      only: Sequence[str] | str | None = None, rerun: bool = False, online: bool | None = None,
                      directory: str | Path | None = None) -> ExperimentLaunch:
    """Queue the experiment's arms on `manager` (a dpcore.training.jobs.JobManager); returns at once."""
    exp = name_or_exp if isinstance(name_or_exp, Experiment) else load_experiment(name_or_exp, directory)
    arms = _prepare(exp, manager.store, data_root, only, rerun, online)
    launch = ExperimentLaunch(exp, manager, arms, resolve_data_root(data_root))
    _LAUNCHES[launch.id] = launch
    if not arms:
        launch.status = "queued"
        launch.log.append("every arm already has a finished run of this version (rerun to train them again)")
    elif exp.uses_pretrain(arms) and not exp.weights_path(manager.store.root).is_file():
        threading.Thread(target=launch._pretrain_then_queue, name=f"pretrain-{exp.name}", daemon=True).start()
    else:
        launch._queue_arms()
    return launch


def get_launch(launch_id: str | None) -> ExperimentLaunch | None:
    return _LAUNCHES.get(launch_id) if launch_id else None
