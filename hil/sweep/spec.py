"""A sweep spec: which trainer, what to optimise, the search space, the budget (TOML).

::

    [sweep]
    trainer = "classifier"      # classifier | vae
    objective = "val_acc"       # a metric of the trainer's result (val_acc: needs data.validation)
    direction = "maximize"      # default: the metric's natural direction
    n_trials = 20
    batch = 4                   # trials asked together per round (see below)
    seed = 0
    sampler = "tpe"             # tpe | random
    startup_trials = 10         # TPE: random trials before its model takes over
    threads = 1                 # torch CPU threads per trial (0: torch's default)
    config = "train.toml"       # optional trainer TOML, relative to this file
    start_at_base = false       # true: trial 0 is the base config itself (counts in n_trials)

    [base]                      # trainer config keys, on top of `config`
    train.epochs = 5
    data.validation = 500       # training images held out to score trials on (not the test set)

    [space."train.lr"]          # one table per tuned key (dotted, as in --set)
    type = "float"              # float | int | categorical
    low = 0.01
    high = 0.5
    log = true                  # (float, int) sample on a log scale; `step` for a grid

    [space."ep.mode"]
    type = "categorical"
    choices = ["centered", "positive"]

Every trial's config is the base with the trial's values set; `device` is the board the trial
runs on, so it cannot be tuned. A number for a list setting (``train.lr``, one learning rate
per tile with the last repeating) sets the whole list to that one value; ``[space."model.sizes[1]"]``
tunes one element of a list (here the width of the first hidden layer).

`batch` makes a sweep's outcome independent of where it runs: trials are asked from the
sampler `batch` at a time and told in trial-number order once the whole round has finished,
so the sampler sees the same history whether the round ran on one board in turn or on
`batch` boards at once. Every error is a `SpecError` whose message starts with the key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import shlex
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hil.config import ConfigError, apply_dict, load_into, past_bounds, toml_error
from hil.sweep.trainers import TRAINERS, Direction, Trainer

ParamKind = Literal["float", "int", "categorical"]
Scalar = str | int | float | bool | None
UNTUNABLE = frozenset({"device", "name", "out"})  # set per trial by the sweep itself


class SpecError(ValueError):
    """An invalid sweep spec; the message names the offending key first."""


@dataclass(frozen=True)
class Param:
    """One dimension of the search space."""

    key: str  # dotted config key, e.g. "train.lr"
    kind: ParamKind
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Scalar, ...] = ()

    def suggest(self, trial: Any) -> Scalar:
        """Draw this parameter for an optuna trial (the optuna parameter name is the key)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.kind}
        if self.kind == "categorical":
            d["choices"] = list(self.choices)
        else:
            d.update(low=self.low, high=self.high, log=self.log)
            if self.step is not None:
                d["step"] = self.step
        return d


