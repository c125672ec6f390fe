"""What every check needs: the options, the test network, the tolerances' constants, and
the `Session` that runs one check at a time and keeps what later checks need."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from drivers.base import Device, Equilibrium, Limits, Nudge, ProgramReport
from drivers.checks import (
    check_line_current,
    check_mvm_lines,
    check_program_lines,
    check_settle_lines,
    check_topology,
)
from drivers.converters import lsb
from drivers.errors import (
    ConfigurationError,
    DeviceError,
    DeviceTimeout,
    LimitViolation,
    NotSupported,
    RetriesExhausted,
)
from drivers.topology import BIAS, Coupling, SettleBudget, Topology
from hil.conformance.report import Check, Mismatch, Report

# Relative allowance for the converters' per-channel gain errors (uncalibrated boards: the
# analog-AI literature and the emulator's presets have ~1 % per converter; 5 % is 3 sigma of
# a DAC and an ADC in series, with room).
GAIN_ALLOWANCE = 0.05
# Systematic deviation of settled states from rho(gain * drive), averaged over the nodes off
# the rails, as a fraction of the ADC range: uncalibrated converter gains (~1 %) and offsets
# (~half an LSB) on states around 0.5, with room.
SYSTEMATIC = 0.02
# Without write-verify the spec promises no tolerance; a plain write must still land near
# its target: mean |G - target| within this fraction of the conductance range.
WRITE_ALLOWANCE = 0.10
# Read-backs may fall outside [g_min, g_max] by read noise and device-to-device bounds.
RANGE_MARGIN = 0.05
# Fraction of a verified tile's devices that must end within tol (stuck devices exist).
VERIFY_FRACTION = 0.9
VERIFY_ITERS = 20  # max_iters of the verified writes


# Errors after which the board is not answering: the remaining checks would each wait for
# the link's timeout and retry budget, so they are not run.
LINK_LOST = (DeviceTimeout, RetriesExhausted)


class LinkLost(Exception):
    """The board stopped answering during the check named by the message."""


class Unavailable(Exception):
    """A check's own network, within every limit the board declares, was refused by the board as a
    configuration error (100), not as past a declared limit (-222): it lacks a resource the
    protocol gives it no limit to declare (converter channels: a tile of R x C needs R + C of
    them on an emulated board). The check is SKIPPED with the board's words, not FAILED: the host
    cannot know the count, so it cannot tell such a refusal from a fault; one as -222 it can."""


class OverLimit(Unavailable):
    """A check's own request, which goes out unchecked (past the host driver's checks, to test
    something else of the board: fragments, request ids, the voltage limit's edge), is over the
    line-current limit the board declares by the host's own bound, so the checked path would
    refuse it: it is not sent, and the check is SKIPPED naming the limit. Only the limit probes
    go past a limit, and only when asked (`Options.limit_probes`): a board whose firmware lacks
    the line-current check would drive the line past its rating."""


class NetworkOverLimit(Unavailable):
    """One of the test network's own requests (an mvm or a settle of the suite's inputs, or a
    program of its tiles' targets, through the checked path) is over the line-current limit the
    board declares by the host's bound (every device at g_max, `drivers.checks.check_mvm_lines` /
    `check_settle_lines`; a program's reads from its targets, `check_program_lines`), and was
    refused as such: by a remote driver before anything was sent, by the in-process board from
    the conductances it holds. A board that declares a limit this low cannot run the test
    network, which says nothing of its firmware: the check is SKIPPED naming the limit and the
    fix (a smaller --sizes), not FAILED. `what`: the request that was not sent."""

    def __init__(self, message: str, what: str, by: str = "host") -> None:
        super().__init__(message)
        self.what = what
        # who refused it: "host" (a remote driver's check, nothing sent), "board" (the in-process
        # board's own check), "remote board" (sent, and refused by the board's own check)
        self.by = by


class Needs(Unavailable):
    """A check that needs what an earlier check was to leave (a tile programmed to the test
    network's targets, a tile at mid-range before pulsing) when that check was SKIPPED as
    `NetworkOverLimit`: SKIPPED too, naming the check it needs and why that one was not run."""


NO_PROBES = (
    "not sent (limit probes off; --limit-probes sends them): a request past the limit, which only "
    "the board's own check stops, so the board's check of it is unverified (in Python: "
    "Options(limit_probes=True))"
)


def probes_by_default(uri: str) -> bool:
    """Whether the past-limit probes go out when nobody said (`Options.limit_probes` None, no
    --limit-probes / --no-limit-probes): only to the in-process emulator (an ``emulator://``
    URI), the one board known not to be a chip. A remote board's identity is what its firmware
    says, and the emulator's is the example in docs/protocol.md, so it tells no emulator from a
    firmware that copied it; a board given without a URI is not known to be the emulator."""
    return uri.partition("://")[0].strip().lower() == "emulator"


@dataclass(frozen=True)
class Options:
    sizes: tuple[int, ...] = (5, 4, 3)  # layered network, input first (a bias row per tile)
    batch: int = 4  # samples per settle (an mvm takes at least 16)
    reads: int = 8  # conductance reads averaged for the reference weights
    repeats: int = 4  # repeats of an mvm or settle to measure its noise
    pulses: int = 10  # pulse count per device (capped by limits.max_pulses)
    seed: int = 0
    # send the probes past a limit that only the board's own check stops (a device one float32
    # step past g_max, an mvm input one step past clamp_max, a line 1 % and 20 % over its
    # current limit); False: SKIP them, for a board whose devices may not take one; None: on
    # only for an emulator:// URI (`probes_by_default`), as `hil conformance` does unasked
    limit_probes: bool | None = None

    def mvm_batch(self, limits: Limits) -> int:
        """Samples of an mvm check: `batch`, at least 16 (their noise averages), at most the
        board's `max_batch` (a board that declares fewer takes no more in one request)."""
        return min(max(16, self.batch), limits.max_batch)


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
    if options.batch > limits.max_batch:
        raise ValueError(
            f"a batch of {options.batch} samples per settle; the board takes at most max_batch "
            f"{limits.max_batch} per request: choose --batch {limits.max_batch} or fewer"
        )
    # convergence is checked first after 20 steps: a settle that stops on its noise floor after a
    # few steps would still lag its fixed point (by dt^steps of the distance from the start)
    budget = SettleBudget(max_steps=200, tol=1e-3, dt=0.5, check_every=20).capped(limits.max_settle_steps)
    gain, w_max = limits.unit_scales
    return Topology.layered(sizes, budget=budget, gain=gain, w_max=w_max)


def desc(a: Any) -> str:
    """Shape, dtype and range of an array, in a few characters."""
    arr = np.asarray(a)
    if arr.size == 0:
        return f"{arr.shape} {arr.dtype} empty"
    return f"{arr.shape} {arr.dtype} in [{float(arr.min()):.4g}, {float(arr.max()):.4g}]"


def expect_array(name: str, a: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise Mismatch(f"{name} is a {type(a).__name__}, not a numpy array")
    if a.shape != shape or a.dtype != np.float32:
        raise Mismatch(f"{name} {a.shape} {a.dtype}, expected {shape} float32")
    if not np.all(np.isfinite(a)):
        raise Mismatch(f"{name} {desc(a)} holds NaN or infinite values")
    return a


class Session:
    """Runs the checks in order on one board; keeps what later checks need."""

    def __init__(
        self, dev: Device, options: Options, report: Report, on_check: Callable[[Check], None] | None = None
    ) -> None:
        self.dev = dev
        self.on_check = on_check
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
        self.dac_lsb = lsb(self.lim.dac_bits, hi - lo)
        self.adc_lsb = lsb(self.lim.adc_bits, hi - lo)
        self.g: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # tile -> averaged (G+, G-), float64
        self.sigma_g = 0.0  # read noise of one conductance read (siemens)
        self.free_mean: dict[str, np.ndarray] = {}  # free equilibrium averaged over repeats
        self.free_sigma = 0.0  # its noise (std of one settle's states)
        self.has_status = False  # the board keeps STATUS (it recorded a transaction)
        # checks SKIPPED as `NetworkOverLimit` -> why: the checks that need them are SKIPPED too
        self.not_run: dict[str, str] = {}
        # requests of the running check that went out before one of its own was refused on the
        # host (`own_request` counts its own; a check counts others it sends first): the report's
        # "sent" column says what went out, not what the check planned
        self.requests_out = 0

    def configure_own(self, topo: Topology) -> None:
        """Configure a check's own network (within every declared limit: the host's copy of the
        board's checks passes it first, a planning mistake of the suite raises as it is). A board
        that refuses it as a configuration error (100) lacks an undeclared resource for it:
        `Unavailable`, the check SKIPPED with the board's words. Its other refusals (-222 for a
        limit that the network is within) are the check's FAIL, raised as they are."""
        check_topology(topo, self.lim)
        try:
            self.dev.configure(topo)
        except ConfigurationError as exc:
            nodes = sum(topo.groups.values())
            tiles = [f"{c.tile} {'x'.join(map(str, topo.tile_shape(c.tile)))}" for c in topo.couplings]
            shapes = ", ".join(tiles) if len(tiles) <= 3 else f"{len(tiles)} tiles"
            raise Unavailable(
                f"the board refused this check's network ({nodes} nodes; {shapes}), which is within every "
                f"limit it declares, as a configuration error (100), not as past a declared limit (-222): "
                f"{exc}. It lacks a resource the protocol has no limit for (e.g. converter channels: one per "
                "node the tiles drive at once), which the host cannot know: SKIPPED, unchecked on this board"
            ) from exc

    @contextlib.contextmanager
    def configured(self, topo: Topology) -> Iterator[None]:
        """Inside, the board has `topo` (a check's own network, `configure_own`); after, the test
        network again, for the checks that follow (a board that fails to take it back is left to
        them)."""
        try:
            self.configure_own(topo)
            yield
        finally:
            with contextlib.suppress(DeviceError):
                self.dev.configure(self.topo)

    # -- the host's own checks on a request a check sends unchecked

    def program_lines_within(self, tile: str, g_plus: np.ndarray, g_minus: np.ndarray) -> None:
        """`OverLimit` when the reads of a program of these targets would carry more than the
        declared line current (`drivers.checks.check_program_lines`, as the checked path)."""
        try:
            check_program_lines(self.lim, tile, g_plus, g_minus)
        except LimitViolation as exc:
            raise OverLimit(f"not sent: {exc} (a request the host's own check refuses)") from exc

    def mvm_lines_within(self, topo: Topology, tile: str, x: np.ndarray, transpose: bool) -> None:
        """`OverLimit` when an mvm of `x` through `tile` of `topo` could carry more than the
        declared line current by the host's bound (`drivers.checks.check_mvm_lines`)."""
        try:
            check_mvm_lines(topo, self.lim, tile, x, float(np.abs(x).max(initial=0.0)), transpose)
        except LimitViolation as exc:
            raise OverLimit(f"not sent: {exc} (a request the host's own check refuses)") from exc

    # -- the test network's own mvms and settles, within the declared line-current limit

    def own_mvm(self, tile: str, x: np.ndarray, transpose: bool = False) -> np.ndarray:
        """``dev.mvm`` of one of the suite's inputs; `NetworkOverLimit` (SKIP) when it is refused
        as over the line-current limit and the host's bound puts it there (`own_request`)."""
        arr = np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1])
        peak = float(np.abs(arr).max(initial=0.0))
        return self.own_request(
            lambda: self.dev.mvm(tile, x, transpose=transpose),
            lambda: check_mvm_lines(self.topo, self.lim, tile, arr, peak, transpose),
            f"an mvm through {tile}",
        )

    def own_settle(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        """``dev.settle`` of the test network (`own_request`, as `own_mvm`)."""
        return self.own_request(
            lambda: self.dev.settle(clamp, nudge=nudge, init=init, trace=trace),
            lambda: check_settle_lines(self.topo, self.lim, clamp, init or {}),
            "a settle",
        )

    def own_program(self, tile: str, g_plus: np.ndarray, g_minus: np.ndarray, **kw: Any) -> ProgramReport:
        """``dev.program`` of targets of the suite's own (the test network's tiles, a check's
        levels on them); `NetworkOverLimit` (SKIP) when it is refused as over the line-current
        limit and the host's check of its reads from the targets puts it there (`own_request`)."""
        return self.own_request(
            lambda: self.dev.program(tile, g_plus, g_minus, **kw),
            lambda: check_program_lines(self.lim, tile, g_plus, g_minus),
            f"a program of {tile}",
            "check",
        )

    def own_read(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
        """``dev.read_conductance`` of a tile (`own_request`): the board checks a read's rows from
        the conductances it holds, which pulses move; the host's bound, for a tile of the test
        network, is every device of a row at g_max (a check's own tile: a refusal is raised)."""

        def bound() -> None:
            if tile in {c.tile for c in self.topo.couplings}:
                cols = self.topo.tile_shape(tile)[1]
                check_line_current(
                    f"a row of {tile!r} (read at v_read {self.lim.v_read:g} V, every device at g_max "
                    f"{self.lim.g_max:g} S (the host's bound))",
                    self.lim.v_read * cols * self.lim.g_max,
                    self.lim,
                )

        return self.own_request(lambda: self.dev.read_conductance(tile), bound, f"a read of {tile}")

    def needs(self, operation: str) -> None:
        """`Needs` (SKIP) when the check `operation` was SKIPPED as `NetworkOverLimit`."""
        if operation in self.not_run:
            raise Needs(f"needs {operation}, which was SKIPPED: {self.not_run[operation]}")

    def own_request(
        self, call: Callable[[], Any], bound: Callable[[], None], what: str, how: str = "bound"
    ) -> Any:
        """`call` (one of the test network's requests); when it raises `LimitViolation` and the
        host's line-current `bound` of the same request raises too, `NetworkOverLimit` naming the
        limit and the fix. A refusal of a request within the host's bound is the board's: raised
        as it is (a FAIL)."""
        try:
            result = call()
        except LimitViolation as exc:
            try:
                bound()
            except LimitViolation as over:
                raise NetworkOverLimit(
                    self.network_over_limit(what, over, how), what, self._refused_by(exc)
                ) from exc
            raise
        self.requests_out += 1
        return result

    def _refused_by(self, exc: LimitViolation) -> str:
        """Whose check refused `exc`'s request (`NetworkOverLimit.by`): a remote driver marks its
        own refusals (nothing sent); an in-process board (no wire: no ``send_unchecked``) refuses
        by its own check, as a remote board does one that went out."""
        if exc.sent is False:
            return "host"
        return "remote board" if callable(getattr(self.dev, "send_unchecked", None)) else "board"

    def network_over_limit(self, what: str, over: LimitViolation, how: str = "bound") -> str:
        """Why the test network's `what` is not run, and the --sizes that fit the declared limit."""
        lim = self.lim
        peak = max(abs(self.x_lo), abs(self.x_hi), abs(lim.adc_range[0]), abs(lim.adc_range[1]), 1.0)
        # by the host's bound a line carries at most (devices on it) x g_max x v_read x peak: a
        # tile fits when neither its rows (bias row included) nor its columns outnumber `most`
        per = lim.g_max * lim.v_read * peak
        most = math.floor(lim.max_line_current_a / per * (1.0 + 1e-12)) if per > 0 else 0
        sizes = ",".join(map(str, self.opt.sizes))
        if most >= 2:
            fit = ",".join(str(min(s, most - 1)) for s in self.opt.sizes)
            fix = (
                f"to check it on this board, run a test network of at most {most - 1} nodes a layer: "
                f"hil conformance --sizes {fit} (Options(sizes=({fit},)))"
            )
        else:
            fix = "no layered test network fits this limit (one device at g_max at full scale is over it)"
        return (
            f"not run: {what} of the test network ({sizes}) is over the board's declared max_line_current_a "
            f"{lim.max_line_current_a:g} A by the host's {how} ({over.limit}: {over.value:.4g} A), so it was "
            f"refused before reaching a line (nothing driven); the limit is below what this network needs, "
            f"which says nothing of the board; {fix}"
        )

    def sent_before(self, exc: NetworkOverLimit | Needs, planned: list[str]) -> str:
        """The "sent" column of a check SKIPPED as `NetworkOverLimit` or `Needs`: what went out
        before it stopped (its planned requests did not, from the one refused on)."""
        n = self.requests_out
        # an in-process board is called, not sent to: its requests ran (or were refused) in this process
        verb = "run" if not callable(getattr(self.dev, "send_unchecked", None)) else "sent"
        gone = f"nothing {verb}" if n == 0 else f"{n} request{'s' * (n != 1)} {verb} first"
        over = "over the declared line-current limit"
        if not isinstance(exc, NetworkOverLimit):
            stop = "it needs a check that was SKIPPED"
        elif exc.by == "host":
            stop = f"{exc.what} was refused by the host's check, {over}, and not sent"
        elif exc.by == "board":
            stop = (
                f"{exc.what} was refused by the board's own check (the in-process board), {over}, "
                "before reaching a line"
            )
        else:
            gone = "nothing sent before it" if n == 0 else gone
            stop = f"{exc.what} was sent and refused by the board's own check, {over}, before reaching a line"
        return f"{gone}: {stop}" + (f" (planned: {'; '.join(planned)})" if planned else "")

    # -- bookkeeping
    def add(self, check: Check) -> None:
        self.report.checks.append(check)
        if self.on_check is not None:
            self.on_check(check)

    def run(self, operation: str, spec: str, body: Callable[[list[str]], str]) -> bool:
        """Run one check; `body` puts what it sends in its list argument and returns what came
        back, or raises Mismatch (any other exception is a failure too)."""
        sent: list[str] = []
        self.requests_out = 0
        t0 = time.perf_counter()
        lost = False
        try:
            got, status = body(sent), "PASS"
        except Mismatch as exc:
            got, status = str(exc), "FAIL"
        except Unavailable as exc:
            got, status = str(exc), "SKIP"
            if isinstance(exc, NetworkOverLimit):
                self.not_run[operation] = got
            if isinstance(exc, NetworkOverLimit | Needs):
                sent = [self.sent_before(exc, sent)]
        except Exception as exc:  # a foreign board may fail in any way: report it, go on
            got, status = f"raised {type(exc).__name__}: {exc}", "FAIL"
            lost = isinstance(exc, LINK_LOST)
        self.add(Check(operation, status, "; ".join(sent) or "-", got, spec, time.perf_counter() - t0))
        if lost:
            raise LinkLost(operation)
        return status == "PASS"

    def probe(self, operation: str, spec: str, body: Callable[[list[str]], str]) -> bool:
        """`run` for a check whose request goes past a limit that only the board's own check
        stops: on a board without that check, the devices take it. SKIP when the options say
        not to send such probes (`Options.limit_probes` False, or None for a board other than
        ``emulator://``: `hil conformance` without --limit-probes, or with --no-limit-probes)."""
        if self.opt.limit_probes:
            return self.run(operation, spec, body)
        self.report.unverified.append(operation)
        self.add(Check(operation, "SKIP", "-", "-", f"{NO_PROBES}; the spec: {spec}"))
        return False

    def skip(self, capability: str, operation: str, call: Callable[[], object], note: str = "") -> None:
        """An undeclared capability: SKIP its checks, and check that the board refuses it."""
        self.add(Check(operation, "SKIP", "-", "-", f"{capability!r} not in the declared capabilities{note}"))

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

    def counted_refusal(
        self, sent: list[str], value: float, attempt: Callable[[], str], what: str | None = None
    ) -> str:
        """`attempt` sends a value past a limit (default: an mvm input of `value` above
        clamp_max; `what` says otherwise) past the host's checks and returns how the board
        refused it; the board must also count the refusal, and let nothing reach the array."""
        before = self.dev.safety()
        got = attempt()
        sent.append(what or f"x = {value:g} > clamp_max {self.lim.clamp_max:.3g}")
        after = self.dev.safety()
        counts = f"refused {before.refused} -> {after.refused}, violations {after.violations}"
        if after.refused != before.refused + 1 or after.violations != 0:
            raise Mismatch(
                f"{got}; {counts}: the board must count its refusal, and nothing may reach the array"
            )
        return f"{got}; {counts}"

    def tile_within_window(self, tile: str) -> str:
        """After a refused program: the tile's devices still read within [g_min, g_max] (a
        board that wrote the targets anyway holds them now), with the read noise's margin."""
        gp, gm = self.dev.read_conductance(tile)
        top = float(max(np.max(gp), np.max(gm)))
        margin = 6.0 * self.sigma_g + 1e-6 * self.g_range
        if top > self.lim.g_max + margin:
            raise Mismatch(f"the tile reads up to {top:.4g} S after the refusal: the board wrote the targets")
        return f"; the tile reads at most {top:.4g} S"

    def weights(self, tile: str) -> np.ndarray:
        """The reference weights of `tile` from the averaged reads of `read_conductance`."""
        self.needs(f"program {tile}")
        if tile not in self.g:
            raise Mismatch(
                f"no reference weights for {tile}: its read_conductance check failed above (the "
                "products and settles are compared with the weights read back); mend that first"
            )
        gp, gm = self.g[tile]
        return self.topo.coupling(tile).w_max * (gp - gm) / self.g_range

    def sigma_w(self) -> float:
        """Read noise of one weight of one conductance read, in weight units (w_max = 1)."""
        return math.sqrt(2.0) * self.sigma_g / self.g_range

    def read_avg(self, tile: str) -> tuple[np.ndarray, np.ndarray, float]:
        """`reads` reads of a tile: mean G+, mean G- (float64) and the pooled read-noise std."""
        reads = [self.own_read(tile) for _ in range(self.opt.reads)]
        stack = np.stack([np.stack(r) for r in reads]).astype(np.float64)  # (reads, 2, rows, cols)
        sigma = float(np.sqrt(stack.var(axis=0, ddof=1).mean())) if len(reads) > 1 else 0.0
        mean = stack.mean(axis=0)
        return mean[0], mean[1], sigma

    def inputs(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.uniform(self.x_lo, self.x_hi, shape).astype(np.float32)

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
