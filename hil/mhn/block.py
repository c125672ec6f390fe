"""An MHN block on a crossbar: patterns on a tile, retrieval iterated on the host through
`Device.mvm`.

Per step, for the whole batch (in requests of at most `Limits.max_batch` rows):

1. the similarities ``xi^T x``: one forward `mvm` of ``[u(x), 1]`` (`hil.mhn.tile`);
2. the softmax ``p = softmax(beta xi^T x)``, on the host (the digital periphery);
3. the read-out ``xi p``: one transposed `mvm` of the scaled probabilities;
4. with a nudge (EP), the host adds ``-beta_ep * mask * (x - target)`` (the gradient of the
   cost ``1/2 |mask (x - target)|^2``), so the fixed point is the nudged energy's stationary point.

The budget (`hil.mhn.core.RetrievalBudget`) means what it means for the host settle
(`hil.host_settle`): every `check_every` steps the largest state change over the batch is
compared with `tol`; on a noisy board the update is read twice at each check, the largest
difference of the two reads is the noise floor (below it only noise moves the states), the step
takes their mean, and a retrieval also stops when its change is within `tol` of the floor and
no smaller than at the previous check. ``tol = 0`` runs exactly `max_steps`. A deterministic
board (the two reads equal) stops being read twice.

After the last step one more forward read gives the similarities at the returned state, so
the probabilities and the energy ``-1/beta logsumexp(beta xi^T x) + |x|^2 / 2`` are those of
the state returned, as the board sees it. Time and array energy come from the board's meter
(`Device.meter`); a board without one gets the host's wall time and NaN joules.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from drivers import ConfigurationError, Device, LimitViolation
from drivers.converters import lsb
from drivers.tiled import TiledDevice
from hil.mhn.core import RetrievalBudget, check_beta
from hil.mhn.tile import Encoding, topology
from hil.programming import ProgrammingScheme, make_scheme


@dataclass
class Retrieval:
    """What one retrieval of a batch returned and cost."""

    x: np.ndarray  # (batch, d) float64 final states
    p: np.ndarray  # (batch, N) softmax at the final states (from the last forward read)
    energy: np.ndarray  # (batch,) the energy at the final states
    steps: int
    converged: bool
    residual: float  # the largest state change at the last check
    noise_floor: float  # the largest difference of two reads of one update (0: deterministic)
    mvm_calls: int
    time_s: float
    energy_j: float  # array energy (NaN without a board meter)


@dataclass(frozen=True)
class ElasticNudge:
    """The EP nudge of a retrieval: ``beta_ep * 1/2 |mask (x - target)|^2`` added to the energy."""

    beta: float
    target: np.ndarray  # (batch, d)
    mask: np.ndarray | None = None  # (d,) 1 where the cost applies (None: everywhere)

    def grad(self, x: np.ndarray) -> np.ndarray:
        g = x - self.target
        return g if self.mask is None else g * self.mask


@dataclass(frozen=True)
class CurrentNudge:
    """The EP nudge of a retrieval with a linear cost ``beta_ep * current . x`` (an error
    current from a downstream part, as in an ff-EBM's backward pass)."""

    beta: float
    current: np.ndarray  # (batch, d): dL/dx, zero where the cost does not apply

    def grad(self, x: np.ndarray) -> np.ndarray:
        return self.current


class MHNBlock:
    """Patterns (the columns of a (d, N) matrix) on one tile of `device`, and retrieval.

    `patterns` is an ``nn.Parameter`` (float32, host copy); `sync` programs the tile through the
    programming scheme whenever it changed (`hil.programming`, as `hil.ep.EBBlock` does).
    `out_range`: the mvm read-out ADC's range in weight units (the emulator's periphery default;
    a calibration record gives a real board's); `margin`: room in the DAC's state box beyond the
    initial patterns' range, for patterns that learning moves.

    `dither`: subtractive dither of the mvm inputs, in DAC units (0: none; ``"auto"``: sized so
    that every read-out line spreads over about one mvm-ADC step, from `Limits.adc_bits` and
    `out_range`; none on a board without ADC quantisation). Each read adds uniform noise of that
    amplitude to the driven lines (clipped to the DAC's range) and subtracts its product with the
    weights the tile holds, so the reads are the products of the undithered inputs with the
    ADC's rounding turned into zero-mean noise. Without it a noiseless board rounds away every
    change of a similarity below half an ADC step (an 8-bit ADC and the default range: a step
    of 0.137 in similarity for 5 patterns of norm 2 in d = 16), so a small displacement from an
    unstable fixed point is never seen and the measured critical beta comes out high, or not at
    all (`hil.mhn.diagnose` uses ``"auto"``)."""

    def __init__(
        self,
        device: Device,
        patterns: Tensor | np.ndarray,
        *,
        beta: float,
        budget: RetrievalBudget | None = None,
        programming: str | ProgrammingScheme | None = None,
        out_range: float = 4.0,
        margin: float = 0.0,
        tile: str = "xi",
        probe_noise: bool = True,
        seed: int = 0,
        dither: float | str = 0.0,
    ) -> None:
        device.require("mvm")
        xi = torch.as_tensor(np.asarray(patterns, dtype=np.float32)).clone()
        self.device = device
        self.tile = tile
        self.beta = check_beta(beta)
        self.budget = budget or RetrievalBudget()
        self.encoding = Encoding.of(xi, device.info.limits, out_range=out_range, margin=margin)
        self.d, self.n = xi.shape
        try:
            lim = device.info.limits
            topo = topology(self.d, self.n, self.encoding.w_max, tile, lim.max_settle_steps, lim.max_gain)
            device.configure(topo)
        except LimitViolation as exc:
            raise _too_large(device, tile, self.d, self.n, exc) from exc
        self.patterns = nn.Parameter(xi)
        self.programming = make_scheme(programming, seed=seed)
        self.probe_noise = probe_noise
        self.clipped = 0
        self._version: int | None = None
        self._achieved: Tensor | None = None
        self._reader = None
        self._rng = np.random.default_rng(seed)
        self.sync()
        self.dither = self._dither_amplitudes(dither, out_range)  # (forward, read-out), DAC units

    def _dither_amplitudes(self, dither: float | str, out_range: float) -> tuple[float, float]:
        enc = self.encoding
        span = enc.dac_hi - enc.dac_lo
        if dither != "auto":
            amp = float(dither)
            if not (math.isfinite(amp) and 0.0 <= amp <= span):
                raise ConfigurationError(f"dither must be 'auto' or in [0, {span:g}], got {dither!r}")
            return amp, amp
        # the mvm ADC's step over its range [-out_range, out_range], weight units (the project's
        # one converter step, as the board quantises); an ideal ADC has none: no dither
        step = lsb(self.device.info.limits.adc_bits, 2.0 * out_range)
        if step == 0.0:
            return 0.0, 0.0
        w = self.encoding.weights(self.patterns.detach().double())[:-1]
        # uniform noise of amplitude A on lines with weights w spreads a read-out by A |w| / sqrt(3)
        cols = float(w.norm(dim=0).min())
        rows = float(w.norm(dim=1).min())
        cap = 0.25 * span
        fwd = min(math.sqrt(3.0) * step / max(cols, 1e-30), cap)
        back = min(math.sqrt(3.0) * step / max(rows, 1e-30), cap)
        return fwd, back

    def _held_weights(self) -> np.ndarray:
        """The (d, N) state rows of the tile's weights as read back (host weights without a reader)."""
        if self._reader is not None:
            return (self.device_patterns() * self.encoding.k).numpy()
        return (self.patterns.detach().double() * self.encoding.k).numpy()

    def _dithered(self, v: np.ndarray, amp: float) -> np.ndarray:
        enc = self.encoding
        return np.clip(v + self._rng.uniform(-amp, amp, v.shape), enc.dac_lo, enc.dac_hi)

    # ------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def sync(self, force: bool = False) -> bool:
        """Program the tile if the host patterns changed (or `force`); True when written. Patterns
        outside the state box are clipped to it, weights beyond +-w_max to that (`clipped`
        counts both)."""
        p = self.patterns
        if not force and self._version == p._version:
            return False
        lo, hi = self.box()
        if float(p.min()) < lo or float(p.max()) > hi:
            # patterns stay in the DAC's state box, so every retrieved state (a convex
            # combination of them) is a state the DAC can carry back
            self.clipped += int(((p < lo) | (p > hi)).sum())
            p.clamp_(lo, hi)
        w = self.encoding.weights(p.detach())
        wm = self.encoding.w_max
        if float(w.abs().max()) > wm:
            self.clipped += int((w.abs() > wm).sum())
            w = w.clamp(-wm, wm)
        results = self.programming.program(self.device, self.tile, w, force=force, bounded=True)
        self._reader = results[-1].reader if results else self._reader
        self._achieved = None
        self._version = p._version  # after the in-place clamp, which bumps the version
        return True

    def device_patterns(self) -> Tensor:
        """The patterns the tile holds, as read back after the last programming (float64)."""
        self.sync()
        if self._achieved is None:
            assert self._reader is not None
            w = torch.as_tensor(self._reader(), dtype=torch.float64)
            self._achieved = self.encoding.patterns(w)
        return self._achieved

    # ---------------------------------------------------------------------------- retrieval
    def box(self) -> tuple[float, float]:
        """The states the DAC can carry: queries must lie within it."""
        return self.encoding.x_lo, self.encoding.x_hi

    def _mvm(self, x: np.ndarray, transpose: bool, calls: list[int]) -> np.ndarray:
        step = self.device.info.limits.max_batch
        parts = []
        for k in range(0, max(x.shape[0], 1), step):
            calls[0] += 1
            parts.append(self.device.mvm(self.tile, x[k : k + step], transpose=transpose))
        return (np.concatenate(parts) if len(parts) > 1 else parts[0]).astype(np.float64)

    def _similarities(self, x: np.ndarray, calls: list[int]) -> np.ndarray:
        """``xi^T x`` per sample, through one forward read."""
        enc = self.encoding
        u = np.clip(x * enc.a + enc.b, enc.dac_lo, enc.dac_hi)  # float rounding at the box's edge
        amp = self.dither[0]
        ud = self._dithered(u, amp).astype(np.float32) if amp > 0 else u
        rows = np.concatenate([ud, np.ones((x.shape[0], 1))], 1).astype(np.float32)
        y = self._mvm(rows, False, calls)
        if amp > 0:
            y = y - (ud.astype(np.float64) - u) @ self._held_weights()
        return y / (enc.k * enc.a)

    def _readout(self, p: np.ndarray, calls: list[int]) -> np.ndarray:
        """``xi p`` per sample, through one transposed read of p scaled to the DAC's top."""
        enc = self.encoding
        top = p.max(1, keepdims=True)
        q = (p * (enc.dac_hi / top)).astype(np.float32)
        amp = self.dither[1]
        qd = self._dithered(q, amp).astype(np.float32) if amp > 0 else q
        y = self._mvm(qd, True, calls)[:, : self.d]
        if amp > 0:
            y = y - (qd.astype(np.float64) - q) @ self._held_weights().T
        return y * (top / (enc.k * enc.dac_hi))

    def _update(self, x: np.ndarray, beta: float, calls: list[int]) -> np.ndarray:
        return self._readout(_softmax(beta * self._similarities(x, calls)), calls)

    def retrieve(
        self,
        x0: Tensor | np.ndarray,
        *,
        beta: float | None = None,
        budget: RetrievalBudget | None = None,
        nudge: ElasticNudge | CurrentNudge | None = None,
        clamp: np.ndarray | None = None,
    ) -> Retrieval:
        """Iterate ``x <- xi softmax(beta xi^T x)`` (minus the nudge's gradient) from `x0`
        (batch, d) under `budget` (default: the block's). `clamp`: a (d,) bool mask of the
        components held at `x0`'s values (an input, as a DHN clamps its input layer): the
        retrieval then minimises the energy over the other components only, and its end state
        depends on the query continuously, not only through the basin it starts in."""
        beta = self.beta if beta is None else check_beta(beta)
        budget = budget or self.budget
        self.sync()
        x = np.array(x0, dtype=np.float64, copy=True)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ConfigurationError(f"queries must have shape (batch, {self.d}), got {np.shape(x0)}")
        lo, hi = self.box()
        if not np.isfinite(x).all() or (x.size and (x.min() < lo - 1e-6 or x.max() > hi + 1e-6)):
            raise ConfigurationError(
                f"queries must lie in the DAC's state box [{lo:.4g}, {hi:.4g}] (the patterns' range "
                "plus margin); clip or rescale them"
            )
        if nudge is not None and not (math.isfinite(nudge.beta) and abs(nudge.beta) < 1.0):
            raise ConfigurationError(f"nudge beta must be finite with |beta| < 1, got {nudge.beta!r}")
        held = None
        if clamp is not None:
            held = np.asarray(clamp, dtype=bool)
            if held.shape != (self.d,):
                raise ConfigurationError(f"clamp must be a ({self.d},) bool mask, got shape {held.shape}")
        meter = self.device.meter()
        wall = time.perf_counter()
        calls = [0]
        probe = self.probe_noise and budget.tol > 0
        residual, last, floor, converged, steps = math.inf, math.inf, 0.0, False, 0
        for steps in range(1, budget.max_steps + 1):
            check = budget.tol > 0 and steps % budget.check_every == 0
            nxt = self._update(x, beta, calls)
            if check and probe:
                again = self._update(x, beta, calls)
                floor = float(np.abs(again - nxt).max()) if nxt.size else 0.0
                probe = floor > 0.0  # a deterministic board: one read is enough
                nxt = 0.5 * (nxt + again)
            if nudge is not None:
                nxt = nxt - nudge.beta * nudge.grad(x)
            # the state box holds every convex combination of the patterns; read noise (or a
            # nudge) can carry a decoded state past it, where the DAC could not take it back
            nxt = np.clip(nxt, lo, hi)
            if held is not None:
                nxt[:, held] = x[:, held]
            if check:
                residual = float(np.abs(nxt - x).max()) if x.size else 0.0
            x = nxt
            if check:
                noisy_stop = floor > 0 and residual <= budget.tol + floor and residual >= last
                if residual <= budget.tol or noisy_stop:
                    converged = True
                    break
                last = residual
        if budget.tol == 0:
            converged = True  # a fixed number of steps was asked for
        sims = self._similarities(x, calls)
        p = _softmax(beta * sims)
        energy = -_logsumexp(beta * sims) / beta + 0.5 * (x * x).sum(1)
        after = self.device.meter()
        if meter is not None and after is not None:
            t, j = after.clock_s - meter.clock_s, after.energy_j - meter.energy_j
        else:
            t, j = time.perf_counter() - wall, math.nan
        return Retrieval(x, p, energy, steps, converged, residual, floor, calls[0], t, j)


def _too_large(device: Device, tile: str, d: int, n: int, exc: LimitViolation) -> Exception:
    """The error for a memory the board refused to configure: what the memory needs against the
    board's tiles, and the fix (the board's own refusal when the memory fits one tile)."""
    lim = device.info.limits
    rows, cols = lim.tile_rows_max, lim.tile_cols_max
    if d + 1 <= rows and n <= cols:
        return exc
    what = (
        f"the memory's tile {tile!r} is (d + 1) x N = {d + 1} x {n} cells ({n} patterns of dimension "
        f"{d} plus the bias row), past the board's {rows} x {cols} tiles"
    )
    if isinstance(device, TiledDevice):
        return ConfigurationError(
            f"{what}, and placing it on several tiles needs more than the board has ({exc.limit}: "
            f"{exc.value:g} needed, {exc.bound:g} available). Store fewer patterns or shorter ones "
            f"(one tile holds {cols} patterns of dimension up to {rows - 1}), or use a board with "
            "more or larger tiles"
        )
    return ConfigurationError(
        f"{what}. Open the board with hil.boards.open_board(uri), which places a memory larger than "
        f"a tile on several tiles (as `hil mhn phase` does), or store at most {cols} patterns of "
        f"dimension at most {rows - 1}"
    )


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(1)
    return m + np.log(np.exp(z - m[:, None]).sum(1))