@dataclass(frozen=True)
class SweepSpec:
    name: str
    trainer: str
    objective: str
    direction: Direction
    n_trials: int
    base: dict[str, Any]  # the trainer's full config, resolved (config file, [base])
    space: tuple[Param, ...]
    batch: int = 4
    seed: int = 0
    sampler: Literal["tpe", "random"] = "tpe"
    startup_trials: int = 10
    threads: int = 1
    # trial 0 runs the base config's own values of the tuned keys (optuna's enqueue_trial), so
    # the sweep's best is never worse, on its objective, than not sweeping at all
    start_at_base: bool = False
    source: str = ""  # the spec file, for messages

    @property
    def trainer_def(self) -> Trainer:
        return TRAINERS[self.trainer]

    def config_for(self, params: dict[str, Any], device: str | None = None, name: str = "") -> Any:
        """The trainer config of a trial: the base, the trial's values, its board and run name."""
        cfg = apply_dict(self.trainer_def.make_config(), copy.deepcopy(self.base))
        for key, value in params.items():
            _set(cfg, key, value)
        if device is not None:
            cfg.device = device
        if name:
            cfg.name = name
        return cfg

    def base_params(self) -> dict[str, Scalar]:
        """The base config's values of the tuned keys (the first element of a list setting
        tuned as one number), each checked against its parameter's range."""
        cfg = apply_dict(self.trainer_def.make_config(), copy.deepcopy(self.base))
        out: dict[str, Scalar] = {}
        for p in self.space:
            path, index = _split_index(p.key)
            value = functools.reduce(getattr, path.split("."), cfg)
            if isinstance(value, list):
                value = value[index or 0]
            if p.kind == "categorical":
                ok = value in p.choices
            else:
                ok = isinstance(value, int | float) and p.low <= value <= p.high  # type: ignore[operator]
            if not ok:
                where = f"one of {list(p.choices)}" if p.kind == "categorical" else f"[{p.low}, {p.high}]"
                raise SpecError(
                    f"sweep.start_at_base: the base {p.key} = {value!r} is outside space.{p.key} ({where}); "
                    "widen the space or set start_at_base = false"
                )
            out[p.key] = value
        return out

    def make_sampler(self) -> Any:
        import optuna

        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=self.seed)
        return optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.startup_trials)

    def to_dict(self) -> dict[str, Any]:
        """Everything that decides the sweep's trials (what a continued sweep must match)."""
        d = dataclasses.asdict(self)
        d["space"] = {p.key: p.to_dict() for p in self.space}
        d.pop("source")
        if not self.start_at_base:
            d.pop("start_at_base")  # so that sweeps recorded before the key still match
        return d


# ------------------------------------------------------------------------------------ loading
_SWEEP_KEYS = {
    "name", "trainer", "objective", "direction", "n_trials", "batch", "seed", "sampler",
    "startup_trials", "threads", "config", "start_at_base",
}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_PARAM_KEYS = {"type", "low", "high", "log", "step", "choices"}


