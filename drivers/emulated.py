"""The in-process backend: a Device over an emulated Board.

On CPU, arrays cross the boundary without copies (``torch.from_numpy`` / ``Tensor.numpy``).
URI: ``emulator://?preset=rram&seed=0&device=cpu&adc_bits=6&read_noise=1e-7``: any field of
the preset's PeripheryModel or DeviceModel can be overridden by name; ``capabilities=mvm,pulse``
declares a subset of the capabilities (a board that only multiplies, for CI of host-side
settles). `EmulatorOptions` parses and writes these.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from drivers import checks
from drivers.base import (
    CAPABILITIES,
    BoardStatus,
    Device,
    DeviceInfo,
    Equilibrium,
    Meter,
    Nudge,
    ProgramReport,
    PulseReport,
    SafetyCounters,
    Wear,
)
from drivers.errors import ConfigurationError, LimitViolation
from drivers.numerics import to_numpy
from drivers.options import encode_query, format_value, parse_value, settable
from drivers.topology import BIAS, Topology
from drivers.uri import Backend
from drivers.wear import near_end_from, tile_wear
from emulator.board import Board
from emulator.devices import DeviceModel
from emulator.periphery import PeripheryModel
from emulator.presets import BoardPreset, get_preset
from emulator.settle_types import SettleResult


def _t(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(x)
    return t if device.type == "cpu" else t.to(device)


def _program_report(
    tile: str, r: dict[str, typing.Any], arrays: Callable[[typing.Any], typing.Any]
) -> ProgramReport:
    """The board's program result `r` as a `ProgramReport`, its read-backs through `arrays`
    (numpy for `program`, the board's tensors as they are for `program_stacked`)."""
    return ProgramReport(
        tile=tile,
        g_plus=arrays(r["g_plus"]),
        g_minus=arrays(r["g_minus"]),
        iterations=int(r["iterations"]),
        pulses=int(r["pulses"]),
        residual_max=float(r["residual_max"]),
        within_tol=float(r["within_tol"]),
        energy_j=float(r["energy_j"]),
        time_s=float(r["time_s"]),
        gave_up=int(r["gave_up"]),
        spent=None if r.get("spent") is None else int(r["spent"]),
    )


def _pair(a: np.ndarray, b: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`a` and `b` as tensors; when `b` directly follows `a` in memory (G+ and G- as the two
    halves of one (2, rows, cols) array, as the programming schemes hand them over), as the
    two halves of one tensor, so the board sees one stacked target and copies nothing."""
    base = a.base
    if (
        isinstance(base, np.ndarray)
        and b.base is base
        and base.shape == (2, *a.shape)
        and base.flags.c_contiguous
        and a.ctypes.data == base.ctypes.data
        and b.ctypes.data == a.ctypes.data + a.nbytes
    ):  # the common case: a = base[0], b = base[1]
        t = _t(base, device)
        return t[0], t[1]
    if (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.flags.c_contiguous
        and b.flags.c_contiguous
        and a.nbytes > 0
        and b.ctypes.data == a.ctypes.data + a.nbytes
    ):
        writeable = bool(a.flags.writeable and b.flags.writeable)  # the board only reads it
        both = np.lib.stride_tricks.as_strided(a, (2, *a.shape), (a.nbytes, *a.strides), writeable=writeable)
        t = _t(both, device)
        return t[0], t[1]
    return _t(a, device), _t(b, device)


_TARGETS = ("", "/", "localhost")
_BOARD_PARAMS = ("preset", "seed", "device", "capabilities")


@functools.cache
def _override_fields() -> dict[str, tuple[str, object]]:
    """Fields of the preset's models a URI can set: name -> (model, annotation)."""
    found: dict[str, tuple[str, object]] = {}
    for model, cls in (("periphery", PeripheryModel), ("device", DeviceModel)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            found.setdefault(f.name, (model, hints[f.name]))
    return found


def parse_capabilities(text: str) -> frozenset[str]:
    """``mvm,pulse,program_verify`` -> a subset of `CAPABILITIES`; unknown names are refused."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CAPABILITIES]
    if unknown:
        raise ConfigurationError(
            f"emulator URI parameter capabilities={text!r}: unknown capabilit"
            f"{'ies' if len(unknown) > 1 else 'y'} {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(CAPABILITIES)} (comma-separated, any subset)"
        )
    return frozenset(names)


def _override(name: str, value: object) -> tuple[str, object]:
    """(name, value) of a preset override, the value parsed (from text) or checked by the
    field's type; unknown names and fields a URI cannot carry are refused."""
    fields = _override_fields()
    if name not in fields:
        # only what a URI can set: a field of another type is named as such below, not offered
        known = ", ".join(sorted({*_BOARD_PARAMS, *(k for k, (_, a) in fields.items() if settable(a))}))
        raise ConfigurationError(f"unknown emulator URI parameter {name!r}; known: {known}")
    annotation = fields[name][1]
    if not settable(annotation):
        raise ConfigurationError(
            f"emulator URI parameter {name!r} cannot be set from a URI (a field of the preset's "
            f"{fields[name][0]} model that a URI value cannot carry): give the board a preset of "
            "your own with it replaced (emulator.presets.BoardPreset, dataclasses.replace)"
        )
    text = value if isinstance(value, str) else format_value(value)
    return name, parse_value("emulator", name, text, annotation)


@dataclasses.dataclass(frozen=True)
class EmulatorOptions:
    """``emulator://?preset=rram&seed=0[&device=cuda][&capabilities=mvm,program_verify][&FIELD=VALUE]``

    `overrides` replace fields of the preset's PeripheryModel or DeviceModel by name
    (``adc_bits=6``, ``dac_bits=none``, ``read_noise=1e-7``); values are parsed by the
    field's type and kept sorted by name. `capabilities` is the subset of `CAPABILITIES` the
    board declares (all by default)."""

    preset: str = "ideal"
    seed: int = 0
    device: str = "cpu"
    capabilities: frozenset[str] = frozenset(CAPABILITIES)
    overrides: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        get_preset(self.preset)  # raises, naming the known presets
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigurationError(
                f"emulator URI parameter device={self.device!r}: expected a torch device "
                "such as cpu, cuda or cuda:1"
            ) from None
        caps = parse_capabilities(",".join(self.capabilities))
        overrides = sorted((_override(name, value) for name, value in self.overrides), key=lambda kv: kv[0])
        object.__setattr__(self, "capabilities", caps)
        object.__setattr__(self, "overrides", tuple(overrides))

    @classmethod
    def from_query(cls, target: str, params: Mapping[str, str]) -> EmulatorOptions:
        if target not in _TARGETS:
            raise ConfigurationError(
                f"emulator URIs take no host or path (got {target!r}); use emulator://?preset=NAME&seed=N"
            )
        return cls(
            preset=params.get("preset", cls.preset),
            seed=parse_value("emulator", "seed", params.get("seed", "0"), int),
            device=params.get("device", cls.device),
            capabilities=parse_capabilities(params.get("capabilities", ",".join(CAPABILITIES))),
            overrides=tuple((k, v) for k, v in params.items() if k not in _BOARD_PARAMS),
        )

    def params(self) -> dict[str, str]:
        """preset and seed always; device, capabilities and overrides when given."""
        out = {"preset": self.preset, "seed": str(self.seed)}
        if self.device != "cpu":
            out["device"] = self.device
        if self.capabilities != frozenset(CAPABILITIES):
            out["capabilities"] = ",".join(c for c in CAPABILITIES if c in self.capabilities)
        out.update((name, format_value(value)) for name, value in self.overrides)
        return out

    def to_query(self) -> str:
        return encode_query(self.params())

    def board_preset(self) -> BoardPreset:
        """The preset with the overrides applied."""
        preset = get_preset(self.preset)
        fields = _override_fields()
        per = {k: v for k, v in self.overrides if fields[k][0] == "periphery"}
        dev = {k: v for k, v in self.overrides if fields[k][0] == "device"}
        return dataclasses.replace(
            preset,
            periphery=dataclasses.replace(preset.periphery, **per),
            device=dataclasses.replace(preset.device, **dev),
        )


def open_emulator(target: str, options: EmulatorOptions) -> EmulatedDevice:
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigurationError(
            f"device={options.device} asked for, but torch sees no CUDA device; use device=cpu"
        )
    board = Board(options.board_preset(), options.seed, options.device)
    return EmulatedDevice(board, capabilities=options.capabilities)


def _equilibrium(r: SettleResult, states: dict[str, np.ndarray]) -> Equilibrium:
    """A board settle's result as an `Equilibrium` with `states`; a pending energy is computed
    when someone reads it (from what the settle kept for it). Trace values are numpy."""
    eq = Equilibrium(
        states=states,
        steps=r.steps,
        converged=r.converged,
        residual=r.residual,
        energy=None if r.energy_pending else to_numpy(r.energy, dtype=None),
        settle_time_s=r.settle_time_s,
        energy_j=r.energy_j,
        trace=None if r.trace is None else {k: to_numpy(v, dtype=None) for k, v in r.trace.items()},
    )
    return eq.defer_energy(lambda: to_numpy(r.energy, dtype=None)) if r.energy_pending else eq


class EmulatedDevice(Device):
    """`capabilities`: what the board declares (default: all); a call that needs one it
    lacks raises NotSupported, as a board of that kind would."""

    def __init__(self, board: Board, capabilities: Iterable[str] = CAPABILITIES) -> None:
        super().__init__()
        self.board = board
        caps = frozenset(capabilities)
        if not caps <= set(CAPABILITIES):
            raise ConfigurationError(f"unknown capabilities {sorted(caps - set(CAPABILITIES))}")
        self._info = DeviceInfo(
            identity=board.identity,
            limits=board.limits,
            capabilities=caps,
            preset=board.preset.name,
            extra={"seed": board.seed, "torch_device": str(board.device), "config": board.configuration},
        )
        self._closed = False

    @property
    def info(self) -> DeviceInfo:
        return self._info

    @property
    def topology(self) -> Topology | None:
        return self.board.topology

    def _refuse(self, exc: LimitViolation) -> LimitViolation:
        return self.board.safety.refuse(exc)

    def configure(self, topology: Topology) -> None:
        with self.lock:
            self.board.configure(topology)

    def program(
        self,
        tile: str,
        g_plus: np.ndarray,
        g_minus: np.ndarray,
        *,
        verify: bool = False,
        tol: float | None = None,
        max_iters: int | None = None,
    ) -> ProgramReport:
        if verify:
            self.require("program_verify")
        with self.lock:
            try:
                # the scalars before the arrays (converting one runs the caller's code); the
                # arrays checked are the board's own copies
                tol, max_iters = checks.check_verify(self.info.limits, tol, max_iters)
                gp, gm = checks.check_program(self.topology, self.info.limits, tile, g_plus, g_minus)
            except LimitViolation as exc:
                raise self._refuse(exc) from None
            tp, tm = _pair(gp, gm, self.board.device)
            r = self.board.program(tile, tp, tm, verify=verify, tol=tol, max_iters=max_iters)
            return _program_report(tile, r, functools.partial(to_numpy, dtype=None))

    def program_stacked(
        self,
        tile: str,
        g: np.ndarray | torch.Tensor,
        *,
        verify: bool = False,
        tol: float | None = None,
        max_iters: int | None = None,
    ) -> ProgramReport:
        """`program` of stacked (2, rows, cols) targets without a host round trip: a float32
        tensor on the board's device is checked there (one read-back: both halves' extremes)
        and written as it is; the report's read-backs are tensors on the board's device (views,
        as `program`'s arrays are on the CPU). Anything else goes through `program`."""
        dev = self.board.device
        if not isinstance(g, torch.Tensor) or g.device != dev or g.dtype != torch.float32 or g.ndim != 3:
            return super().program_stacked(tile, g, verify=verify, tol=tol, max_iters=max_iters)
        if verify:
            self.require("program_verify")
        with self.lock:
            try:
                # the scalars before the targets (converting one runs the caller's code); the
                # targets are the caller's tensor itself, which it must not change during the call
                tol, max_iters = checks.check_verify(self.info.limits, tol, max_iters)
                shape = checks.check_tile(self.topology, tile)
                if tuple(g.shape) != (2, *shape):
                    raise ConfigurationError(
                        f"program {tile!r}: targets have shape {tuple(g.shape)}, the tile is (2, {shape[0]}, "
                        f"{shape[1]})"
                    )
                # each half's extremes (aminmax over a whole half: with dim=1 it is several times
                # slower on the CPU), read back in one transfer
                ends = torch.stack([*torch.aminmax(g[0]), *torch.aminmax(g[1])]).tolist()
                checks.check_conductance_range(self.info.limits, tile, "g_plus", ends[0], ends[1])
                checks.check_conductance_range(self.info.limits, tile, "g_minus", ends[2], ends[3])
            except LimitViolation as exc:
                raise self._refuse(exc) from None
            t = g.detach()
            ends_all = (min(ends[0], ends[2]), max(ends[1], ends[3]))
            r = self.board.program(
                tile, t[0], t[1], verify=verify, tol=tol, max_iters=max_iters, target_range=ends_all
            )
            return _program_report(tile, r, lambda x: x)

    def pulse(self, tile: str, counts_plus: np.ndarray, counts_minus: np.ndarray) -> PulseReport:
        self.require("pulse")
        with self.lock:
            try:
                cp, cm = checks.check_pulse(
                    self.topology, self.info.limits, tile, counts_plus, counts_minus, copy=False
                )
            except LimitViolation as exc:
                raise self._refuse(exc) from None
            dev = self.board.device
            r = self.board.pulse(tile, _t(cp, dev), _t(cm, dev))
            return PulseReport(tile, int(r["pulses"]), float(r["energy_j"]), float(r["time_s"]))

    def read_conductance(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            checks.check_tile(self.topology, tile)
            g = to_numpy(self.board.read_conductance_stacked(tile), dtype=None)  # one conversion
            return g[0], g[1]

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        self.require("mvm")
        with self.lock:
            try:
                arr = checks.check_mvm(self.topology, self.info.limits, tile, x, transpose, copy=False)
            except LimitViolation as exc:
                raise self._refuse(exc) from None
            return to_numpy(self.board.mvm(tile, _t(arr, self.board.device), transpose), dtype=None)

    def settle(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        self.require_settle(trace, init)
        with self.lock:
            every = checks.check_trace(self.info.limits, trace)  # before the arrays' checks
            try:
                cl, nd, ini, _batch = checks.check_settle(
                    self.topology, self.info.limits, clamp, nudge, init, copy=False
                )
            except LimitViolation as exc:
                raise self._refuse(exc) from None
            dev = self.board.device
            r = self.board.settle(
                {g: _t(x, dev) for g, x in cl.items()},
                {
                    g: (
                        n.beta,
                        None if n.target is None else _t(n.target, dev),
                        None if n.grad is None else _t(n.grad, dev),
                    )
                    for g, n in nd.items()
                },
                {g: _t(x, dev) for g, x in ini.items()},
                every,
            )
            states = {g: to_numpy(v, dtype=None) for g, v in r.states.items()}
            states.update(cl)
            return _equilibrium(r, states)

    @property
    def tensor_device(self) -> torch.device:  # type: ignore[override]
        """The board's torch device: `settle_tensors` takes and returns tensors there."""
        return self.board.device

    def settle_tensors(
        self,
        clamp: dict[str, torch.Tensor],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, torch.Tensor] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        """`settle` without the numpy round trip: clamps, nudge targets and grads, and init as
        torch tensors (moved to the board's device and cast to float32 if they are not there
        already: no copy when they are), the states of the equilibrium as tensors on the board's
        device (views of the settle's results, as `settle`'s arrays are on CPU). The same
        checks as `settle`, done with torch; their one read-back (the peaks of every array, in
        one transfer) is per call, not per settle step. Energy and trace stay numpy. The
        tensors checked are the ones the board reads (no copy): the caller must not change them
        until the call returns."""
        self.require_settle(trace, init)
        with self.lock:
            every = checks.check_trace(self.info.limits, trace)  # before the arrays' checks
            try:
                cl, nd, ini = self._check_tensors(clamp, nudge, init)
            except LimitViolation as exc:
                raise self._refuse(exc) from None
            r = self.board.settle(cl, {g: (n.beta, n.target, n.grad) for g, n in nd.items()}, ini, every)
            states = dict(r.states)
            states.update(cl)
            return _equilibrium(r, states)  # type: ignore[arg-type]

    def _check_tensors(
        self,
        clamp: Mapping[str, torch.Tensor],
        nudge: Mapping[str, Nudge] | None,
        init: Mapping[str, torch.Tensor] | None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Nudge], dict[str, torch.Tensor]]:
        """`checks.check_settle` for tensors: names, shapes, batch size, finiteness, the read-voltage
        limit on clamps, targets and init, and the injected current of grad nudges."""
        topo = checks.require_topology(self.topology)
        limits = self.info.limits
        if not clamp:
            raise ConfigurationError("settle needs at least one clamped group (the input)")
        dev = self.board.device
        batch: list[int] = []
        # (what, smallest and largest value, bound on the peak |x|, the nudge group and |beta| of
        # an injected current): the extremes of every array read back at once, in one transfer
        peaks: list[tuple[str, torch.Tensor, torch.Tensor, float, tuple[str, float] | None]] = []

        def as_batch(kind: str, group: str, x: object, voltage: bool) -> torch.Tensor:
            if group == BIAS and kind in ("clamp", "init"):
                raise ConfigurationError(f"{kind}: the bias node is fixed at 1 and cannot be set")
            if group not in topo.groups:
                raise ConfigurationError(f"{kind}: unknown group {group!r}; known: {sorted(topo.groups)}")
            t = torch.as_tensor(x)
            if t.dtype.is_complex:
                raise ConfigurationError(f"{kind} {group!r}: expected real numbers, got dtype {t.dtype}")
            if t.requires_grad or t.device != dev or t.dtype != torch.float32:
                t = t.detach().to(dev, torch.float32)  # else the caller's tensor itself (same object)
            if t.ndim == 1:
                t = t[None, :]
            n = topo.groups[group]
            if t.ndim != 2 or t.shape[1] != n:
                shape = tuple(t.shape)
                raise ConfigurationError(f"{kind} {group!r}: expected shape (batch, {n}), got {shape}")
            if batch and t.shape[0] != batch[0]:
                raise ConfigurationError(
                    f"{kind} {group!r}: batch size {t.shape[0]} differs from the clamp's {batch[0]}"
                )
            if not batch:
                batch.append(checks.check_batch(f"{kind} {group!r}", t.shape[0], limits))
                if batch[0] == 0:
                    raise ConfigurationError("settle got an empty batch (0 samples); pass one or more")
            if kind != "init":  # an init is copied into the board's state buffer, in any layout
                t = t.contiguous()  # itself when it is contiguous
            if t.numel():
                # the peak |x| in one pass without a temporary (aminmax propagates NaN), over the
                # values in memory order (a transposed init's transpose: several times faster)
                lo, hi = torch.aminmax(t.T if not t.is_contiguous() and t.T.is_contiguous() else t)
                peaks.append((f"{kind} {group!r}", lo, hi, limits.clamp_max if voltage else math.inf, None))
            return t

        # the betas before any array (converting one runs the caller's code)
        betas = {g: checks.nudge_beta(g, nd, clamp, topo, limits) for g, nd in (nudge or {}).items()}
        cl = {g: as_batch("clamp", g, x, True) for g, x in clamp.items()}
        nudges: dict[str, Nudge] = {}
        for group, nd in (nudge or {}).items():
            beta = betas[group]
            target = None if nd.target is None else as_batch("nudge target", group, nd.target, True)
            grad = None if nd.grad is None else as_batch("nudge grad", group, nd.grad, False)
            if grad is not None and grad.numel():
                what, lo, hi, bound, _ = peaks.pop()
                peaks.append((what, lo, hi, bound, (group, abs(beta))))
            nudges[group] = Nudge(beta, target, grad)  # type: ignore[arg-type]
        ini = {g: as_batch("init", g, x, True) for g, x in (init or {}).items() if g not in cl}
        if peaks:
            ends = torch.stack([e for _, lo, hi, _, _ in peaks for e in (lo, hi)]).tolist()  # one read-back
            for k, (what, _lo, _hi, bound, current) in enumerate(peaks):
                lo, hi = ends[2 * k], ends[2 * k + 1]
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise ConfigurationError(f"{what}: contains NaN or infinite values")
                v = max(-lo, hi)  # the peak |x|, as the float32 array holds it (negation is exact)
                if v > bound:
                    raise LimitViolation(
                        f"read-voltage limit on {what}", v * limits.v_read, limits.v_read_max,
                        f"node states must lie within +-{limits.clamp_max:.4g} (normalised units)",
                    )  # fmt: skip
                if current is not None:
                    group, beta = current
                    checks.check_injected_current(group, beta, v, limits)
        return cl, nudges, ini

    def wait(self, seconds: float) -> None:
        with self.lock:
            self.board.wait(seconds)

    def safety(self) -> SafetyCounters:
        return SafetyCounters(self.board.safety.refused, self.board.safety.violations)

    def meter(self) -> Meter:
        with self.lock:
            b = self.board
            return Meter(clock_s=float(b.clock), energy_j=float(b.energy_j), mvm_calls=int(b.mvm_calls))

    def wear(self) -> Wear | None:
        with self.lock:
            b = self.board
            endurance = b.limits.pulse_endurance
            if endurance is None:
                return None
            names = [] if b.topology is None else [c.tile for c in b.topology.couplings]
            tiles = {name: tile_wear(b.wear(name), endurance) for name in names}
            return Wear(endurance, near_end_from(endurance), tiles)

    def reset(self) -> None:
        with self.lock:
            self.board.restart()

    def status(self) -> BoardStatus:
        with self.lock:
            b = self.board
            configured = b.topology is not None
            return BoardStatus(b.epoch, b.transaction, configured, arrays_id=b.arrays_id)

    def begin(self, tag: str) -> None:
        with self.lock:
            self.board.begin_transaction(tag)

    def commit(self, tag: str) -> None:
        with self.lock:
            self.board.commit_transaction(tag)

    def safe_state(self) -> None:
        """Nothing is in flight between calls of the in-process board: lines are at 0 V."""

    def close(self) -> None:
        self._closed = True


BACKEND = Backend("emulator", open_emulator, EmulatorOptions)
