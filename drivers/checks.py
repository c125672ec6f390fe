"""Request validation shared by every backend (host side) and by the emulator (board side).

Each check raises before anything is sent or applied, with a message that names the
offending value, the limit, and what to do instead.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from drivers.errors import ConfigurationError, LimitViolation, distinct_numbers
from drivers.scalars import INT32_MAX, as_float, as_int
from drivers.topology import BIAS, SettleBudget, Topology
from drivers.wear import endurance_refusal, pulse_wear

if TYPE_CHECKING:
    from drivers.base import Limits, Nudge


def require_topology(topology: Topology | None) -> Topology:
    if topology is None:
        raise ConfigurationError("the device has no topology yet; call configure(topology) first")
    return topology


def check_topology(topology: Topology, limits: Limits) -> None:
    if not isinstance(topology, Topology):
        raise ConfigurationError(f"configure takes a Topology, got {type(topology).__name__}")
    if len(topology.couplings) > limits.max_tiles:
        raise LimitViolation(
            "tile count", len(topology.couplings), limits.max_tiles, "use fewer couplings or another board"
        )
    for c in topology.couplings:
        rows, cols = topology.tile_shape(c.tile)
        if rows > limits.tile_rows_max or cols > limits.tile_cols_max:
            raise LimitViolation(
                f"tile size of {c.tile!r} ({rows} x {cols})",
                max(rows / limits.tile_rows_max, cols / limits.tile_cols_max),
                1.0,
                f"tiles hold at most {limits.tile_rows_max} x {limits.tile_cols_max} cells; split the layer: "
                "open the board with hil.boards.open_board(uri), which places a larger tile on several "
                "of the board's tiles (`hil train` does), or split the network into EB blocks "
                "(model.block_layers)",
            )
    check_settings(topology, limits)


def check_settings(topology: Topology, limits: Limits) -> None:
    """What may change between two configures of the same network: gain, scales and budget
    (Topology itself has checked that they are finite and > 0)."""
    if topology.gain > limits.max_gain:
        raise LimitViolation(
            "activation gain",
            topology.gain,
            limits.max_gain,
            f"give the topology a gain of at most {limits.max_gain:g} (Topology.gain)",
        )
    for c in topology.couplings:
        if c.w_max > limits.max_w_max:
            raise LimitViolation(
                f"w_max of {c.tile!r}",
                c.w_max,
                limits.max_w_max,
                f"give the coupling a w_max of at most {limits.max_w_max:g} (scale its weights down)",
            )
    check_budget(topology.budget, limits)


def check_budget(b: SettleBudget, limits: Limits) -> None:
    """A settle budget within the board's bounds; each refusal names the field, its value, the
    bound it passed and what to give instead."""
    most = max(limits.max_settle_steps, 1)
    # what to do, said with each refusal (the checks' own words name the value and the bound; past
    # max_settle_steps, a declared limit, the LimitViolation says its own fix)
    fixes = (
        (lambda: as_int(
            "settle budget max_steps", b.max_steps, 1, limits.max_settle_steps, "settle budget max_steps",
            f"give the settle budget at most {limits.max_settle_steps} steps (SettleBudget.max_steps)",
        ), f"give SettleBudget.max_steps a whole number of steps from 1 to {limits.max_settle_steps}"),
        (lambda: as_float("settle budget dt", b.dt, 0.0, 1.0, lo_open=True),
         "give SettleBudget.dt a step in (0, 1] (1: undamped; dense networks need less, e.g. 0.5)"),
        (lambda: as_int("settle budget check_every", b.check_every, 1, most),
         f"give SettleBudget.check_every a whole number of steps from 1 to {most}"),
        (lambda: as_float("settle budget tol", b.tol, 0.0, math.inf),
         "give SettleBudget.tol a finite tolerance >= 0 (0: no convergence test, every settle of a "
         "board runs max_steps, noisy or not)"),
    )  # fmt: skip
    for check, fix in fixes:
        try:
            check()
        except ConfigurationError as exc:
            raise ConfigurationError(f"{exc}; {fix}") from None


DEFAULT_VERIFY_ITERS = 20  # write-verify rounds of a `program` that names none (or the board's bound)


def check_verify(limits: Limits, tol: object, max_iters: object) -> tuple[float | None, int]:
    """`program`'s tolerance (None: the board's default; else finite and >= 0 siemens) and
    write-verify iteration budget (1 to `Limits.max_verify_iters`; None: `DEFAULT_VERIFY_ITERS`,
    or the board's bound when that is lower: a board that declares fewer rounds still takes a
    program that names none)."""
    t = None if tol is None else as_float("program tol", tol, 0.0, math.inf)
    if max_iters is None:
        return t, min(DEFAULT_VERIFY_ITERS, limits.max_verify_iters)
    n = as_int(
        "max_iters",
        max_iters,
        1,
        limits.max_verify_iters,
        "write-verify max_iters",
        f"ask for at most {limits.max_verify_iters} write-verify rounds (program max_iters)",
    )
    return t, n


def check_wait(limits: Limits, seconds: object) -> float:
    return as_float(
        "wait duration (seconds)",
        seconds,
        0.0,
        limits.max_wait_s,
        limit="wait duration (s)",
        fix=f"wait at most {limits.max_wait_s:g} s per call (several calls for longer)",
    )


def check_trace(limits: Limits, trace: object) -> int:
    """A settle's trace request as a step interval (0: no trace)."""
    if isinstance(trace, bool):
        return int(trace)
    return as_int("trace interval", trace, 0, max(limits.max_settle_steps, 1))


