"""Run configurations: dataclasses loaded from TOML, with ``key=value`` overrides.

A config file has one table per section (``[data]``, ``[model]``, ``[ep]``, ``[train]``)
plus top-level keys (``device``, ``name``). Overrides use dotted keys, values in TOML
syntax (a bare word is taken as a string)::

    hil train classifier --config run.toml --set train.epochs=5 --set model.sizes=[64,128,10]

Unknown keys and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from drivers.activation import Activation
from drivers.errors import ConfigurationError

T = TypeVar("T")


MAX_SHIFT = 8  # pixels: train.shift, the random translations of training images (hil.augment)
MAX_INIT_SCALE = 100.0  # initial weights' scale (N(0, scale^2 / fan_in)): O(1) in use; w_max clips past it
MAX_POOL = 8  # a conv layer's pooling window (`drivers.conv`: pool must be <= 8)
MAX_DEVICES = 1024  # board URIs of one run (`devices`): one per EB block


# ep.tau, the ce loss's logit scale, as `hil gradcheck --tau` bounds it: the injected error
# current's peak is beta * tau (docs/neuron.md), 1e3 at the largest ep.beta of 1
MAX_TAU = 1e3
MAX_EPOCHS = 100_000  # declared bounds on the work one run config can ask for
MAX_BATCH = 65_536  # samples per batch (past the board's max_batch, a settle goes as several requests)
# steps of one settle phase: what the emulator's boards allow (PeripheryModel.max_settle_steps);
# a host-iterated settle (an mvm-only board) is one mvm round trip per step, with no board limit
MAX_SETTLE_STEPS = 100_000


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist5k | mnist | fashion-mnist | cifar10
    root: str = ""  # folder holding the files of the non-built-in data sets
    limit_train: int = 0  # use only the first N training images (0: all)
    limit_test: int = 0
    # classifier: hold out this many training images (stratified, the same split in every run:
    # hil.data.hold_out) and report their accuracy (val_acc) each epoch; a sweep tunes on it with
    # sweep.objective = "val_acc" and never sees the test images (0: no validation split)
    validation: int = 0


@dataclass
class ModelConfig:
    kind: Literal["dhn", "ffebm"] = "dhn"
    # dhn: the layer sizes of a layered DHN (first: input, last: classes).
    # ffebm: the sizes of one DHN that is split into EB blocks of `block_layers` free layers;
    # the last layer of a block is copied (through `between`) onto the clamped input layer
    # of the next block.
    sizes: list[int] = field(default_factory=lambda: [64, 256, 10])
    block_layers: int = 2
    # digital part between EB blocks: identity, linear (Linear + Clamp01; fully connected
    # blocks) or bn (batch-norm of the map + Clamp01; conv blocks)
    between: Literal["identity", "linear", "bn"] = "identity"
    # ffebm on images with conv EB blocks (issue 18), when `channels` is set: one conv DHN of
    # these maps (kernel x kernel, stride 1, padding; layer k pooled by pools[k], default
    # 2 each) split into blocks of `block_layers` conv layers; `sizes` is then not used
    channels: list[int] = field(default_factory=list)
    pools: list[int] = field(default_factory=list)
    # the EB blocks' pooling: "max" (the paper's) or "avg" (the window's mean: smooth, so the
    # drive has no winners that switch between settle steps; the digital front max-pools)
    pool_mode: Literal["max", "avg"] = "max"
    kernel: int = 3
    padding: int = 1
    front: int = 0  # channels of a digital conv + max-pool + batch-norm before the first block
    head: Literal["eb", "digital"] = "eb"  # the classes layer: a tile of the last block, or digital
    gain: float = 1.0  # activation slope: rho(u) = clamp(gain u, 0, 1) for the hard sigmoid
    # the node circuits' curve (drivers.activation, docs/neuron.md): hard_sigmoid, logistic,
    # soft_sigmoid[:corner width], or auto: per model kind, `AUTO_ACTIVATION`
    activation: str = "auto"
    w_max: float = 1.0  # weight of a fully-on conductance pair
    init: Literal["gaussian", "goe"] = "gaussian"
    init_scale: float = 0.6
    # biases at the start: zero (about half the units on the hard sigmoid's lower kink) or mid
    # (each unit's drive in the middle of the linear range for neighbours at 1/2,
    # hil.init.centre_biases: few on a kink, EP's gradient exact at the start). zero stays the
    # default: with mid every unit is active, and the default SGD rates kill the outputs; see
    # docs/neuron.md
    init_bias: Literal["zero", "mid"] = "zero"


# the node curve that model.activation = "auto" gives per model kind (docs/neuron.md, issue 20):
# the soft sigmoid (corner width 0.1) for the layered DHN classifier, which trains with it as well
# as with the hard sigmoid to within seed noise (digits, seeds 0-2: 97.87 against 97.59 % on ideal,
# 96.30 against 96.48 % on rram) while EP's gradient bias at beta 0.01 falls from 26 % to 0.15 % at
# worst (the logistic's, 0.06 %, is smaller, but it trained to 96.11 % on rram); a run takes about
# twice the hard sigmoid's time. The hard sigmoid for ff-EBMs, whose blocks were built and measured
# with it (the conv example did not learn with the logistic, and reached 94.9 % with the soft
# sigmoid against 97.6 %, seed 0).
AUTO_ACTIVATION: dict[str, str] = {"dhn": "soft_sigmoid:0.1", "ffebm": "hard_sigmoid"}


def model_activation(m: ModelConfig) -> str:
    """The node curve of `m`: `m.activation`, or for ``auto`` the model kind's (`AUTO_ACTIVATION`)."""
    return AUTO_ACTIVATION[m.kind] if m.activation == "auto" else m.activation


