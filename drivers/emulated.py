"""The in-process backend: a Device over an emulated Board.

On CPU, arrays cross the boundary without copies (``torch.from_numpy`` / ``Tensor.numpy``).
URI: ``emulator://?preset=rram&seed=0&device=cpu&adc_bits=6&read_noise=1e-7``: any field of
the preset's PeripheryModel or DeviceModel can be overridden by name.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import numpy as np
import torch

from drivers import checks
from drivers.base import (
    CAPABILITIES,
    BoardStatus,
    Device,
    DeviceInfo,
    Equilibrium,
    Nudge,
    ProgramReport,
    PulseReport,
    SafetyCounters,
)
from drivers.errors import ConfigurationError, LimitViolation
from drivers.topology import Topology
from emulator.board import Board
from emulator.presets import BoardPreset, get_preset


def _t(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(x)
    return t if device.type == "cpu" else t.to(device)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _convert(name: str, text: str, current: object, annotation: object) -> object:
    """Parse a URI override by the type of the field it replaces."""
    allows_none = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        allows_none = type(None) in typing.get_args(annotation)
    if allows_none and text.lower() in ("none", "null", "off", "inf"):
        return None
    try:
        if isinstance(current, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if isinstance(current, int) or (current is None and "int" in str(annotation)):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
    except ValueError:
        raise ConfigurationError(
            f"URI parameter {name}={text!r}: expected {type(current).__name__}"
            + (" or none" if allows_none else "")
        ) from None
    raise ConfigurationError(f"URI parameter {name!r} cannot be set from a URI")


def preset_with_overrides(name: str, params: dict[str, str]) -> BoardPreset:
    preset = get_preset(name)
    per_fields = {f.name: f for f in dataclasses.fields(preset.periphery)}
    dev_fields = {f.name: f for f in dataclasses.fields(preset.device)}
    per_over: dict[str, object] = {}
    dev_over: dict[str, object] = {}
    for key, text in params.items():
        if key in per_fields:
            hints = typing.get_type_hints(type(preset.periphery))
            per_over[key] = _convert(key, text, getattr(preset.periphery, key), hints[key])
        elif key in dev_fields:
            hints = typing.get_type_hints(type(preset.device))
            dev_over[key] = _convert(key, text, getattr(preset.device, key), hints[key])
        else:
            known = sorted({"preset", "seed", "device", *per_fields, *dev_fields})
            raise ConfigurationError(f"unknown emulator URI parameter {key!r}; known: {', '.join(known)}")
    return dataclasses.replace(
        preset,
        periphery=dataclasses.replace(preset.periphery, **per_over),
        device=dataclasses.replace(preset.device, **dev_over),
    )


def open_from_uri(target: str, params: dict[str, str]) -> EmulatedDevice:
    if target not in ("", "/", "localhost"):
        raise ConfigurationError(
            f"emulator URIs take no host or path (got {target!r}); use emulator://?preset=NAME&seed=N"
        )
    params = dict(params)
    preset_name = params.pop("preset", "ideal")
    seed_text = params.pop("seed", "0")
    try:
        seed = int(seed_text)
    except ValueError:
        raise ConfigurationError(f"URI parameter seed={seed_text!r}: expected an integer") from None
    device = params.pop("device", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigurationError(f"device={device} asked for, but torch sees no CUDA device; use device=cpu")
    return EmulatedDevice(Board(preset_with_overrides(preset_name, params), seed, device))


class EmulatedDevice(Device):
    def __init__(self, board: Board) -> None:
        super().__init__()
        self.board = board
        self._info = DeviceInfo(
            identity=board.identity,
            limits=board.limits,
            capabilities=frozenset(CAPABILITIES),
            preset=board.preset.name,
            extra={"seed": board.seed, "torch_device": str(board.device)},
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
        max_iters: int = 20,
    ) -> ProgramReport:
        with self.lock:
            try:
                gp, gm = checks.check_program(self.topology, self.info.limits, tile, g_plus, g_minus)
            except LimitViolation as exc:
                raise self._refuse(exc) from None
            if max_iters < 1:
                raise ConfigurationError(f"max_iters must be >= 1, got {max_iters}")
            dev = self.board.device
            r = self.board.program(
                tile, _t(gp, dev), _t(gm, dev), verify=verify, tol=tol, max_iters=max_iters
            )
            return ProgramReport(
                tile=tile,
                g_plus=_np(r["g_plus"]),
                g_minus=_np(r["g_minus"]),
                iterations=int(r["iterations"]),
                pulses=int(r["pulses"]),
                residual_max=float(r["residual_max"]),
                within_tol=float(r["within_tol"]),
                energy_j=float(r["energy_j"]),
                time_s=float(r["time_s"]),
            )

    def pulse(self, tile: str, counts_plus: np.ndarray, counts_minus: np.ndarray) -> PulseReport:
        with self.lock:
            try:
                cp, cm = checks.check_pulse(self.topology, self.info.limits, tile, counts_plus, counts_minus)
            except LimitViolation as exc:
                raise self._refuse(exc) from None
            dev = self.board.device
            r = self.board.pulse(tile, _t(cp, dev), _t(cm, dev))
            return PulseReport(tile, int(r["pulses"]), float(r["energy_j"]), float(r["time_s"]))

    def read_conductance(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            checks.check_tile(self.topology, tile)
            gp, gm = self.board.read_conductance(tile)
            return _np(gp), _np(gm)

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        with self.lock:
            try:
                arr = checks.check_mvm(self.topology, self.info.limits, tile, x, transpose)
            except LimitViolation as exc:
                raise self._refuse(exc) from None
            return _np(self.board.mvm(tile, _t(arr, self.board.device), transpose))

    def settle(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        with self.lock:
            try:
                cl, nd, ini, _batch = checks.check_settle(self.topology, self.info.limits, clamp, nudge, init)
            except LimitViolation as exc:
                raise self._refuse(exc) from None
            every = int(trace) if not isinstance(trace, bool) else (1 if trace else 0)
            if every < 0:
                raise ConfigurationError(f"trace must be True/False or a step interval >= 1, got {trace}")
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
            states = {g: _np(v) for g, v in r.states.items()}
            states.update(cl)
            return Equilibrium(
                states=states,
                steps=r.steps,
                converged=r.converged,
                residual=r.residual,
                energy=_np(r.energy),
                settle_time_s=r.settle_time_s,
                energy_j=r.energy_j,
                trace=None if r.trace is None else {k: _np(v) for k, v in r.trace.items()},
            )

    def wait(self, seconds: float) -> None:
        with self.lock:
            self.board.wait(seconds)

    def safety(self) -> SafetyCounters:
        return SafetyCounters(self.board.safety.refused, self.board.safety.violations)

    def reset(self) -> None:
        with self.lock:
            self.board.restart()

    def status(self) -> BoardStatus:
        with self.lock:
            b = self.board
            return BoardStatus(epoch=b.epoch, transaction=b.transaction, configured=b.topology is not None)

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
