"""Protocol conformance of any board: checks of the specification, not of the emulator.

`run_conformance(dev)` drives a board through every operation of `drivers.base.Device` that
its `info.capabilities` declare, on a tiny layered network well inside its `info.limits`,
and checks each reply against the spec (docs/protocol.md and the Device docstrings):
shapes, dtypes and ranges, and values against what the board's own conductances predict,
within tolerances built from its converters (DAC/ADC LSBs from the limits) and its noise
(measured by repeating the operation). A capability the board does not declare is SKIPPED,
and calling it must raise `NotSupported`. `tests/test_conformance.py` compares transports
bit for bit against the in-process emulator; this is what a lab's own firmware can pass.

The board is left in its safe state (`safe_state()` runs at the end, also after a failure);
the caller closes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from drivers.base import CAPABILITIES, BoardStatus, Device, Equilibrium, Limits, Nudge, ProgramReport
from drivers.errors import ConfigurationError, LimitViolation, NotSupported
from drivers.topology import BIAS, Coupling, SettleBudget, Topology

Status = Literal["PASS", "FAIL", "SKIP"]

# Relative allowance for the converters' per-channel gain errors (uncalibrated boards: the
# analog-AI literature and the emulator's presets have ~1 % per converter; 5 % is 3 sigma of
# a DAC and an ADC in series, with room).
GAIN_ALLOWANCE = 0.05
# Without write-verify the spec promises no tolerance; a plain write must still land near
# its target: mean |G - target| within this fraction of the conductance range.
WRITE_ALLOWANCE = 0.10
# Read-backs may fall outside [g_min, g_max] by read noise and device-to-device bounds.
RANGE_MARGIN = 0.05
# Fraction of a verified tile's devices that must end within tol (stuck devices exist).
VERIFY_FRACTION = 0.9
VERIFY_ITERS = 20  # max_iters of the verified writes


class Mismatch(Exception):
    """A reply that breaks the spec; the text says what came back."""


@dataclass
class Check:
    """One line of the report."""

    operation: str
    status: Status
    sent: str
    got: str
    spec: str
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.status:<4}  {self.operation:<22} sent: {self.sent} | got: {self.got} | spec: {self.spec}"
        )


@dataclass
class Report:
    uri: str
    identity: str
    checks: list[Check] = field(default_factory=list)
    wall_s: float = 0.0

    def count(self, status: Status) -> int:
        return sum(c.status == status for c in self.checks)

    @property
    def ok(self) -> bool:
        return self.count("FAIL") == 0

    def summary(self) -> str:
        return (
            f"{self.count('PASS')} passed, {self.count('FAIL')} failed, {self.count('SKIP')} skipped "
            f"(capabilities the board does not declare) in {self.wall_s:.2f} s"
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "uri": self.uri,
                "identity": self.identity,
                "ok": self.ok,
                "passed": self.count("PASS"),
                "failed": self.count("FAIL"),
                "skipped": self.count("SKIP"),
                "wall_s": self.wall_s,
                "checks": [asdict(c) for c in self.checks],
            },
            indent=1,
        )


@dataclass(frozen=True)
class Options:
    sizes: tuple[int, ...] = (5, 4, 3)  # layered network, input first (a bias row per tile)
    batch: int = 4
    reads: int = 8  # conductance reads averaged for the reference weights
    repeats: int = 4  # repeats of an mvm or settle to measure its noise
    pulses: int = 10  # pulse count per device (capped by limits.max_pulses)
    seed: int = 0


def plan_topology(limits: Limits, options: Options) -> Topology:
    """The layered test network; ValueError naming the limit when it does not fit the board."""
    sizes = list(options.sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must be two or more positive layer sizes, got {sizes}")
    if len(sizes) - 1 > limits.max_tiles:
        raise ValueError(f"{len(sizes) - 1} tiles needed, the board has {limits.max_tiles}; use fewer layers")
    for k in range(len(sizes) - 1):
        rows, cols = sizes[k] + 1, sizes[k + 1]
        if rows > limits.tile_rows_max or cols > limits.tile_cols_max:
            raise ValueError(
                f"tile W{k} would be {rows} x {cols} (bias row included); the board allows "
                f"{limits.tile_rows_max} x {limits.tile_cols_max}: choose smaller sizes"
            )
    budget = SettleBudget(max_steps=min(200, limits.max_settle_steps), tol=1e-3, dt=0.5, check_every=5)
    return Topology.layered(sizes, budget=budget)


def _lsb(bits: int | None, span: float) -> float:
    return 0.0 if bits is None else span / ((1 << bits) - 1)


def _desc(a: Any) -> str:
    """Shape, dtype and range of an array, in a few characters."""
    arr = np.asarray(a)
    if arr.size == 0:
        return f"{arr.shape} {arr.dtype} empty"
    return f"{arr.shape} {arr.dtype} in [{float(arr.min()):.4g}, {float(arr.max()):.4g}]"


def _expect_array(name: str, a: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise Mismatch(f"{name} is a {type(a).__name__}, not a numpy array")
    if a.shape != shape or a.dtype != np.float32:
        raise Mismatch(f"{name} {a.shape} {a.dtype}, expected {shape} float32")
    if not np.all(np.isfinite(a)):
        raise Mismatch(f"{name} {_desc(a)} holds NaN or infinite values")
    return a


class _Session:
    """Runs the checks in order on one board; keeps what later checks need."""

    def __init__(self, dev: Device, options: Options, report: Report) -> None:
        self.dev = dev
        self.opt = options
        self.report = report
        self.rng = np.random.default_rng(options.seed)
        self.info = dev.info
        self.lim = dev.info.limits
        self.caps = dev.info.capabilities
        self.topo = plan_topology(self.lim, options)
        self.g_range = self.lim.g_max - self.lim.g_min
        lo, hi = self.lim.adc_range
        self.x_lo, self.x_hi = max(lo, -self.lim.clamp_max), min(hi, self.lim.clamp_max)
        self.dac_lsb = _lsb(self.lim.dac_bits, hi - lo)
        self.adc_lsb = _lsb(self.lim.adc_bits, hi - lo)
        self.g: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # tile -> averaged (G+, G-), float64
        self.sigma_g = 0.0  # read noise of one conductance read (siemens)
        self.free_mean: dict[str, np.ndarray] = {}  # free equilibrium averaged over repeats
        self.free_sigma = 0.0  # its noise (std of one settle's states)

    # -- bookkeeping
    def run(self, operation: str, spec: str, body: Callable[[list[str]], str]) -> bool:
        """Run one check; `body` puts what it sends in its list argument and returns what came
        back, or raises Mismatch (any other exception is a failure too)."""
        sent: list[str] = []
        t0 = time.perf_counter()
        try:
            got, status = body(sent), "PASS"
        except Mismatch as exc:
            got, status = str(exc), "FAIL"
        except Exception as exc:  # a foreign board may fail in any way: report it, go on
            got, status = f"raised {type(exc).__name__}: {exc}", "FAIL"
        self.report.checks.append(
            Check(operation, status, "; ".join(sent) or "-", got, spec, time.perf_counter() - t0)
        )
        return status == "PASS"

    def skip(self, capability: str, operation: str, call: Callable[[], object], note: str = "") -> None:
        """An undeclared capability: SKIP its checks, and check that the board refuses it."""
        self.report.checks.append(
            Check(operation, "SKIP", "-", "-", f"{capability!r} not in the declared capabilities{note}")
        )

        def refused(sent: list[str]) -> str:
            sent.append(f"{operation} without {capability!r}")
            try:
                call()
            except NotSupported as exc:
                return f"NotSupported: {exc}"
            raise Mismatch(f"the board ran {operation} although it does not declare {capability!r}")

        self.run(
            f"{operation} refused",
            "an undeclared capability raises NotSupported (error 101; host drivers refuse it first)",
            refused,
        )

    def weights(self, tile: str) -> np.ndarray:
        gp, gm = self.g[tile]
        return self.topo.coupling(tile).w_max * (gp - gm) / self.g_range

    def sigma_w(self) -> float:
        """Read noise of one weight of one conductance read, in weight units (w_max = 1)."""
        return math.sqrt(2.0) * self.sigma_g / self.g_range

    def read_avg(self, tile: str) -> tuple[np.ndarray, np.ndarray, float]:
        """`reads` reads of a tile: mean G+, mean G- (float64) and the pooled read-noise std."""
        reads = [self.dev.read_conductance(tile) for _ in range(self.opt.reads)]
        stack = np.stack([np.stack(r) for r in reads]).astype(np.float64)  # (reads, 2, rows, cols)
        sigma = float(np.sqrt(stack.var(axis=0, ddof=1).mean())) if len(reads) > 1 else 0.0
        mean = stack.mean(axis=0)
        return mean[0], mean[1], sigma

    def inputs(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.uniform(self.x_lo, self.x_hi, shape).astype(np.float32)

    # -- the checks
    def identity(self) -> None:
        def body(sent: list[str]) -> str:
            sent.append("*IDN? (info.identity)")
            ident = self.info.identity
            fields = (ident.manufacturer, ident.model, ident.serial, ident.firmware)
            if not all(isinstance(f, str) and f.strip() for f in fields):
                raise Mismatch(f"fields {fields!r}: one is empty")
            if any("," in f for f in fields):
                raise Mismatch(f"fields {fields!r}: a field contains a comma")
            return ident.idn()

        self.run("identity", "*IDN? -> manufacturer,model,serial,firmware, none empty (IEEE 488.2)", body)

        def limits(sent: list[str]) -> str:
            sent.append("SYST:INFO? (info.limits)")
            lim, bad = self.lim, []
            if not 0 < lim.v_read <= lim.v_read_max:
                bad.append(f"v_read {lim.v_read} V vs v_read_max {lim.v_read_max} V")
            if not 0 <= lim.g_min < lim.g_max:
                bad.append(f"g_min {lim.g_min} >= g_max {lim.g_max} (or negative)")
            for name in ("dac_bits", "adc_bits"):
                bits = getattr(lim, name)
                if bits is not None and not (isinstance(bits, int) and 1 <= bits <= 32):
                    bad.append(f"{name} {bits!r} (None or 1..32)")
            lo, hi = lim.adc_range
            if not lo < hi:
                bad.append(f"adc_range {lim.adc_range} is empty")
            for name in ("tile_rows_max", "tile_cols_max", "max_tiles", "max_settle_steps", "max_pulses"):
                if not getattr(lim, name) >= 1:
                    bad.append(f"{name} {getattr(lim, name)} < 1")
            if not lim.settle_step_s >= 0:
                bad.append(f"settle_step_s {lim.settle_step_s} < 0")
            if bad:
                raise Mismatch("; ".join(bad))
            return (
                f"G [{lim.g_min:.3g}, {lim.g_max:.3g}] S, v_read {lim.v_read} V (max {lim.v_read_max}), "
                f"DAC {lim.dac_bits} / ADC {lim.adc_bits} bits over {lim.adc_range}, tiles "
                f"{lim.max_tiles} x {lim.tile_rows_max}x{lim.tile_cols_max}"
            )

        self.run("limits", "g_min < g_max, sizes >= 1, bits None or 1..32, 0 < v_read <= v_read_max", limits)

        def capabilities(sent: list[str]) -> str:
            sent.append("SYST:INFO? (info.capabilities)")
            unknown = set(self.caps) - set(CAPABILITIES)
            if unknown:
                raise Mismatch(f"unknown names {sorted(unknown)}")
            return ",".join(sorted(self.caps)) or "(none)"

        self.run("capabilities", f"a subset of {', '.join(CAPABILITIES)}", capabilities)

    def configure(self) -> bool:
        def body(sent: list[str]) -> str:
            t = self.topo
            sent.append(
                f"layered {'-'.join(str(n) for n in t.groups.values())} (+bias), "
                f"max_steps {t.budget.max_steps}"
            )
            self.dev.configure(t)
            if self.dev.topology != t:
                raise Mismatch(f"topology read back differs: {self.dev.topology}")
            status = self.dev.status()
            if not isinstance(status, BoardStatus) or not status.configured:
                raise Mismatch(f"status {status} after configure: configured should be True")
            return "topology read back equal; status configured"

        return self.run("configure", "CONF:TOP sets the topology; CONF:TOP? returns it", body)

    def program(self) -> None:
        for c in self.topo.couplings:
            tile = c.tile
            gp, gm = self.targets(c)
            self.run(
                f"program {tile}",
                "G+/G- read back after programming, tile shape, f4; iterations 0 without verify",
                lambda sent, t=tile, a=gp, b=gm: self._program(sent, t, a, b, verify=False),
            )
            if "program_verify" in self.caps:
                self.run(
                    f"program verify {tile}",
                    "verify iterates until |G - target| <= tol (default 2 % of g_max - g_min)",
                    lambda sent, t=tile, a=gp, b=gm: self._program(sent, t, a, b, verify=True),
                )
        if "program_verify" not in self.caps:
            tile = self.topo.couplings[0].tile
            g = np.full(self.topo.tile_shape(tile), self.lim.g_min, np.float32)
            self.skip("program_verify", "program verify", lambda: self.dev.program(tile, g, g, verify=True))

    def targets(self, c: Coupling) -> tuple[np.ndarray, np.ndarray]:
        """Conductance pairs around mid-range for weights in +-0.4 w_max and a bias of +0.5 w_max,
        which keeps most nodes of the test network off the rails of rho (so that the settle
        checks test the drive, not only saturation)."""
        rows, cols = self.topo.tile_shape(c.tile)
        w = self.rng.uniform(-0.4, 0.4, (rows, cols))
        a = 0
        for g in c.rows:
            n = self.topo.size(g)
            if g == BIAS:
                w[a : a + n] = 0.5
            a += n
        mid = self.lim.g_min + 0.5 * self.g_range
        half = 0.5 * w * self.g_range
        return (mid + half).astype(np.float32), (mid - half).astype(np.float32)

    def _program(self, sent: list[str], tile: str, gp: np.ndarray, gm: np.ndarray, *, verify: bool) -> str:
        sent.append(f"{tile} G+ {_desc(gp)}, G- {_desc(gm)}, verify={verify}")
        rep = self.dev.program(tile, gp, gm, verify=verify, max_iters=VERIFY_ITERS)
        if not isinstance(rep, ProgramReport) or rep.tile != tile:
            raise Mismatch(f"report {rep!r} is not a ProgramReport for {tile!r}")
        shape = gp.shape
        _expect_array("report g_plus", rep.g_plus, shape)
        _expect_array("report g_minus", rep.g_minus, shape)
        if not verify and rep.iterations != 0:
            raise Mismatch(f"iterations {rep.iterations} without verify (expected 0)")
        if rep.pulses < 0 or not 0 <= rep.within_tol <= 1 or rep.energy_j < 0 or rep.time_s < 0:
            raise Mismatch(f"report fields out of range: {rep}")
        target = np.stack([gp, gm]).astype(np.float64)
        back = np.stack([rep.g_plus, rep.g_minus]).astype(np.float64)
        err = np.abs(back - target)
        if verify:
            _, _, sigma = self.read_avg(tile)
            tol = 0.02 * self.g_range + 3 * sigma
            within = float((err <= tol).mean())
            got = (
                f"{within:.1%} of devices within tol {tol:.3g} S (2 % of range + 3 sigma read noise); "
                f"{rep.iterations} of max {VERIFY_ITERS} iterations, report within_tol {rep.within_tol:.1%}, "
                f"{rep.pulses} pulses"
            )
            if rep.iterations > VERIFY_ITERS:
                raise Mismatch(got + ": more iterations than max_iters")
            # A board may run out of iterations (one-sided devices, stuck ones); then its report
            # must say that not every device made it.
            if within < VERIFY_FRACTION and not (rep.iterations == VERIFY_ITERS and rep.within_tol < 1):
                raise Mismatch(got + f": < {VERIFY_FRACTION:.0%} within tol before max_iters")
            return got
        mean_err = float(err.mean())
        got = (
            f"read-back {_desc(rep.g_plus)}, mean |G - target| {mean_err / self.g_range:.2%} of range "
            f"(allowed {WRITE_ALLOWANCE:.0%})"
        )
        if mean_err > WRITE_ALLOWANCE * self.g_range:
            raise Mismatch(got)
        return got

    def read_conductance(self) -> None:
        for tile in (c.tile for c in self.topo.couplings):
            self.run(
                f"read_conductance {tile}",
                "one noisy read of (G+, G-) in siemens, tile shape, f4, within [g_min, g_max]",
                lambda sent, t=tile: self._read(sent, t),
            )

    def _read(self, sent: list[str], tile: str) -> str:
        sent.append(f"TILE:COND? {tile!r} x {self.opt.reads}")
        shape = self.topo.tile_shape(tile)
        for name, a in zip(("G+", "G-"), self.dev.read_conductance(tile), strict=True):
            _expect_array(name, a, shape)
            margin = RANGE_MARGIN * self.g_range
            if a.min() < self.lim.g_min - margin or a.max() > self.lim.g_max + margin:
                raise Mismatch(f"{name} {_desc(a)} outside [g_min, g_max] +- {RANGE_MARGIN:.0%} of the range")
        gp, gm, sigma = self.read_avg(tile)
        self.g[tile] = (gp, gm)
        self.sigma_g = max(self.sigma_g, sigma)
        return (
            f"{_desc(gp.astype(np.float32))}, read noise {sigma:.3g} S ({sigma / self.g_range:.2%} of range)"
        )

    def mvm(self) -> None:
        if "mvm" not in self.caps:
            tile = self.topo.couplings[0].tile
            rows, _ = self.topo.tile_shape(tile)
            self.skip("mvm", "mvm", lambda: self.dev.mvm(tile, np.zeros((1, rows), np.float32)))
            return
        tile = self.topo.couplings[0].tile
        spec = "x @ W, W = w_max (G+ - G-) / (g_max - g_min); DAC on x, ADC on the result"
        for transpose in (False, True):
            self.run(
                "mvm transpose" if transpose else "mvm",
                spec.replace("x @ W", "x @ W.T") if transpose else spec,
                lambda sent, tr=transpose: self._mvm(sent, tile, tr),
            )
        self.run(
            "mvm 1-D", "a 1-D x is one sample: y has shape (1, cols)", lambda sent: self._mvm_1d(sent, tile)
        )
        meter = getattr(self.dev, "meter", None)
        if callable(meter):
            self.run(
                "meter",
                "meter() is None, or clock_s and energy_j never fall and mvm_calls counts mvm calls",
                lambda sent: self._meter(sent, tile, meter),
            )

    def _mvm_tolerance(
        self, tile: str, x: np.ndarray, w: np.ndarray, ys: np.ndarray
    ) -> tuple[np.ndarray, str]:
        """Per-output tolerance of ``x @ w`` against repeated board results `ys` (K, B, n)."""
        noise = float(np.sqrt(ys.var(axis=0, ddof=1).mean())) if len(ys) > 1 else 0.0
        ref_noise = self.sigma_w() * np.sqrt(
            (x.astype(np.float64) ** 2).sum(1, keepdims=True) / self.opt.reads
        )
        out_lsb = 0.0
        if self.lim.adc_bits is not None:
            # The mvm ADC's range is not among the limits: its step is the smallest gap between
            # distinct outputs, at most that of an ADC spanning twice the largest possible
            # output (+-rows x w_max x |x|max), so that a coarse reply cannot pass as quantised.
            levels = np.unique(ys.astype(np.float64))
            gaps = np.diff(levels)
            gaps = gaps[gaps > 1e-9 * max(1.0, float(np.abs(levels).max()))]
            full = w.shape[0] * self.topo.coupling(tile).w_max * max(abs(self.x_lo), abs(self.x_hi))
            cap = 2 * _lsb(self.lim.adc_bits, 2 * full)
            out_lsb = min(float(gaps.min()) if gaps.size else 0.0, cap)
        abs_w = np.abs(w)
        tol = (
            4 * noise
            + 4 * ref_noise
            + 2 * out_lsb
            + 0.5 * self.dac_lsb * abs_w.sum(0)
            + GAIN_ALLOWANCE * (np.abs(x) @ abs_w)
        )
        how = (
            f"tol 4 sigma (noise {noise:.3g}, ref {float(ref_noise.max()):.3g}) + 2 ADC LSB ({out_lsb:.3g}) "
            f"+ DAC LSB/2 x sum|W| + {GAIN_ALLOWANCE:.0%} x |x| @ |W|"
        )
        return tol, how

    def _mvm(self, sent: list[str], tile: str, transpose: bool) -> str:
        w = self.weights(tile)
        if transpose:
            w = w.T
        n_in, n_out = w.shape
        x = self.inputs((self.opt.batch, n_in))
        sent.append(f"{tile} x {_desc(x)}, transpose={transpose}, {self.opt.repeats} times")
        ys = []
        for _ in range(self.opt.repeats):
            ys.append(_expect_array("y", self.dev.mvm(tile, x, transpose=transpose), (self.opt.batch, n_out)))
        stack = np.stack(ys).astype(np.float64)
        ref = x.astype(np.float64) @ w
        tol, how = self._mvm_tolerance(tile, x, w, stack)
        err = np.abs(stack.mean(0) - ref)
        worst = float((err - tol).max())
        got = f"y {_desc(ys[0])}, max |y - x @ W| {float(err.max()):.3g}, {how} (min {float(tol.min()):.3g})"
        if worst > 0:
            i = np.unravel_index(int(np.argmax(err - tol)), err.shape)
            raise Mismatch(f"{got}; y{list(map(int, i))} = {stack.mean(0)[i]:.4g}, x @ W = {ref[i]:.4g}")
        return got

    def _mvm_1d(self, sent: list[str], tile: str) -> str:
        rows, cols = self.topo.tile_shape(tile)
        w = self.weights(tile)
        x = self.inputs((rows,))
        sent.append(f"{tile} x {_desc(x)}")
        y = _expect_array("y", self.dev.mvm(tile, x), (1, cols))
        stack = np.stack([self.dev.mvm(tile, x) for _ in range(self.opt.repeats)] + [y]).astype(np.float64)
        tol, how = self._mvm_tolerance(tile, x[None, :], w, stack)
        err = np.abs(y.astype(np.float64) - x.astype(np.float64) @ w)
        got = f"y {_desc(y)}, max |y - x @ W| {float(err.max()):.3g}"
        if float((err - tol).max()) > 0:
            raise Mismatch(f"{got}, {how}")
        return got

    def _meter(self, sent: list[str], tile: str, meter: Callable[[], Any]) -> str:
        rows, _ = self.topo.tile_shape(tile)
        first = meter()
        if first is None:
            sent.append("meter()")
            return "None (the board does not meter)"
        n = 3
        sent.append(f"meter(), {n} mvm calls, meter()")
        x = self.inputs((1, rows))
        for _ in range(n):
            self.dev.mvm(tile, x)
        second = meter()
        if second is None:
            raise Mismatch(f"{first} first, then None")
        if second.clock_s < first.clock_s or second.energy_j < first.energy_j:
            raise Mismatch(f"went backwards: {first} -> {second}")
        if second.mvm_calls - first.mvm_calls != n:
            raise Mismatch(f"mvm_calls {first.mvm_calls} -> {second.mvm_calls} after {n} calls")
        return f"{first} -> {second}"

    # -- settle
    def settle(self) -> None:
        clamp_group = next(iter(self.topo.groups))
        n_in = self.topo.groups[clamp_group]
        if "settle" not in self.caps:
            self.skip(
                "settle",
                "settle",
                lambda: self.dev.settle({clamp_group: np.zeros((1, n_in), np.float32)}),
                " (nor trace or init, which need it)",
            )
            return
        clamp = {clamp_group: self.inputs((self.opt.batch, n_in))}
        free: list[Equilibrium] = []
        ok = self.run(
            "settle free",
            "s = rho(gain * drive), rho = clamp(., 0, 1); states after the ADC; steps <= max_steps",
            lambda sent: self._settle_free(sent, clamp, free),
        )
        last = list(self.topo.groups)[-1]
        if ok:
            self.run(
                "settle nudged",
                "drive of a nudged group + beta (target - s): the group moves toward the target",
                lambda sent: self._settle_nudged(sent, clamp, free[0], last),
            )
        for cap, operation, call in (
            ("trace", "settle trace", lambda sent: self._trace(sent, clamp)),
            ("preset_state", "settle init", lambda sent: self._init(sent, clamp, free)),
        ):
            if cap in self.caps:
                self.run(operation, _SETTLE_SPEC[cap], call)
            elif cap == "trace":
                self.skip(cap, operation, lambda: self.dev.settle(clamp, trace=True))
            else:
                init = {g: np.zeros((self.opt.batch, n), np.float32) for g, n in self.topo.groups.items()}
                self.skip(cap, operation, lambda i=init: self.dev.settle(clamp, init=i))

    def _check_equilibrium(self, eq: Equilibrium, clamp: dict[str, np.ndarray]) -> None:
        if not isinstance(eq, Equilibrium):
            raise Mismatch(f"settle returned a {type(eq).__name__}, not an Equilibrium")
        b = self.opt.batch
        lo, hi = self.lim.adc_range
        if set(eq.states) != set(self.topo.groups):
            raise Mismatch(f"states for {sorted(eq.states)}, expected every group {sorted(self.topo.groups)}")
        for g, n in self.topo.groups.items():
            s = _expect_array(f"state {g!r}", eq.states[g], (b, n))
            if g not in clamp and (s.min() < lo - 1e-6 or s.max() > hi + 1e-6):
                raise Mismatch(f"state {g!r} {_desc(s)} outside the ADC range {self.lim.adc_range}")
        if not 1 <= eq.steps <= self.topo.budget.max_steps:
            raise Mismatch(f"steps {eq.steps} outside 1..max_steps {self.topo.budget.max_steps}")
        if eq.energy is not None:
            _expect_array("energy", eq.energy, (b,))
        if not (eq.settle_time_s >= 0 and eq.energy_j >= 0):
            raise Mismatch(f"settle_time_s {eq.settle_time_s}, energy_j {eq.energy_j}: must be >= 0")
        if not eq.converged:
            raise Mismatch(
                f"not converged after {eq.steps} steps (residual {eq.residual:.3g}) on a tiny network "
                f"with tol {self.topo.budget.tol}"
            )

    def _settle_repeats(
        self, clamp: dict[str, np.ndarray], nudge: dict[str, Nudge] | None = None
    ) -> tuple[list[Equilibrium], dict[str, np.ndarray], float]:
        eqs = [self.dev.settle(clamp, nudge=nudge) for _ in range(self.opt.repeats)]
        for eq in eqs:
            self._check_equilibrium(eq, clamp)
        mean = {g: np.mean([e.states[g] for e in eqs], axis=0, dtype=np.float64) for g in self.topo.groups}
        free = [g for g in self.topo.groups if g not in clamp]
        sigma = 0.0
        if len(eqs) > 1:
            var = [np.var([e.states[g] for e in eqs], axis=0, ddof=1).mean() for g in free]
            sigma = float(np.sqrt(np.mean(var)))
        return eqs, mean, sigma

    def _fixed_point(
        self,
        states: dict[str, np.ndarray],
        clamp: dict[str, np.ndarray],
        sigma_s: float,
        residual: float,
        nudge: dict[str, Nudge] | None = None,
    ) -> str:
        """Compare the free states with rho(gain * drive) computed on the host from the averaged
        conductances; raise Mismatch naming the worst node."""
        topo, b = self.topo, self.opt.batch
        drive = {g: np.zeros((b, n)) for g, n in topo.groups.items()}
        scale = {g: np.zeros((b, n)) for g, n in topo.groups.items()}  # |s| @ |W|
        wsum = {g: np.zeros(n) for g, n in topo.groups.items()}  # sum |W| over the sources
        ref_var = {g: np.zeros((b, 1)) for g in topo.groups}
        ones = np.ones((b, 1))
        sw2 = self.sigma_w() ** 2 / self.opt.reads
        for c in topo.couplings:
            w = self.weights(c.tile)
            rows = np.concatenate([ones if g == BIAS else states[g] for g in c.rows], axis=1)
            cols = np.concatenate([states[g] for g in c.cols], axis=1)
            for src, mat, dsts in ((rows, w, c.cols), (cols, w.T, c.rows)):
                out, absout, a = src @ mat, np.abs(src) @ np.abs(mat), 0
                for g in dsts:
                    n = topo.size(g)
                    if g != BIAS:
                        drive[g] += out[:, a : a + n]
                        scale[g] += absout[:, a : a + n]
                        wsum[g] += np.abs(mat[:, a : a + n]).sum(0)
                        ref_var[g] += sw2 * (c.w_max**2) * (src**2).sum(1, keepdims=True)
                    a += n
        worst, detail = -np.inf, ""
        dt = topo.budget.dt
        for g in topo.groups:
            if g in clamp:
                continue
            u = drive[g]
            nd = (nudge or {}).get(g)
            if nd is not None and nd.target is not None:
                u = u + nd.beta * (nd.target - states[g])
            pred = np.clip(topo.gain * u, 0.0, 1.0)
            tol = (
                topo.gain
                * (
                    GAIN_ALLOWANCE * scale[g]
                    + 0.5 * (self.dac_lsb + self.adc_lsb) * wsum[g]
                    + 4 * np.sqrt(ref_var[g])
                    + 4 * sigma_s * wsum[g]
                )
                + GAIN_ALLOWANCE * np.abs(states[g])
                + 2 * self.adc_lsb
                + 4 * sigma_s
                + residual / dt
            )
            excess = np.abs(states[g] - pred) - tol
            if float(excess.max()) > worst:
                i = np.unravel_index(int(np.argmax(excess)), excess.shape)
                worst = float(excess.max())
                detail = (
                    f"{g}[{i[0]}, {i[1]}] = {states[g][i]:.4g}, rho(gain * drive) = {pred[i]:.4g}, "
                    f"tol {tol[i]:.3g}"
                )
        text = (
            f"worst node {detail} (tol: 4 sigma noise {sigma_s:.3g} and conductance reads, "
            f"{GAIN_ALLOWANCE:.0%} gain, DAC/ADC LSBs, residual / dt)"
        )
        if worst > 0:
            raise Mismatch(f"not a fixed point: {text}")
        return text

    def _settle_free(self, sent: list[str], clamp: dict[str, np.ndarray], out: list[Equilibrium]) -> str:
        ((g, x),) = clamp.items()
        sent.append(f"clamp {g} {_desc(x)}, {self.opt.repeats} times")
        eqs, mean, sigma = self._settle_repeats(clamp)
        out.append(eqs[0])
        self.free_mean, self.free_sigma = mean, sigma
        residual = max(e.residual for e in eqs)
        text = self._fixed_point(mean, clamp, sigma, residual)
        steps = [e.steps for e in eqs]
        return f"steps {min(steps)}..{max(steps)}, converged; {text}"

    def _settle_nudged(
        self, sent: list[str], clamp: dict[str, np.ndarray], free: Equilibrium, group: str
    ) -> str:
        s_free = free.states[group]
        target = np.where(s_free > 0.5 * sum(self.lim.adc_range), self.x_lo, self.x_hi).astype(np.float32)
        beta = 0.5
        nudge = {group: Nudge(beta, target=target)}
        sent.append(
            f"clamp as free, nudge {group} beta {beta} toward {_desc(target)} (away from the free state)"
        )
        eqs, mean, sigma = self._settle_repeats(clamp, nudge)
        before = float(np.abs(self.free_mean[group] - target).mean())
        after = float(np.abs(mean[group] - target).mean())
        moved = f"mean |s - target| {before:.3g} free -> {after:.3g} nudged"
        if not after < before - 2 * sigma - self.adc_lsb:
            raise Mismatch(f"{moved}: did not move toward the target")
        residual = max(e.residual for e in eqs)
        text = self._fixed_point(mean, clamp, sigma, residual, nudge)
        return f"{moved}; {text}"

    def _trace(self, sent: list[str], clamp: dict[str, np.ndarray]) -> str:
        every = 2
        sent.append(f"settle with trace=True and trace={every}")
        b = self.opt.batch
        for trace in (True, every):
            eq = self.dev.settle(clamp, trace=trace)
            self._check_equilibrium(eq, clamp)
            tr = eq.trace
            if not isinstance(tr, dict) or "step" not in tr:
                raise Mismatch(f"trace={trace!r}: no trace with 'step' in the equilibrium")
            step = np.asarray(tr["step"])
            t = step.shape[0] if step.ndim == 1 else -1
            if t < 1 or np.any(np.diff(step) <= 0) or int(step[-1]) != eq.steps:
                raise Mismatch(f"trace={trace!r}: step {step.tolist()} must rise to steps {eq.steps}")
            if trace is not True and np.any(step[:-1] % every):
                raise Mismatch(f"trace={every}: steps {step.tolist()} are not multiples of {every}")
            if "energy" in tr and np.shape(tr["energy"]) != (t, b):
                raise Mismatch(f"trace energy {np.shape(tr['energy'])}, expected {(t, b)}")
            for g, n in self.topo.groups.items():
                if g in clamp:
                    continue
                if g not in tr or np.shape(tr[g]) != (t, b, n):
                    raise Mismatch(f"trace of {g!r}: {np.shape(tr.get(g))}, expected {(t, b, n)}")
        return f"{t} records over {eq.steps} steps, every {every}: shapes (T,), (T, B), (T, B, n)"

    def _init(self, sent: list[str], clamp: dict[str, np.ndarray], free: list[Equilibrium]) -> str:
        if not free:
            raise Mismatch("no free equilibrium to start from (settle free failed)")
        init = {g: s for g, s in free[0].states.items() if g not in clamp}
        sent.append("settle from init = a free equilibrium")
        eq = self.dev.settle(clamp, init=init)
        self._check_equilibrium(eq, clamp)
        states = {g: eq.states[g].astype(np.float64) for g in self.topo.groups}
        text = self._fixed_point(states, clamp, self.free_sigma, eq.residual)
        return f"{eq.steps} steps (from zero: {free[0].steps}); {text}"

    # -- pulse
    def pulse(self) -> None:
        tile = self.topo.couplings[-1].tile
        shape = self.topo.tile_shape(tile)
        if "pulse" not in self.caps:
            z = np.zeros(shape, np.int32)
            self.skip("pulse", "pulse", lambda: self.dev.pulse(tile, z, z))
            return
        n = min(self.opt.pulses, self.lim.max_pulses)
        mid = np.full(shape, self.lim.g_min + 0.5 * self.g_range, np.float32)
        spec = "signed counts per device: positive potentiates (G up), negative depresses, zero leaves G"
        ok = self.run(
            "pulse setup",
            "program to mid-range (verify if declared) before pulsing",
            lambda sent: self._program_mid(sent, tile, mid),
        )
        if not ok:
            return
        for name, sign in (("pulse +", 1), ("pulse -", -1), ("pulse 0", 0)):
            self.run(name, spec, lambda sent, s=sign: self._pulse(sent, tile, s * n))

    def _program_mid(self, sent: list[str], tile: str, mid: np.ndarray) -> str:
        sent.append(f"{tile} G+ = G- = {float(mid.flat[0]):.3g} S")
        rep = self.dev.program(tile, mid, mid, verify="program_verify" in self.caps)
        return f"residual_max {rep.residual_max:.3g} S"

    def _pulse(self, sent: list[str], tile: str, count: int) -> str:
        shape = self.topo.tile_shape(tile)
        cp = np.full(shape, count, np.int32)
        sent.append(f"{tile} counts+ {count}, counts- {-count} on every device")
        gp0, gm0, _ = self.read_avg(tile)
        rep = self.dev.pulse(tile, cp, -cp)
        total = 2 * abs(count) * cp.size
        if rep.tile != tile or not 0 <= rep.pulses <= total or rep.energy_j < 0 or rep.time_s < 0:
            raise Mismatch(f"report {rep} (pulses must be within 0..{total})")
        gp1, gm1, _ = self.read_avg(tile)
        dp, dm = float((gp1 - gp0).mean()), float((gm1 - gm0).mean())
        noise = 4 * self.sigma_g * math.sqrt(2.0 / (self.opt.reads * cp.size))
        got = (
            f"mean dG+ {dp / self.g_range:+.3%}, dG- {dm / self.g_range:+.3%} of range "
            f"(noise bound {noise / self.g_range:.3%}); {rep.pulses} pulses"
        )
        if count == 0:
            still = 0.01 * self.g_range + noise  # 1 % of the range: drift between the reads
            if rep.pulses != 0 or abs(dp) > still or abs(dm) > still:
                raise Mismatch(got + f"; zero counts must leave G (within {still / self.g_range:.2%}) "
                               "and apply no pulses")  # fmt: skip
            return got
        up, down = (dp, dm) if count > 0 else (dm, dp)
        if not (up > noise and down < -noise):
            raise Mismatch(got + ": positive counts must raise G, negative lower it")
        return got

    # -- errors, safety, status
    def errors(self) -> None:
        tile = self.topo.couplings[0].tile
        shape = self.topo.tile_shape(tile)
        self.run(
            "unknown tile",
            "unknown tile: error 100, ConfigurationError",
            lambda sent: self._refuses(sent, ConfigurationError, "read_conductance('no-such-tile')",
                                       lambda: self.dev.read_conductance("no-such-tile")),
        )  # fmt: skip
        self.run(
            "bad shape",
            "an array that does not fit the tile: error 100, ConfigurationError",
            lambda sent: self._refuses(
                sent,
                ConfigurationError,
                f"program {tile} with a {shape[0] + 1} x {shape[1]} target",
                lambda: self.dev.program(
                    tile, *(np.full((shape[0] + 1, shape[1]), self.lim.g_min, np.float32),) * 2
                ),
            ),
        )
        self.run(
            "limit conductance",
            "targets outside [g_min, g_max] are refused before anything is sent (LimitViolation)",
            lambda sent: self._limit(
                sent,
                f"program {tile} G+ = g_max + 50 % of the range",
                lambda: self.dev.program(
                    tile,
                    np.full(shape, self.lim.g_max + 0.5 * self.g_range, np.float32),
                    np.full(shape, self.lim.g_min, np.float32),
                ),
            ),
        )
        big = np.float32(2 * self.lim.clamp_max)
        if "mvm" in self.caps:
            self.run(
                "limit mvm input",
                "inputs beyond clamp_max = v_read_max / v_read are refused (LimitViolation)",
                lambda sent: self._limit(
                    sent,
                    f"mvm x = 2 clamp_max = {big:.3g}",
                    lambda: self.dev.mvm(tile, np.full((1, shape[0]), big)),
                ),
            )
        if "settle" in self.caps:
            g0, n0 = next(iter(self.topo.groups.items()))
            self.run(
                "limit clamp",
                "clamps beyond clamp_max = v_read_max / v_read are refused (LimitViolation)",
                lambda sent: self._limit(
                    sent,
                    f"settle clamp = 2 clamp_max = {big:.3g}",
                    lambda: self.dev.settle({g0: np.full((1, n0), big)}),
                ),
            )
        self.run(
            "error queue",
            "after an error the queue is drained: the next operation succeeds",
            lambda sent: self._after_error(sent, tile),
        )

    def _refuses(self, sent: list[str], kind: type[Exception], what: str, call: Callable[[], object]) -> str:
        sent.append(what)
        try:
            call()
        except kind as exc:
            return f"{type(exc).__name__}: {exc}"
        raise Mismatch(f"no {kind.__name__}: the board accepted it")

    def _limit(self, sent: list[str], what: str, call: Callable[[], object]) -> str:
        before = self.dev.safety()
        got = self._refuses(sent, LimitViolation, what, call)
        after = self.dev.safety()
        if after.refused != before.refused + 1:
            raise Mismatch(f"{got}; safety().refused {before.refused} -> {after.refused}, expected +1")
        if after.violations != 0:
            raise Mismatch(f"{got}; safety().violations {after.violations}, must stay 0")
        return f"{got}; refused {before.refused} -> {after.refused}, violations 0"

    def _after_error(self, sent: list[str], tile: str) -> str:
        query = getattr(self.dev, "query", None)
        extra = ""
        if callable(query) and self.report.uri.startswith("visa://"):
            # the SCPI queue itself: a board-side error, read and drained with SYST:ERR?
            sent.append(f'TILE:COND? "no-such-tile"; SYST:ERR? until 0; read_conductance({tile!r})')
            query('TILE:COND? "no-such-tile"')
            first = str(query("SYST:ERR?")).strip()
            if not first.startswith("100,"):
                raise Mismatch(f'SYST:ERR? after an unknown tile gave {first!r}, expected 100,"..."')
            rest = [str(query("SYST:ERR?")).strip() for _ in range(2)]
            if not rest[0].startswith("0,"):
                raise Mismatch(f'SYST:ERR? gave {rest} after the one error was read; expected 0,"No error"')
            extra = f"SYST:ERR? {first!r} then {rest[0]!r}; "
        else:
            sent.append(f"read_conductance('no-such-tile'), then read_conductance({tile!r})")
            with contextlib.suppress(ConfigurationError):
                self.dev.read_conductance("no-such-tile")
        gp, _ = self.dev.read_conductance(tile)
        _expect_array("G+", gp, self.topo.tile_shape(tile))
        return f"{extra}next read {_desc(gp)}"

    def status_reset(self) -> None:
        tag = "conformance"
        self.run("transaction", "BEGIN keeps its tag in status() until COMMIT (optional)",
                 lambda sent: self._transaction(sent, tag))  # fmt: skip
        self.run(
            "reset",
            "*RST clears the topology (conductances are non-volatile); the epoch changes",
            self._reset,
        )
        self.run("safe_state", "SYST:SAFE: all lines to 0 V, nothing in flight", self._safe)
        self.run("safety counters", "violations (out-of-limit conditions at the array) stay 0", self._safety)

    def _transaction(self, sent: list[str], tag: str) -> str:
        sent.append(f"begin({tag!r}), status(), commit({tag!r}), status()")
        self.dev.begin(tag)
        during = self.dev.status()
        self.dev.commit(tag)
        after = self.dev.status()
        for s in (during, after):
            if not isinstance(s, BoardStatus):
                raise Mismatch(f"status() returned {s!r}, not a BoardStatus")
        if during.transaction is None and after.transaction is None:
            return "not recorded (the board has no STATUS: no transactions)"
        if during.transaction != tag or after.transaction is not None:
            raise Mismatch(
                f"transaction {during.transaction!r} while open, {after.transaction!r} after commit"
            )
        return f"{tag!r} while open, None after commit"

    def _reset(self, sent: list[str]) -> str:
        tile = self.topo.couplings[0].tile
        sent.append(f"status(), reset(), status(), configure again, read {tile}")
        before = self.dev.status()
        gp0, gm0, _ = self.read_avg(tile)
        self.dev.reset()
        after = self.dev.status()
        if self.dev.topology is not None or after.configured:
            raise Mismatch(f"after reset: topology {self.dev.topology}, status {after}")
        epoch = f"epoch {before.epoch} -> {after.epoch}"
        if before.epoch == after.epoch and (before.epoch != 0 or before.transaction is not None):
            raise Mismatch(f"{epoch}: a reset must change the epoch")
        self.dev.configure(self.topo)
        gp1, gm1, _ = self.read_avg(tile)
        d = float(max(np.abs(gp1 - gp0).max(), np.abs(gm1 - gm0).max()))
        allowed = 0.02 * self.g_range + 6 * self.sigma_g
        got = f"{epoch}; topology cleared; conductances moved {d:.3g} S (allowed {allowed:.3g})"
        if d > allowed:
            raise Mismatch(got + ": conductances must survive a reset")
        return got

    def _safe(self, sent: list[str]) -> str:
        sent.append("safe_state(), status()")
        self.dev.safe_state()
        status = self.dev.status()
        return f"done; status {status}"

    def _safety(self, sent: list[str]) -> str:
        sent.append("safety()")
        s = self.dev.safety()
        if s.violations != 0:
            raise Mismatch(f"violations {s.violations}")
        return f"refused {s.refused}, violations 0"


_SETTLE_SPEC = {
    "trace": "trace: 'step' (T,) rising to steps, 'energy' (T, B), each free group (T, B, n)",
    "preset_state": "settle from init (preset states) ends at a fixed point s = rho(gain * drive)",
}


def run_conformance(dev: Device, uri: str = "", options: Options | None = None) -> Report:
    """Check `dev` against the spec; the board ends in its safe state (not closed).

    ValueError when the test network does not fit the board's limits (see `plan_topology`)."""
    options = options or Options()
    report = Report(uri=uri, identity=dev.info.identity.idn())
    t0 = time.perf_counter()
    session = _Session(dev, options, report)
    try:
        session.identity()
        if session.configure():
            session.program()
            session.read_conductance()
            session.mvm()
            session.settle()
            session.pulse()
            session.errors()
            session.status_reset()
    finally:
        try:
            dev.safe_state()
        finally:
            report.wall_s = time.perf_counter() - t0
    return report