@dataclass
class EPConfig:
    beta: float = 0.2
    mode: Literal["centered", "positive", "negative", "random"] = "centered"
    loss: Literal["mse", "ce"] = "ce"  # mse: target nudge; ce: softmax(tau s_out) cross-entropy
    tau: float = 6.0  # logit scale of the ce loss
    free_steps: int = 100  # T1: settle budget of the free phase
    nudge_steps: int = 100  # T2: settle budget of each nudged phase
    tol: float = 1e-3  # stop a settle when max |s_t - s_{t-1}| <= tol (0: run the full budget)
    # the nudged phases run their whole budget, whatever tol (the free phase still stops at it):
    # EP reads the small difference of the nudged states, which a stopping rule can swamp
    nudge_fixed: bool = False
    dt: float = 0.5  # integration step of the settle (1: plain fixed-point iteration)
    settle_mode: Literal["analog", "mvm"] = "analog"
    # where settles run: board (the board relaxes), host (the host iterates the fixed point
    # through the board's mvm, for boards that only multiply) or auto (board if it can settle)
    settle: Literal["auto", "board", "host"] = "auto"
    # how weight updates reach the devices (`hil.programming.schemes`): ideal | verify |
    # pulsed | mixed
    programming: Literal["ideal", "verify", "pulsed", "mixed"] = "ideal"
    refresh_every: int = 0  # refresh every N updates of a tile (0: never)
    # how a refresh restores the weights: tune (pulse the pairs back in place), verify
    # (write-verify re-write) or auto (tune where the device can pulse)
    refresh_mode: Literal["auto", "tune", "verify"] = "auto"
    # centered EP with the CE error current: both nudged phases as one settle over the doubled
    # batch (EBBlock.joint_phases; one Device call instead of two, equal in distribution)
    joint_phases: bool = True
    # where a free settle starts: "zero", or "forward" (the states of one feedforward sweep
    # through the device's weights, `EBBlock.forward_start`)
    free_start: Literal["zero", "forward"] = "zero"
    # how a settle the host iterates (settle = "host") updates the groups: "synchronous" (all
    # from the same states) or "alternating" (a layered network's even and odd layers in turn,
    # each from the other half's new states; with dt = 1, 3.5 to 3.8 times fewer steps to the
    # fixed point of a trained 6-layer block: docs/bringup.md)
    host_update: Literal["synchronous", "alternating"] = "synchronous"


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: list[float] = field(default_factory=lambda: [0.1, 0.05])  # per tile (last value repeats)
    lr_digital: float = 0.05  # digital (feedforward) parts of an ff-EBM (Adam: ~1e-3)
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: Literal["cosine", "none"] = "cosine"
    # epochs over which every learning rate rises linearly from 1/(warmup steps) of its
    # value to its value, step by step, on top of the schedule (0: off; fractions allowed)
    warmup: float = 0.0
    seed: int = 0
    # augmentation: move each training image by up to `shift` pixels along each axis, drawn
    # per image and step (hil.augment); 0 = off
    shift: int = 0