def as_batch(
    name: str,
    value: object,
    n: int,
    batch: int | None = None,
    limits: Limits | None = None,
    copy: bool = True,
) -> np.ndarray:
    """Return a C-contiguous float32 (batch, n) array (the host's own copy; with ``copy=False``
    a view where possible), refusing NaN and infinities and, with `limits`, states beyond the
    read-voltage limit."""
    return batch_and_peak(name, value, n, batch, limits, copy)[0]


def batch_and_peak(
    name: str,
    value: object,
    n: int,
    batch: int | None = None,
    limits: Limits | None = None,
    copy: bool = True,
) -> tuple[np.ndarray, float]:
    """`as_batch`, and the array's peak ``max |x|`` from the extremes its checks read (0 for
    an empty array): a caller that bounds the peak needs no pass of its own. The array
    returned is the host's own float32 copy, made before any check: what is checked is what
    is sent (and sent again on a retry), whatever the caller's array holds by then (another
    thread, or a callback such as a log handler, may change it after the call began).
    ``copy=False`` (the in-process emulator, which must not copy on CPU, DESIGN.md section 3:
    no line of a real board is behind it) returns the caller's array where it is already C-
    contiguous float32."""
    arr = _float32(name, value, copy)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != n:
        raise ConfigurationError(f"{name}: expected shape (batch, {n}), got {np.shape(value)}")
    if batch is not None and arr.shape[0] != batch:
        raise ConfigurationError(f"{name}: batch size {arr.shape[0]} differs from the clamp's {batch}")
    if limits is not None:
        check_batch(name, arr.shape[0], limits)
    if arr.dtype != np.float32:
        with np.errstate(over="ignore", invalid="ignore"):  # past float32: inf, refused below
            arr = np.ascontiguousarray(arr, dtype=np.float32)
    elif not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    peak = 0.0
    if arr.size:
        lo, hi = float(arr.min()), float(arr.max())  # a NaN or infinity shows in one of them
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ConfigurationError(f"{name}: contains NaN or infinite values")
        peak = max(-lo, hi)
        if limits is not None:
            _check_voltage(name, peak, limits)
    return arr, peak


def check_batch(name: str, batch: int, limits: Limits) -> int:
    """A request's batch size (samples) within `Limits.max_batch`."""
    if batch > limits.max_batch:
        raise LimitViolation(
            f"batch size of {name}",
            batch,
            limits.max_batch,
            f"split the {batch} samples into chunks of at most {limits.max_batch} and send one request each",
        )
    return batch


# values of one settle reply (batch x nodes): 256 MiB of float32, the most a host takes in
# one reply (`drivers.wire.payload.MAX_REPLY`); a feature-map network reaches it well below
# max_batch (a 28 x 28 map of 32 channels: 2674 samples)
MAX_SETTLE_VALUES = 1 << 26


def conv_map_values(topology: Topology) -> list[tuple[str, int, int]]:
    """Per conv tile, (tile, C_out, positions): a settle on a board that relaxes holds its
    pre-pooling maps, ``C_out x positions`` values per sample, up to ``pool^2`` (64) times
    the destination's nodes that the bound on a settle's states counts."""
    out = []
    for c in topology.couplings:
        if c.kind == "conv":
            _c_in, h, w = topology.shapes[c.rows[0]]
            ho, wo = h + 2 * c.padding - c.kernel + 1, w + 2 * c.padding - c.kernel + 1
            out.append((c.tile, topology.tile_shape(c.tile)[1], ho * wo))
    return out