def load_spec(path: str | Path, n_trials: int | None = None) -> SweepSpec:
    """Read and check the sweep spec at `path`; `n_trials` overrides ``sweep.n_trials``."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise SpecError(f"{p}: no such sweep file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{p}: {toml_error(exc)}") from None
    return parse_spec(data, base_dir=p.parent, default_name=p.stem, source=str(p), n_trials=n_trials)


def parse_spec(
    data: dict[str, Any],
    *,
    base_dir: Path = Path("."),
    default_name: str = "sweep",
    source: str = "",
    n_trials: int | None = None,
) -> SweepSpec:
    """Check a parsed sweep spec (the TOML's tables) and resolve its base config."""
    for key in data:
        if key not in ("sweep", "base", "space"):
            raise SpecError(f"{key}: unknown table; a sweep file has [sweep], [base] and [space.<key>]")
    sw = _table(data, "sweep")
    for key in sw:
        if key not in _SWEEP_KEYS:
            raise SpecError(f"sweep.{key}: unknown key; known: {', '.join(sorted(_SWEEP_KEYS))}")
    trainer_name = _get(sw, "trainer", str, "classifier")
    if trainer_name not in TRAINERS:
        raise SpecError(f"sweep.trainer: {trainer_name!r} is not one of {', '.join(TRAINERS)}")
    trainer = TRAINERS[trainer_name]
    objective = _get(sw, "objective", str, next(iter(trainer.metrics)))
    if objective not in trainer.metrics:
        raise SpecError(
            f"sweep.objective: {objective!r} is not a metric of the {trainer_name} trainer; "
            f"known: {', '.join(trainer.metrics)}"
        )
    direction = _get(sw, "direction", str, trainer.metrics[objective])
    if direction not in ("maximize", "minimize"):
        raise SpecError(f"sweep.direction: {direction!r} is not maximize or minimize")
    sampler = _get(sw, "sampler", str, "tpe")
    if sampler not in ("tpe", "random"):
        raise SpecError(f"sweep.sampler: {sampler!r} is not tpe or random")
    defaults = {"n_trials": 10, "batch": 4, "seed": 0, "startup_trials": 10, "threads": 1}
    ints = {k: _get(sw, k, int, d) for k, d in defaults.items()}
    if n_trials is not None:
        ints["n_trials"] = n_trials
    # declared bounds on the work a spec can ask for
    bounds = {
        "n_trials": (1, 100_000),
        "batch": (1, 1024),
        "startup_trials": (0, 100_000),
        "threads": (0, 1024),
    }
    for key, (minimum, most) in bounds.items():
        if not minimum <= ints[key] <= most:
            raise SpecError(f"sweep.{key}: must be in [{minimum}, {most}], got {ints[key]}")

    cfg = trainer.make_config()
    if "config" in sw:
        try:
            load_into(cfg, base_dir / _get(sw, "config", str, ""))
        except ConfigError as exc:
            raise SpecError(f"sweep.config: {exc}") from None
    try:
        apply_dict(cfg, _table(data, "base"))
        trainer.validate(cfg)
    except ConfigError as exc:
        raise SpecError(f"base.{exc}" if _names_a_key(str(exc)) else f"base: {exc}") from None
    need = trainer.requires.get(objective)
    fix = None if need is None else need(cfg)
    if fix is not None:
        raise SpecError(f"sweep.objective: {objective!r} is not measured with this base config: {fix}")
    entries = _space_entries(_table(data, "space"))
    _check_distinct([key for key, _ in entries])
    space = tuple(_param(key, entry, cfg, trainer) for key, entry in entries)
    if not space:
        raise SpecError('space: empty; add at least one [space."<config key>"] table')
    start_at_base = sw.get("start_at_base", False)
    if not isinstance(start_at_base, bool):
        raise SpecError(f"sweep.start_at_base: expected true or false, got {start_at_base!r}")
    name = _get(sw, "name", str, re.sub(r"[^A-Za-z0-9_.-]+", "-", default_name))
    if not _NAME.match(name):
        raise SpecError(f"sweep.name: {name!r} must be letters, digits, '_', '.', '-' (it names folders)")
    spec = SweepSpec(
        name=name,
        trainer=trainer_name,
        objective=objective,
        direction=direction,  # type: ignore[arg-type]
        base=cfg.to_dict(),
        space=space,
        sampler=sampler,  # type: ignore[arg-type]
        source=source,
        start_at_base=start_at_base,
        **ints,
    )
    if start_at_base:
        spec.base_params()  # out-of-range base values are refused now, not at trial 0
    return spec


def _names_a_key(message: str) -> bool:
    head = message.split(":", 1)[0]
    return ":" in message and " " not in head


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise SpecError(f"{key}: must be a table ([{key}])")
    return value


def _get(table: dict[str, Any], key: str, tp: type, default: Any) -> Any:
    value = table.get(key, default)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise SpecError(f"sweep.{key}: expected an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise SpecError(f"sweep.{key}: expected a string, got {value!r}")
    return value


def _check_distinct(keys: list[str]) -> None:
    """Refuse two tables that set one setting: the same key twice (``[space."train.lr"]`` and
    ``[space.train.lr]``), or a list setting and one of its elements (``train.lr`` and
    ``train.lr[0]``): one of them would be drawn for nothing, and reported as if it counted."""
    seen: list[str] = []
    for key in keys:
        path, index = _split_index(key)
        for other in seen:
            other_path, other_index = _split_index(other)
            if other == key:
                raise SpecError(
                    f'space.{key}: given twice (as [space."{key}"] and [space.{key}], which mean the same '
                    "key); keep one of the two tables"
                )
            if other_path == path and (index is None or other_index is None):
                raise SpecError(f"space.{key}: sets what space.{other} sets; keep one of the two tables")
        seen.append(key)


def _space_entries(space: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Flatten ``[space."train.lr"]`` and ``[space.train.lr]`` alike: a leaf has a `type`."""
    out: list[tuple[str, dict[str, Any]]] = []
    for key, value in space.items():
        full = f"{prefix}{key}"
        if not isinstance(value, dict):
            raise SpecError(f"space.{full}: must be a table with type = float | int | categorical")
        if "type" in value:
            out.append((full, value))
        else:
            out += _space_entries(value, f"{full}.")
    return out


# ----------------------------------------------------------------------------- search space
_INDEXED = re.compile(r"^(?P<key>.+)\[(?P<index>\d+)\]$")


def field_type(cfg: Any, key: str) -> Any:
    """The annotation of the dotted config key `key` (of one element for ``key[i]``, an
    element of a list setting); SpecError naming the key when there is none."""
    path, index = _split_index(key)
    obj = cfg
    parts = path.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise SpecError(
                f"space.{key}: {path!r} is not a config key ({where} has: {', '.join(sorted(names))})"
            )
        tp = typing.get_type_hints(type(obj))[part]
        value = getattr(obj, part)
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(value):
                raise SpecError(f"space.{key}: {'.'.join(parts[: i + 1])!r} is a setting, not a section")
            obj = value
        elif dataclasses.is_dataclass(value):
            raise SpecError(f"space.{key}: {path!r} is a section; tune one of its keys, e.g. {path}.<name>")
    if index is None:
        return tp
    if typing.get_origin(tp) is not list:
        raise SpecError(f"space.{key}: {path!r} is not a list, so it has no element [{index}]")
    if index >= len(value):
        raise SpecError(f"space.{key}: the base {path} = {value} has no element [{index}]")
    return typing.get_args(tp)[0]


def _split_index(key: str) -> tuple[str, int | None]:
    m = _INDEXED.match(key)
    return (m["key"], int(m["index"])) if m else (key, None)


def _set(cfg: Any, key: str, value: Any) -> None:
    """Set the dotted key: ``key[i]`` sets one element of a list setting, and a scalar for a
    whole list setting becomes a one-element list."""
    tp = field_type(cfg, key)
    path, index = _split_index(key)
    parts = path.split(".")
    if index is not None:
        current = functools.reduce(getattr, parts, cfg)
        value = [value if k == index else v for k, v in enumerate(current)]
    elif typing.get_origin(tp) is list and not isinstance(value, list):
        value = [value]
    nested: dict[str, Any] = {}
    node = nested
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    apply_dict(cfg, nested)


def _number(key: str, entry: dict[str, Any], name: str, integer: bool) -> int | float | None:
    value = entry.get(name)
    if value is None:
        return None
    wrong = isinstance(value, bool) or not isinstance(value, int if integer else int | float)
    if wrong:
        kind = "an integer" if integer else "a number"
        raise SpecError(f"space.{key}.{name}: expected {kind}, got {value!r}")
    if not math.isfinite(value):
        raise SpecError(f"space.{key}.{name}: must be finite, got {value!r}")
    return value


def _param(key: str, entry: dict[str, Any], cfg: Any, trainer: Trainer) -> Param:
    for k in entry:
        if k not in _PARAM_KEYS:
            raise SpecError(f"space.{key}.{k}: unknown key; known: {', '.join(sorted(_PARAM_KEYS))}")
    if key.split(".")[0].split("[")[0] in UNTUNABLE:
        raise SpecError(f"space.{key}: set by the sweep for each trial (the board it runs on), not tunable")
    tp = field_type(cfg, key)
    kind = entry["type"]
    if kind not in ("float", "int", "categorical"):
        raise SpecError(f"space.{key}.type: {kind!r} is not float, int or categorical")
    base_tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
    if kind == "categorical":
        for k in ("low", "high", "log", "step"):
            if k in entry:
                raise SpecError(f"space.{key}.{k}: not used by a categorical parameter (give choices)")
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpecError(f"space.{key}.choices: need a non-empty list of values")
        for c in choices:
            if not isinstance(c, str | int | float | bool):
                raise SpecError(f"space.{key}.choices: {c!r} is not a string, number or boolean")
        param = Param(key, "categorical", choices=tuple(choices))
        probes: list[Any] = list(choices)
    else:
        if "choices" in entry:
            raise SpecError(f'space.{key}.choices: only for type = "categorical"')
        integer = kind == "int"
        if base_tp is int and not integer:
            raise SpecError(f'space.{key}.type: {key!r} is an integer setting; use type = "int"')
        if base_tp not in (float, int):
            raise SpecError(f'space.{key}.type: {key!r} is not a number setting; use type = "categorical"')
        low, high = _number(key, entry, "low", integer), _number(key, entry, "high", integer)
        if low is None or high is None:
            raise SpecError(f"space.{key}: a {kind} parameter needs low and high")
        if low >= high:
            raise SpecError(f"space.{key}: low ({low}) must be below high ({high})")
        log = entry.get("log", False)
        if not isinstance(log, bool):
            raise SpecError(f"space.{key}.log: expected true or false, got {log!r}")
        if log and low <= 0:
            raise SpecError(f"space.{key}.low: a log scale needs low > 0, got {low}")
        step = _number(key, entry, "step", integer)
        if step is not None and step <= 0:
            raise SpecError(f"space.{key}.step: must be > 0, got {step}")
        if step is not None and log:
            raise SpecError(f"space.{key}.step: cannot be combined with log = true; drop one of the two")
        param = Param(key, kind, low=low, high=high, log=log, step=step)
        probes = [low, high]
    for value in probes:  # each end of the range (each choice) must make a valid config
        probe = copy.deepcopy(cfg)
        try:
            _set(probe, key, value)
            trainer.validate(probe)
        except ConfigError as exc:
            raise SpecError(f"space.{key}: the value {value!r} gives an invalid config: {exc}") from None
    return param


def check_within_boards(spec: SweepSpec, limits: Mapping[str, Any], device: str | None = None) -> None:
    """Refuse a sweep, before its first trial, whose base config or an end of its search space
    (each choice of a categorical) asks for more than a board declares: `limits` maps each board
    URI the trials open to its `drivers.Limits`; the trainer's `bounds` name the settings a
    board bounds (ep.beta by max_beta, model.gain by max_gain, ...). Every trial past a bound
    was refused as its board opened, one failed trial after another; the error names the space
    key, the end, the bound and the value to set."""
    bounds_of = spec.trainer_def.bounds

    def past(cfg: Any) -> list[tuple[str, float, str, float, str]]:
        """Each setting of `cfg` past a bound, with the first board (in `limits`' order) past
        whose bound it is, in the settings' order."""
        within = bounds_of(cfg)
        first: dict[str, tuple[str, float, str, float, str]] = {}
        for uri, lim in limits.items():
            for key, value, bound, most in past_bounds(within, lim):
                first.setdefault(key, (key, value, bound, most, uri))
        return [first[key] for key, _, _ in within if key in first]

    for key, value, bound, most, uri in past(spec.config_for({}, device)):
        raise SpecError(
            f"base.{key}: {value:g} is past the board's declared {bound} {most:g} ({uri}); set {key} "
            f"to at most {most:g} (`hil info {shlex.quote(uri)}` shows what the board declares)"
        )
    for p in spec.space:
        ends = list(p.choices) if p.kind == "categorical" else [p.low, p.high]
        path = _split_index(p.key)[0]
        for end in ends:
            for key, value, bound, most, uri in past(spec.config_for({p.key: end}, device)):
                if path not in key.split(" x "):
                    continue
                if key != path:  # a product of settings (the ce loss's ep.beta x ep.tau)
                    raise SpecError(
                        f"space.{p.key}: the value {end!r} makes {key} = {value:g}, past the board's "
                        f"declared {bound} {most:g} ({uri}), so trials there would be refused; narrow "
                        f"the range until {key} is at most {most:g} (`hil info {shlex.quote(uri)}` "
                        "shows what the board declares)"
                    )
                if p.kind == "categorical":
                    what, fix = f"the choice {end!r}", f"drop the choices above {most:g}"
                elif p.low is not None and abs(p.low) > most:
                    what = f"the whole range [{p.low}, {p.high}]"
                    fix = f"set low and high to at most {most:g}"
                else:
                    what, fix = f"high = {p.high}", f"set high to at most {most:g}"
                raise SpecError(
                    f"space.{p.key}: {what} is past the board's declared {bound} {most:g} ({uri}), so "
                    f"every trial there would be refused; {fix} (`hil info {shlex.quote(uri)}` shows "
                    "what the board declares)"
                )


__all__ = ["Param", "SpecError", "SweepSpec", "check_within_boards", "field_type", "load_spec", "parse_spec"]