@dataclass
class LogConfig:
    """How the run log (`hil.runlog.RunLog`) of a training run is written: a resume snapshot
    at the end of an epoch once `snapshot_every_s` seconds have passed since the last one
    (0: every epoch; the last epoch always has one), the flush timer, and how many snapshots
    are kept (0: all). A snapshot flushes every table: about 47 file writes for `hil train
    vae`, which at every epoch made 8 % of the main job (docs/runlog.md)."""

    # a snapshot costs about 65 ms here; a crash loses at most this long plus one epoch, and on
    # a real board, whose epochs take longer, every epoch still gets one
    snapshot_every_s: float = 10.0
    # rows written after the last snapshot are dropped on resume anyway, so the flush timer only
    # bounds what a post-mortem of a killed run can see; a flush of every table costs 50-100 ms
    flush_every_s: float = 30.0
    keep_snapshots: int = 3


def check_data(d: DataConfig) -> None:
    """The data section's counts: a limit of N images keeps the first N (0: all). A negative
    one was taken as a Python slice's end, ``[:-N]``: every image but the last N, with no word."""
    for key, value in (("data.limit_train", d.limit_train), ("data.limit_test", d.limit_test)):
        if value < 0:
            raise ConfigError(f"{key}: use only the first N images, N >= 0 (0: all), got {value}")


def check_log(log: LogConfig) -> None:
    if not (log.snapshot_every_s >= 0 and log.flush_every_s >= 0 and log.keep_snapshots >= 0):
        raise ConfigError(
            f"log: snapshot_every_s and flush_every_s must be >= 0 seconds and keep_snapshots >= 0, "
            f"got {log.snapshot_every_s}, {log.flush_every_s} and {log.keep_snapshots}"
        )