def settle_samples_most(topology: Topology) -> int:
    """The most samples one settle of `topology` may carry under `MAX_SETTLE_VALUES` (its
    states, and each conv tile's pre-pooling maps; `check_settle_batch`), at least 1."""
    per_sample = max([sum(topology.groups.values())] + [c * n for _t, c, n in conv_map_values(topology)])
    return max(1, MAX_SETTLE_VALUES // per_sample)


def check_settle_batch(topology: Topology, batch: int, limits: Limits, maps: bool = True) -> int:
    """A settle's batch within `Limits.max_batch`, and its states (batch x the topology's
    nodes) within `MAX_SETTLE_VALUES`; with `maps` (a settle the board relaxes), each conv
    tile's pre-pooling maps (batch x C_out x positions) too."""
    check_batch("settle clamp", batch, limits)
    nodes = sum(topology.groups.values())
    if batch * nodes > MAX_SETTLE_VALUES:
        # with the maps' bound, the chunk that meets both (a chunk of nodes alone may not)
        most = settle_samples_most(topology) if maps else max(1, MAX_SETTLE_VALUES // nodes)
        raise LimitViolation(
            f"values in one settle ({batch} samples x {nodes} nodes)",
            batch * nodes,
            MAX_SETTLE_VALUES,
            f"split the {batch} samples into chunks of at most {most} for this network",
        )
    for tile, c_out, positions in conv_map_values(topology) if maps else ():
        if batch * c_out * positions > MAX_SETTLE_VALUES:
            raise LimitViolation(
                f"pre-pooling values of conv tile {tile!r} in one settle ({batch} samples x {c_out} "
                f"channels x {positions} positions)",
                batch * c_out * positions,
                MAX_SETTLE_VALUES,
                f"split the {batch} samples into chunks of at most {settle_samples_most(topology)} for "
                "this network (hil's EB blocks and predict do), or pool less",
            )
    return batch


def check_trace_values(
    topology: Topology, clamped: Iterable[str], batch: int, every: int, limits: Limits
) -> None:
    """A traced settle's record (`every` > 0: a record of the free groups' states and of the
    energy every `every` steps, at most ``max_steps // every + 2`` records, each ``batch x (free
    nodes + 1)`` values) within `MAX_SETTLE_VALUES`, the most one reply carries: the board would
    otherwise keep records without bound (100 000 steps of a 784-512-10 network at batch 1024,
    every step: 200 GB) and the host refuse the reply it could not take."""
    if not every:
        return
    skip = set(clamped)
    free = sum(n for g, n in topology.groups.items() if g not in skip)
    records = topology.budget.max_steps // every + 2
    values = records * batch * (free + 1)
    if values > MAX_SETTLE_VALUES:
        per_sample = records * (free + 1)
        most = MAX_SETTLE_VALUES // per_sample
        fewer = f"trace at most {most} samples" if most else "trace fewer steps"
        raise LimitViolation(
            f"values in one settle's trace ({records} records of {batch} samples x {free + 1} values)",
            values,
            MAX_SETTLE_VALUES,
            f"{fewer} at this interval, trace every k > {every} steps, or lower the budget's max_steps "
            f"({topology.budget.max_steps}); a trace is for a few samples",
        )


_REAL_KINDS = "biuf"  # bool, integers, floats: what converts to float32 without losing meaning


def _float32(name: str, value: object, copy: bool = True) -> np.ndarray:
    """`value` as a numpy array of a real dtype, refusing complex, object, string and time
    dtypes. With `copy` a C-contiguous float32 array of its own, always (what is checked is
    what is sent: a caller's array changed after the check cannot reach the board through
    it); without, the array as given."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{name}: not a numeric array ({exc})") from None
    if arr.dtype.kind not in _REAL_KINDS:
        raise ConfigurationError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    if not copy:
        return arr
    with np.errstate(over="ignore", invalid="ignore"):  # a value past float32 becomes inf: refused after
        return np.array(arr, dtype=np.float32, order="C", copy=True)


def check_state_range_voltage(v_read: float, v_read_max: float, state_range: tuple[float, float]) -> None:
    """Refuse limits under which the board's own nodes break its read-voltage limit: every
    state its converters cover (`state_range`, normalised) times `v_read` must be within
    `v_read_max` (else a settle drives free nodes past the limit with every clamp accepted)."""
    from drivers.base import largest_state

    peak = max(abs(state_range[0]), abs(state_range[1]))
    top = largest_state(v_read, v_read_max)
    if not math.isfinite(top):
        raise ConfigurationError(
            f"v_read_max / v_read ({v_read_max:g} V / {v_read:g} V) is past float32's range: the largest "
            "allowed state would be infinite; declare the read voltage and its limit in volts"
        )
    if peak > top:
        reach, most = distinct_numbers(peak * v_read, v_read_max)
        raise ConfigurationError(
            f"v_read_max {most} V is below the voltage of the board's own states: the state "
            f"range [{state_range[0]:g}, {state_range[1]:g}] at v_read {v_read:g} V reaches "
            f"{reach} V, so a settle would drive free nodes past the limit; raise v_read_max "
            f"to at least {reach} V or lower v_read"
        )


def _check_voltage(name: str, peak: float, limits: Limits) -> None:
    if peak > limits.clamp_max:
        state, most = distinct_numbers(peak, limits.clamp_max)
        raise LimitViolation(
            f"read-voltage limit on {name}",
            peak * limits.v_read,
            limits.v_read_max,
            f"state {state} x v_read {limits.v_read:g} V; node states must lie within "
            f"+-{most} (normalised units, 1.0 = {limits.v_read:g} V)",
        )


def check_states(
    kind: str,
    states: dict[str, np.ndarray],
    topology: Topology,
    limits: Limits,
    batch: int | None,
    copy: bool = True,
) -> tuple[dict[str, np.ndarray], int | None]:
    out: dict[str, np.ndarray] = {}
    for group, value in states.items():
        if group == BIAS:
            raise ConfigurationError(f"{kind}: the bias node is fixed at 1 and cannot be set")
        if group not in topology.groups:
            raise ConfigurationError(f"{kind}: unknown group {group!r}; known: {sorted(topology.groups)}")
        arr = as_batch(f"{kind} {group!r}", value, topology.groups[group], batch, limits, copy)
        batch = arr.shape[0]
        out[group] = arr
    return out, batch


def nudge_beta(
    group: str, nd: object, clamped: Mapping[str, object], topo: Topology, limits: Limits
) -> float:
    """The checked beta of the nudge `nd` on `group`: a Nudge on a known free group, |beta|
    within `Limits.max_beta` (what every settle path checks before its arrays)."""
    from drivers.base import Nudge

    if group in clamped:
        raise ConfigurationError(f"nudge on clamped group {group!r} has no effect; nudge a free group")
    if group not in topo.groups:
        raise ConfigurationError(f"nudge: unknown group {group!r}; known: {sorted(topo.groups)}")
    if not isinstance(nd, Nudge):
        raise ConfigurationError(f"nudge {group!r}: expected a Nudge, got {type(nd).__name__}")
    beta = as_float(f"nudge {group!r} beta", nd.beta, -math.inf, math.inf)
    if abs(beta) > limits.max_beta:
        raise LimitViolation(
            f"|beta| of the nudge on {group!r}",
            abs(beta),
            limits.max_beta,
            f"nudge with |beta| of at most {limits.max_beta:g}",
        )
    return beta


def check_injected_current(group: str, beta: float, peak: float, limits: Limits) -> float:
    """The largest current a grad nudge injects, ``|beta| x max |grad|``, within
    `Limits.max_drive`: computed in float32, as the board applies ``beta * grad``, so a product
    past float32's range is the infinite current it would be."""
    with np.errstate(over="ignore"):
        drive = float(np.float32(beta) * np.float32(peak))
    if not drive <= limits.max_drive:
        raise LimitViolation(
            f"injected nudge current |beta * grad| on {group!r}",
            drive,
            limits.max_drive,
            f"lower |beta| or scale the grad so that |beta| x max |grad| is at most {limits.max_drive:g}",
        )
    return drive


def check_settle(
    topology: Topology | None,
    limits: Limits,
    clamp: dict[str, np.ndarray],
    nudge: dict[str, Nudge] | None,
    init: dict[str, np.ndarray] | None,
    copy: bool = True,
    maps: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, Nudge], dict[str, np.ndarray], int]:
    """A settle's clamps, nudges and initial states checked; each array the host's own copy
    (``copy=False``: views where possible, `batch_and_peak`). `maps`: the conv pre-pooling
    maps' bound too (`check_settle_batch`; False for the host's iterated settle, which reads
    them a few samples at a time)."""
    from drivers.base import Nudge

    topo = require_topology(topology)
    if not clamp:
        raise ConfigurationError("settle needs at least one clamped group (the input)")
    # the scalars first: converting one runs the caller's code (`__float__`), which must not
    # change an array after its check
    betas = {group: nudge_beta(group, nd, clamp, topo, limits) for group, nd in (nudge or {}).items()}
    clamp, batch = check_states("clamp", clamp, topo, limits, None, copy)
    assert batch is not None
    if batch == 0:
        raise ConfigurationError("settle got an empty batch (0 samples); pass at least one sample")
    if all(g in clamp for g in topo.groups):
        raise ConfigurationError(
            f"settle clamps every group of the network ({', '.join(map(repr, topo.groups))}): no node is "
            "free to settle; leave at least one group unclamped (give its start as init), or read the "
            "clamped states' products with mvm"
        )
    check_settle_batch(topo, batch, limits, maps)
    nudges: dict[str, Nudge] = {}
    for group, nd in (nudge or {}).items():
        beta = betas[group]
        n = topo.groups[group]
        target = None
        if nd.target is not None:
            target = as_batch(f"nudge target {group!r}", nd.target, n, batch, limits, copy)
        grad = None
        if nd.grad is not None:
            grad, peak = batch_and_peak(f"nudge grad {group!r}", nd.grad, n, batch, copy=copy)
            if grad.size:
                check_injected_current(group, abs(beta), peak, limits)
        nudges[group] = Nudge(beta, target, grad)
    # Entries for clamped groups are ignored, so a previous Equilibrium's states can be passed whole.
    free_init = {g: v for g, v in (init or {}).items() if g not in clamp}
    init_states, _ = check_states("init", free_init, topo, limits, batch, copy)
    return clamp, nudges, init_states, batch


def check_tile(topology: Topology | None, tile: str) -> tuple[int, int]:
    if not isinstance(tile, str):
        raise ConfigurationError(f"a tile is named by a string, got {type(tile).__name__}")
    return require_topology(topology).tile_shape(tile)


def _min_max(arr: np.ndarray) -> tuple[float, float]:
    """(min, max) of a non-empty array: in one pass with torch's aminmax (which propagates NaN
    as numpy's min and max do) for a writeable float32 array when torch is already loaded
    (this module does not import it), else numpy's two passes."""
    torch = sys.modules.get("torch")
    if torch is not None and arr.size and arr.flags.writeable and arr.dtype == np.float32:
        lo, hi = torch.aminmax(torch.from_numpy(arr))
        return float(lo), float(hi)
    return float(arr.min()), float(arr.max())


def check_program(
    topology: Topology | None, limits: Limits, tile: str, g_plus: np.ndarray, g_minus: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    shape = check_tile(topology, tile)
    out = []
    for name, g in (("g_plus", g_plus), ("g_minus", g_minus)):
        arr = _float32(f"program {tile!r}: {name}", g)
        if arr.shape != shape:
            raise ConfigurationError(f"program {tile!r}: {name} has shape {arr.shape}, the tile is {shape}")
        check_conductance_range(limits, tile, name, *_min_max(arr))
        out.append(arr)
    check_program_lines(limits, tile, out[0], out[1])
    return out[0], out[1]


WINDOW_ULPS = 4  # float32 steps past an end of the conductance window that a target may lie


def conductance_window(limits: Limits) -> tuple[float, float]:
    """The smallest and largest program target accepted (`check_conductance_range`): each end
    rounded to float32 and widened by `WINDOW_ULPS` float32 steps of that end itself
    (``np.spacing`` of the end). A slack sized from the larger end grew below g_min with the
    on/off ratio: with g_min 1e-10 and g_max 1e-4 it let 7.1e-11 S (29 % below g_min) through.
    Host and board both check with this (`drivers.emulated` for the in-process board and for
    the servers, which run one)."""
    g_min, g_max = np.float32(limits.g_min), np.float32(limits.g_max)
    low = float(g_min) - WINDOW_ULPS * abs(float(np.spacing(g_min)))
    high = float(g_max) + WINDOW_ULPS * abs(float(np.spacing(g_max)))
    return max(low, 0.0 if limits.g_min >= 0 else -math.inf), high


def check_conductance_range(limits: Limits, tile: str, name: str, lo: float, hi: float) -> None:
    """The program targets `name` of `tile`, whose smallest and largest values are `lo` and
    `hi` (siemens, as float32 holds them; min and max carry any NaN or infinity), are finite
    and within the board's conductance window in float32, the width targets travel in: the
    window's ends rounded to float32, each widened by `WINDOW_ULPS` float32 steps of its own
    (targets computed in float32 as ``g_min + w (g_max - g_min)`` land a step or two past an
    end), and never below 0 siemens. A slack of 1e-6 of the window let negative targets through on a board
    with g_min 0, and 8e-12 S past g_max on one with g_max 1e-5."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigurationError(f"program {tile!r}: {name} contains NaN or infinite values")
    low, high = conductance_window(limits)
    if lo < low:
        raise LimitViolation(
            f"conductance range ({name} of {tile!r})", lo, limits.g_min, "targets must be >= g_min"
        )
    if hi > high:
        raise LimitViolation(
            f"conductance range ({name} of {tile!r})", hi, limits.g_max, "targets must be <= g_max"
        )


def pulse_counts(
    tile: str,
    name: str,
    value: object,
    shape: tuple[int, int],
    max_pulses: int,
    endurance: int | None = None,
    one_sided: bool = False,
    copy: bool = True,
) -> np.ndarray:
    """Whole pulse counts of `shape` as int32, each within +-max_pulses and, where the board
    declares one, within its pulse `endurance` (no single request may take a device past its
    rated life; on `one_sided` devices a negative count wears once, `drivers.wear.pulse_wear`):
    checked in the array's own dtype (min and max, never an absolute value that overflows)
    before the cast, so the count compared is the one the int32 wire carries. The counts are
    copied first and the copy is checked and returned (the caller's array may change after the
    call began: what is checked is what is sent); ``copy=False`` (the in-process emulator)
    checks the caller's array and returns it where it already is int32."""
    try:
        arr = np.array(value, copy=True) if copy else np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"pulse {tile!r}: {name} is not an array of pulse counts ({exc})") from None
    if arr.shape != shape:
        raise ConfigurationError(f"pulse {tile!r}: {name} has shape {arr.shape}, the tile is {shape}")
    kind = arr.dtype.kind
    if kind not in "iuf":
        raise ConfigurationError(
            f"pulse {tile!r}: {name} must hold whole pulse counts, got dtype {arr.dtype}"
        )
    lo: float | int = 0
    hi: float | int = 0
    if arr.size:
        if kind == "f":
            lo, hi = float(arr.min()), float(arr.max())  # a NaN or infinity shows in one of them
            if not (math.isfinite(lo) and math.isfinite(hi)) or not np.array_equal(arr, np.floor(arr)):
                raise ConfigurationError(f"pulse {tile!r}: {name} must hold whole pulse counts")
        else:
            lo, hi = int(arr.min()), int(arr.max())  # Python ints: no overflow at any width
    peak = max(-lo, hi)
    bound = min(int(max_pulses), INT32_MAX)
    if peak > bound:
        raise LimitViolation(
            f"pulses per device ({name} of {tile!r})", float(peak), bound, "split into several calls"
        )
    # the pulses the worst device takes (`pulse_wear`): on one-sided devices a negative count is 1
    worst = max(hi, 1 if lo < 0 else 0) if one_sided else peak
    if endurance is not None and worst > endurance:
        raise LimitViolation(
            f"pulse endurance ({name} of {tile!r}: pulses per device over its life)",
            float(worst),
            endurance,
            "the board declares its devices endure no more (Limits.pulse_endurance); no request "
            "may exceed it",
        )
    return np.ascontiguousarray(arr, dtype=np.int32)


def check_pulse(
    topology: Topology | None,
    limits: Limits,
    tile: str,
    counts_plus: np.ndarray,
    counts_minus: np.ndarray,
    copy: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Both count arrays of a pulse request checked (`pulse_counts`; ``copy=False``: the
    in-process emulator's, without the host's copies)."""
    shape = check_tile(topology, tile)
    args = (shape, limits.max_pulses, limits.pulse_endurance, limits.one_sided, copy)
    return (
        pulse_counts(tile, "counts_plus", counts_plus, *args),
        pulse_counts(tile, "counts_minus", counts_minus, *args),
    )


class SessionWear:
    """The pulses one host session sent to each device by explicit `pulse` requests, per tile
    name (int64 (2, rows, cols)), so that a request that would take a device past the board's
    declared endurance on this session's count alone is refused before it is sent. A lower
    bound of the wear (earlier sessions, programming pulses and other hosts are not in it):
    the board's own count is the authority. Cleared when the topology changes (a tile name
    may then stand for other devices; a reset and the same network again keep them)."""

    def __init__(self) -> None:
        self._sent: dict[str, np.ndarray] = {}
        self._network: tuple[object, object] | None = None  # (groups, couplings) counted for

    def configured(self, topology: Topology) -> None:
        """After a configure: the counts are kept for the same network, else cleared."""
        network = (dict(topology.groups), topology.couplings)
        if network != self._network:
            self._sent.clear()
            self._network = network

    def check(self, limits: Limits, tile: str, cp: np.ndarray, cm: np.ndarray) -> np.ndarray | None:
        """The session's counts of `tile` after checked counts (`check_pulse`) `cp`, `cm`
        (None when the board declares no endurance); `LimitViolation` if a device would pass
        the endurance. Nothing is recorded until `record`."""
        endurance = limits.pulse_endurance
        if endurance is None:
            return None
        sent = self._sent.get(tile)
        total = pulse_wear(np.stack((cp, cm)).astype(np.int64), limits.one_sided)  # as the board counts
        if sent is None or sent.shape != total.shape:
            sent = np.zeros_like(total)
        total += sent
        refusal = endurance_refusal(tile, endurance, sent, total, "request", session=True)
        if refusal is not None:
            raise refusal
        return total

    def record(self, tile: str, total: np.ndarray | None) -> None:
        """Keep `total` (from `check`) as the session's counts of `tile`, once sent."""
        if total is not None:
            self._sent[tile] = total


def check_mvm(
    topology: Topology | None,
    limits: Limits,
    tile: str,
    x: np.ndarray,
    transpose: bool,
    lines: bool = False,
    copy: bool = True,
) -> np.ndarray:
    """The mvm input `x` as checked float32 (the host's own copy; ``copy=False``: a view where
    possible); with `lines`, also the host's line-current bound (`check_mvm_lines`: the remote
    backends; a board checks from its own conductances)."""
    rows, cols = check_tile(topology, tile)
    n = cols if transpose else rows
    arr, peak = batch_and_peak(f"mvm input to {tile!r}", x, n, limits=limits, copy=copy)
    if arr.shape[0] == 0:
        raise ConfigurationError(f"mvm input to {tile!r} is an empty batch (0 samples); pass one or more")
    if lines:
        check_mvm_lines(topology, limits, tile, arr, peak, transpose)
    return arr


# ---------------------------------------------------------------- line currents
LINE_CURRENT_FIX = (
    "drive smaller inputs, split the layer over more tiles (fewer devices on each line), or program "
    "lower conductances (a smaller weight scale)"
)
# a bound computed in float64 from line sums may differ from the exact sum by rounding: a request
# is waved through on a bound only with this relative margin below the limit
_BOUND_MARGIN = 1e-9


# the margin on the read voltage of a tile's row reads in the bounds that wave a read through
# without summing the rows (host and board alike: `check_program_lines`,
# `emulator.board.Board._check_read_lines`); the exact check that follows uses `v_read` itself, so
# a row exactly at the limit passes (docs/protocol.md "Line currents": equal passes)
READ_MARGIN = 1e-9


def check_program_lines(limits: Limits, tile: str, g_plus: np.ndarray, g_minus: np.ndarray) -> None:
    """The row currents of a program's reads, from its checked float32 targets: the board reads
    a programmed tile back (write-verify, and the read-back of its report) one row at a time at
    `v_read`, so row ``i`` of each array carries ``v_read * sum_j G_ij``. Computed as the board
    computes it from the targets (float64 row sums, times `v_read`; a current equal to the limit
    passes), so the host refuses what the board would, before sending. One multiply when every
    device at the top of the window passes (a tile within the declared limit at g_max, with
    `READ_MARGIN`), else one pass per array."""
    limit = limits.max_line_current_a
    if limit == math.inf or not g_plus.size:
        return
    v = limits.v_read
    if v * (1.0 + READ_MARGIN) * (g_plus.shape[1] * conductance_window(limits)[1]) <= limit:
        return
    for side, g in (("G+", g_plus), ("G-", g_minus)):
        rows = g.astype(np.float64).sum(axis=1)
        i = int(np.argmax(rows))
        check_line_current(
            f"row {i} of {tile!r} ({side} array, the reads of a program at v_read {limits.v_read:g} V, "
            "from its targets)",
            v * float(rows[i]),
            limits,
        )


def check_line_current(what: str, current: float, limits: Limits, fix: str = LINE_CURRENT_FIX) -> None:
    """`current` (amps, float64) of the line `what` within `Limits.max_line_current_a`: a
    current equal to the limit passes, the next float above it is refused (`LimitViolation`
    naming the line, the current, the limit and what to do). Host and board compare with this."""
    if not current <= limits.max_line_current_a:
        raise LimitViolation(f"line current (A) of {what}", current, limits.max_line_current_a, fix)


def worst_line_currents(limits: Limits, n_out: int, volts: np.ndarray) -> tuple[tuple[float, int], float]:
    """The host's bound on a tile's line currents when its input lines are driven at `volts`
    (float64, the peak |V| of each input line over the request), with every device of both
    arrays (G+ and G-, each its own crossbar) at `g_max`: ((the largest driven-line current
    ``V_i * (n_out * g_max)``, its line), the current of every sensed line
    ``g_max * sum_i V_i``).

    Why g_max and not the conductances the host programmed: the host does not know what a
    tile holds (pulses move devices by amounts only the board sees, PCM drifts, reads are
    noisy), a bound from the window holds whatever it holds, and it costs nothing per step
    (one multiply from the peak the voltage check found, `check_mvm_lines`). The board checks
    again from the conductances it holds (it is the authority), and accepts everything the host
    accepts as long as every device is within the declared window."""
    if not volts.size:
        return (0.0, 0), 0.0
    line = int(np.argmax(volts))
    # the sensed line's sum by distinct voltage, each as count x g_max times the voltage: lines at
    # one voltage (a settle's free nodes, every input at its peak) give `n (g_max) V` in the order
    # a board's design-point limit is formed (`line_current_limit`), where summing n equal volts
    # one by one lands a rounding above it (128 x 0.2 V at 10 uS: 2.560000000000001e-4 against
    # 2.5600000000000004e-4)
    # (the products in numpy, the same doubles as one by one: 35 us a check for 1024 distinct
    # voltages, where a Python loop over them took 190 us)
    levels, counts = np.unique(volts, return_counts=True)
    sensed = math.fsum((levels * (counts * limits.g_max)).tolist())
    return (float(volts[line]) * (n_out * limits.g_max), line), sensed


def _lines_of(transpose: bool) -> tuple[str, str]:
    """(driven, sensed) line names of a tile read forwards or transposed."""
    return ("column", "row") if transpose else ("row", "column")


def check_mvm_lines(
    topology: Topology | None, limits: Limits, tile: str, x: np.ndarray, peak: float, transpose: bool
) -> None:
    """The host's line-current check of an mvm input `x` (checked float32, peak ``max |x|``)
    through `tile` (`worst_line_currents`). Costs one multiply unless the quick bound
    (every line at the peak voltage) reaches the limit: then one pass over `x`."""
    limit = limits.max_line_current_a
    if limit == math.inf or not x.size:
        return
    rows, cols = check_tile(topology, tile)
    n_in, n_out = (cols, rows) if transpose else (rows, cols)
    quick = peak * limits.v_read * (max(n_in, n_out) * limits.g_max)
    if quick * (1.0 + _BOUND_MARGIN) <= limit:
        return
    volts = np.abs(x).max(axis=0).astype(np.float64) * limits.v_read
    _check_worst(limits, tile, n_out, volts, transpose, "mvm")


def _check_worst(
    limits: Limits, tile: str, n_out: int, volts: np.ndarray, transpose: bool, what: str
) -> None:
    driven_name, sensed_name = _lines_of(transpose)
    (driven, line), sensed = worst_line_currents(limits, n_out, volts)
    bound = f"{what}, every device at g_max {limits.g_max:g} S (the host's bound)"
    check_line_current(f"{driven_name} {line} of {tile!r} ({bound})", driven, limits)
    check_line_current(f"every {sensed_name} of {tile!r} ({bound})", sensed, limits)


def settle_line_volts(
    topology: Topology, limits: Limits, peaks: Mapping[str, float], free_peak: float
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tile, the peak |V| (float64 volts) of each row and each column line during a
    settle: a clamped or initialised group's lines at its largest |x| (`peaks`), a free group's
    at `free_peak` (the largest state the board's converters cover; the larger of the two for a
    group with `init`), the bias row at 1. A conv tile's lines take the largest peak of the
    groups on its side (its rows hold kernel entries of every channel). The bound holds for
    every step of the settle, so a settle is checked once, before it starts."""
    v = limits.v_read

    def peak(g: str) -> float:
        return 1.0 if g == BIAS else max(peaks.get(g, free_peak), 0.0)

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for c in topology.couplings:
        rows, cols = topology.tile_shape(c.tile)
        if c.kind == "conv":
            body = [g for g in c.rows if g != BIAS]
            r = np.full(rows, max(peak(g) for g in body) * v, np.float64)
            if BIAS in c.rows:
                r[-1] = v
            k = np.full(cols, max(peak(g) for g in c.cols) * v, np.float64)
        else:
            r = np.concatenate([np.full(1 if g == BIAS else topology.groups[g], peak(g) * v) for g in c.rows])
            k = np.concatenate([np.full(topology.groups[g], peak(g) * v) for g in c.cols])
        out[c.tile] = (r.astype(np.float64), k.astype(np.float64))
    return out


def check_settle_lines(
    topology: Topology, limits: Limits, clamp: Mapping[str, np.ndarray], init: Mapping[str, np.ndarray]
) -> None:
    """The host's line-current check of a settle (checked clamps and init): every tile forwards
    (rows driven) and transposed (columns driven), lines at `settle_line_volts`, devices at
    g_max (`worst_line_currents`)."""
    if limits.max_line_current_a == math.inf:
        return
    free_peak = max(abs(limits.adc_range[0]), abs(limits.adc_range[1]))
    peaks = {g: float(np.abs(x).max()) if x.size else 0.0 for g, x in clamp.items()}
    for g, x in init.items():
        peaks[g] = max(free_peak, float(np.abs(x).max()) if x.size else 0.0)
    for tile, (r, k) in settle_line_volts(topology, limits, peaks, free_peak).items():
        _check_worst(limits, tile, k.size, r, False, "settle")
        _check_worst(limits, tile, r.size, k, True, "settle")