@dataclass
class RunConfig:
    name: str = "classifier"
    device: str = "emulator://?preset=ideal&seed=0"  # the board's URI
    # ff-EBM: one board URI per EB block (docs/multiboard.md); blocks naming the same URI share
    # that board. Empty: `device` for block 0 and, on the emulator, seed + k for block k.
    devices: list[str] = field(default_factory=list)
    # torch device of the host stack and of an in-process emulator board (`hil.compute`):
    # cpu | cuda | cuda:N. Not `device`, which is the board's URI above.
    compute: str = "cpu"
    calibration: str = ""  # calibration record (hil calibrate URI --out cal.zarr) applied to the board
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ep: EPConfig = field(default_factory=EPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------- checking
def _type_name(tp: object) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _list_example(value: object, item: object) -> str:
    """`value`, given where a list of `item` belongs, as that list in TOML: a number in
    brackets, and a text's comma- or space-separated words as the list's items (``64,32,10`` is
    ``[64,32,10]`` for a list of int, not ``['64,32,10']``)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"[{value!r}]"
    if not isinstance(value, str):
        return "[...]"
    words = [w for w in re.split(r"[,\s]+", value.strip()) if w]
    if item is str:
        return "[" + ",".join(repr(w) for w in words) + "]"
    return "[" + ",".join(words) + "]"


def _coerce(key: str, value: object, tp: object) -> object:
    """Check `value` against the annotation `tp` (int -> float is allowed)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if float in args and isinstance(value, float) and not math.isfinite(value):
            return _coerce(key, value, float)  # its own message, not "is not a float or None"
        for a in args:
            try:
                return _coerce(key, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {' or '.join(_type_name(a) for a in args)}")
    if origin is list:
        if not isinstance(value, list):
            example = _list_example(value, args[0])
            raise ConfigError(
                f"{key}: expected a list of {_type_name(args[0])}, got {value!r}; write it in brackets, "
                f"e.g. {key}={example}"
            )
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected nothing, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every `<= 0` check; no setting means infinity
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


# keys of earlier versions, with what to write instead
REMOVED_KEYS = {
    "ep.verify": 'write ep.programming = "verify" (write-verify every update) instead of ep.verify = true',
}


def _apply(obj: object, data: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            if full in REMOVED_KEYS:
                raise ConfigError(f"config key {full!r} was removed: {REMOVED_KEYS[full]}")
            raise ConfigError(f"unknown config key {full!r}; known here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: is a section; give keys like {full}.<name>=...")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def toml_error(exc: tomllib.TOMLDecodeError) -> str:
    """A TOML parse error, with what it means where tomllib's words do not say it (a key or
    table given twice reads "Cannot overwrite a value (at line 5, column 13)")."""
    text = str(exc)
    if text.startswith("Cannot overwrite a value") or "twice" in text:
        return f"{text}: a key or table given twice (the line named is the second); keep one"
    return text


def parse_value(text: str) -> object:
    """A TOML value (``3``, ``0.1``, ``true``, ``[1, 2]``, ``"x"``); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=5)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), parse_value(text.strip())


def check_repeated_overrides(overrides: list[str] | tuple[str, ...]) -> None:
    """Refuse a key that the ``key=value`` overrides give more than once, naming it and every
    value, as a device URI's repeated query key is refused (`drivers.uri`): ``--set
    train.epochs=5 --set train.epochs=50`` (a copy-paste, a recipe with an edit appended) would
    otherwise run with the last without a word. A key given once by its name and once inside
    its table (``--set ep.beta=0.2 --set 'ep={beta=0.3}'``) is refused alike, naming both. For
    what a person typed (the commands' --set); `load_into` itself lets a later override win,
    for callers that append to defaults, and a --set over a key of the --config file is an
    override, not a repeat."""
    given: dict[str, list[str]] = {}
    spelled: list[tuple[str, list[str]]] = []  # each override as typed, and the keys it sets
    for item in overrides:
        key, sep, text = item.partition("=")
        if sep and key.strip():
            given.setdefault(key.strip(), []).append(text.strip())
            spelled.append((f"{key.strip()}={text.strip()}", override_keys(item)))
    for key, values in given.items():
        if len(values) > 1:
            times = "twice" if len(values) == 2 else f"{len(values)} times"
            raise ConfigError(
                f"--set {key} given {times} ("
                + ", ".join(f"--set {key}={v}" for v in values)
                + "); keep the one you mean"
            )
    # the same key by two spellings: a key and its table (``ep.beta=0.2`` and ``ep={beta=0.3}``)
    for i, (first, keys) in enumerate(spelled):
        for second, others in spelled[i + 1 :]:
            both = next((max(a, b, key=len) for a in keys for b in others if overlapping(a, b)), None)
            if both is not None:
                raise ConfigError(
                    f"--set {first} and --set {second} both set {both} (a key and its table are two "
                    "spellings of it; the later would win without a word); keep the one you mean"
                )


def override_keys(item: str) -> list[str]:
    """The config keys, dotted as --set names them, that one ``key=value`` override sets: its
    key, or where the value is a table (``ep={beta=0.3}``) each key inside it (``ep.beta``)."""
    key, _, text = item.partition("=")
    key = key.strip()
    value = parse_value(text.strip())
    return list(dotted_keys(value, f"{key}.")) if isinstance(value, dict) else [key]


def overlapping(a: str, b: str) -> bool:
    """Whether dotted config keys `a` and `b` set the same value: equal, or one a table that
    holds the other (``ep`` and ``ep.beta``)."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def load_into(cfg: T, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Fill the config dataclass `cfg` (its defaults) from the TOML file at `path` (if any),
    then from the ``key=value`` overrides, in order (a key given twice takes its last value, so
    a caller can append to a list of defaults); unknown keys and wrong types name the key. The
    commands refuse a key that their user's --set gives twice (`check_repeated_overrides`)."""
    if path:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p}: {toml_error(exc)}") from None
        _apply(cfg, data)
    for item in overrides:
        keys, value = parse_override(item)
        nested: dict[str, Any] = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            nested = {k: nested}
        _apply(cfg, nested)
    return cfg


def dotted_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested table (a config's `to_dict`, a TOML file) as {"section.key": value}, the keys
    as `--set` names them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(dotted_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_dict(cfg: T, data: dict[str, Any]) -> T:
    """Fill the config dataclass `cfg` from a nested dict (e.g. a run log's recorded config)."""
    _apply(cfg, data)
    return cfg


# keys added to the configs after runs were first recorded, with the value that a run recorded
# without them ran with (the default then), so that resuming an older run keeps it whatever the
# default is now: before `model.activation` existed every node was a hard sigmoid
RECORDED_BEFORE: dict[str, Any] = {"model.activation": "hard_sigmoid"}


def apply_recorded(cfg: T, data: dict[str, Any]) -> T:
    """`apply_dict` for a run log's recorded config: a key of `RECORDED_BEFORE` that the record
    lacks takes the value such runs ran with, not today's default."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key, value in RECORDED_BEFORE.items():
        section, name = key.split(".")
        if isinstance(data.get(section), dict):
            data[section].setdefault(name, value)
    return apply_dict(cfg, data)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The classifier's config: defaults, then the TOML file at `path`, then the overrides."""
    cfg = load_into(RunConfig(), path, overrides)
    validate(cfg)
    return cfg


def check_compute(value: str, key: str = "compute") -> None:
    """The compute device's text names a cpu or cuda torch device (whether this machine has
    it is checked when a run starts: `hil.compute.resolve_compute`)."""
    from hil.compute import ComputeDeviceError, resolve_compute

    try:
        resolve_compute(value, key, available=False)
    except ComputeDeviceError as exc:
        raise ConfigError(str(exc)) from None


# the largest nudge a trainer accepts: EP's gradient is a finite difference in beta, so past 1
# (a nudge as strong as the cost itself) the estimate is no longer EP's (the sweeps search 0.05
# to 0.6); an ep.beta of 5e4 trained to chance, one of 1e9 was refused by the board mid-run
MAX_EP_BETA: float = 1.0


def check_ep_beta(beta: float) -> None:
    """Refuse an EP nudge strength outside (0, MAX_EP_BETA], naming the key and the range."""
    if not 0 < beta <= MAX_EP_BETA:
        raise ConfigError(
            f"ep.beta: the nudge strength, in (0, {MAX_EP_BETA:g}] (EP estimates the gradient as a "
            f"finite difference in beta: 0.01 to 0.5 is the usual range), got {beta:g}"
        )


def validate(cfg: RunConfig) -> None:
    """Range checks that the types alone do not express."""
    check_compute(cfg.compute)
    check_log(cfg.log)
    check_data(cfg.data)
    if len(cfg.model.sizes) < 2 or any(n < 1 for n in cfg.model.sizes):
        raise ConfigError(f"model.sizes: need at least two positive layer sizes, got {cfg.model.sizes}")
    if cfg.model.block_layers < 1:
        raise ConfigError("model.block_layers: must be >= 1")
    m = cfg.model
    if m.channels and m.kind != "ffebm":
        raise ConfigError("model.channels: conv layers are for model.kind = 'ffebm'")
    if any(n < 1 for n in m.channels) or (m.pools and len(m.pools) != len(m.channels)):
        raise ConfigError(
            f"model.channels / model.pools: positive channel counts and one pool per conv layer, "
            f"got channels {m.channels}, pools {m.pools}"
        )
    if not 0 < m.init_scale <= MAX_INIT_SCALE:
        raise ConfigError(
            f"model.init_scale: the initial weights' scale, in (0, {MAX_INIT_SCALE:g}], got {m.init_scale}"
        )
    check_scales(m.gain, m.w_max)
    if any(not 1 <= p <= MAX_POOL for p in m.pools):
        raise ConfigError(
            f"model.pools: each conv layer's pooling window is 1 (none) to {MAX_POOL}, got {m.pools}"
        )
    if m.channels and not (1 <= m.kernel <= 15 and 0 <= m.padding < m.kernel and m.front >= 0):
        raise ConfigError(
            f"model.kernel in [1, 15], model.padding in [0, kernel - 1], model.front >= 0; got kernel "
            f"{m.kernel}, padding {m.padding}, front {m.front}"
        )
    try:
        Activation.parse(model_activation(m))
    except ConfigurationError as exc:
        raise ConfigError(f"model.activation: {exc} (or auto: the model kind's default)") from None
    check_ep_beta(cfg.ep.beta)
    if not 0 < cfg.ep.dt <= 1:
        raise ConfigError(f"ep.dt: must be in (0, 1], got {cfg.ep.dt}")
    for key, value in (("ep.free_steps", cfg.ep.free_steps), ("ep.nudge_steps", cfg.ep.nudge_steps)):
        check_settle_steps(key, value)
    check_devices(cfg)
    if cfg.data.validation < 0:
        raise ConfigError(
            f"data.validation: held-out training images, >= 0 (0: none), got {cfg.data.validation}"
        )
    for key, value, most in (
        ("train.epochs", cfg.train.epochs, MAX_EPOCHS),
        ("train.batch_size", cfg.train.batch_size, MAX_BATCH),
    ):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
        if value > most:
            raise ConfigError(f"{key}: at most {most} (a declared bound on the run's work), got {value}")
    if cfg.ep.refresh_every < 0:
        raise ConfigError(f"ep.refresh_every: must be >= 0, got {cfg.ep.refresh_every}")
    if not 0 <= cfg.train.shift <= MAX_SHIFT:
        raise ConfigError(
            f"train.shift: random translations of 0 to {MAX_SHIFT} pixels (0: off), got {cfg.train.shift}"
        )
    if not 0 <= cfg.train.warmup <= cfg.train.epochs:
        raise ConfigError(
            f"train.warmup: epochs of learning-rate warmup, 0 (off) to train.epochs ({cfg.train.epochs}), "
            f"got {cfg.train.warmup}"
        )
    if not cfg.train.lr or any(v <= 0 for v in cfg.train.lr):
        raise ConfigError(f"train.lr: need positive learning rates, got {cfg.train.lr}")
    check_training_signs(cfg)


BoardBound = tuple[str, float, str]  # (config key, its value, the `Limits` field bounding |value|)


def past_bounds(within: Iterable[BoardBound], limits: Any) -> list[tuple[str, float, str, float]]:
    """The settings of `within` whose magnitude is past the bound a board declares in `limits`
    (its `drivers.Limits`), in order, each as (config key, value, `Limits` field, the field's
    value). The one test of a run's settings against a board: as the board opens
    (`hil.boards.check_within_board`) and by `hil sweep` against the ends of its search space
    (`hil.sweep.spec.check_within_boards`), each with its own words."""
    past = []
    for key, value, bound in within:
        most = getattr(limits, bound)
        if abs(value) > most:
            past.append((key, value, bound, most))
    return past


def board_bounds(cfg: RunConfig) -> tuple[BoardBound, ...]:
    """The settings of a classifier run that each board it opens bounds from above: (config
    key, value, `Limits` field). Checked as a board opens (`hil.boards.check_within_board`) and
    by `hil sweep` against the ends of its search space before any trial runs."""
    m, e = cfg.model, cfg.ep
    bounds: tuple[BoardBound, ...] = (
        ("model.gain", m.gain, "max_gain"),
        ("model.w_max", m.w_max, "max_w_max"),
        ("ep.beta", e.beta, "max_beta"),
        ("ep.free_steps", e.free_steps, "max_settle_steps"),
        ("ep.nudge_steps", e.nudge_steps, "max_settle_steps"),
    )
    if e.loss == "ce":
        # the ce nudge injects beta x tau (softmax(tau s) - onehot), whose entries stay below
        # tau in magnitude and come near it on a confident wrong answer: the board's max_drive
        # bounds that current (refused at the first nudge, after programming and the run log)
        # (to 12 digits: 0.2 x 6 is 1.2, not the float product's 1.2000000000000002)
        bounds += ((DRIVE_KEY, float(f"{e.beta * e.tau:.12g}"), "max_drive"),)
    return bounds


DRIVE_KEY = "ep.beta x ep.tau"  # the ce loss's largest injected nudge current |beta grad|


def check_scales(gain: float, w_max: float) -> None:
    """model.gain and model.w_max > 0, named by their keys before anything opens a board (the
    topology refused them later in its own words, "activation gain must be > 0", naming no
    key); their upper bounds are each board's (Limits.max_gain, max_w_max), checked at configure."""
    for key, value, what in (
        ("model.gain", gain, "the activation slope (default 1)"),
        ("model.w_max", w_max, "the weight of a fully-on conductance pair (default 1)"),
    ):
        if not value > 0:
            raise ConfigError(
                f"{key}: {what}, > 0 (a board bounds it from above: its max_gain / max_w_max, `hil info`), "
                f"got {value:g}"
            )


def check_settle_steps(key: str, value: int) -> None:
    """A settle phase's step budget: 1 to MAX_SETTLE_STEPS (a declared bound on its work; a
    board may declare fewer, and refuses more at configure)."""
    if not 1 <= value <= MAX_SETTLE_STEPS:
        raise ConfigError(
            f"{key}: a settle phase's step budget, 1 to {MAX_SETTLE_STEPS} (a declared bound; a board may "
            f"allow fewer, its max_settle_steps), got {value}"
        )


def check_training_signs(cfg: RunConfig) -> None:
    """The scales whose sign the optimiser or the loss takes as given: a negative ce logit scale
    (the loss then rewards the wrong class), a learning rate of the digital parts <= 0 or a
    negative weight decay (ascent, weights that grow), a momentum of 1 or more (a step that never
    decays) trained on with no word."""
    e, t = cfg.ep, cfg.train
    if not 0 < e.tau <= MAX_TAU:
        raise ConfigError(
            f"ep.tau: the ce loss's logit scale, in (0, {MAX_TAU:g}] (the injected error current peaks "
            f"at ep.beta x ep.tau; default 6), got {e.tau:g}"
        )
    if t.lr_digital <= 0:
        raise ConfigError(f"train.lr_digital: the digital parts' learning rate, > 0, got {t.lr_digital:g}")
    if not 0 <= t.momentum < 1:
        raise ConfigError(f"train.momentum: in [0, 1) (0: none), got {t.momentum:g}")
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay: >= 0 (0: none), got {t.weight_decay:g}")


def eb_blocks(cfg: RunConfig) -> int:
    """The EB blocks (boards' worth of tiles) of the model: 1 for a DHN; for an ff-EBM the
    layers (or conv layers) in blocks of `model.block_layers` (`hil.ffebm.split_layered`,
    `split_conv`)."""
    m = cfg.model
    if m.kind == "dhn":
        return 1
    layers = len(m.channels) if m.channels else len(m.sizes) - 1
    return max(1, -(-layers // max(1, m.block_layers)))


def check_devices(cfg: RunConfig) -> None:
    """`devices`: empty, or one non-empty board URI per EB block."""
    if not cfg.devices:
        return
    if len(cfg.devices) > MAX_DEVICES:
        raise ConfigError(f"devices: at most {MAX_DEVICES} board URIs, got {len(cfg.devices)}")
    for i, uri in enumerate(cfg.devices):
        if not uri.strip():
            raise ConfigError(f"devices[{i}]: an empty URI; name the board of EB block {i}")
    n = eb_blocks(cfg)
    if len(cfg.devices) != n:
        raise ConfigError(
            f"devices: {len(cfg.devices)} board URI(s) for the {n} EB block(s) of this model "
            f"(model.kind = {cfg.model.kind!r}, block_layers = {cfg.model.block_layers}); give one "
            "URI per block (repeat a URI to put blocks on one board) or leave devices empty"
        )


def to_toml(cfg: Any) -> str:
    """The config as TOML text (round-trips through `load_config`)."""

    def fmt(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    d = cfg.to_dict()
    lines = [f"{k} = {fmt(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {fmt(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
