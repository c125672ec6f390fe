"""Opening the board a run trains on, with its calibration record applied when one is given;
the board URI of every EB block of a multi-block model (`block_uris`); and, as a run ends,
every board put in its safe state and closed (`close_boards`), and the boards' state recorded
when a run fails (`record_end_state`)."""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from drivers import Device, DeviceError, open_device
from drivers.base import board_of
from drivers.errors import BoardLocked, RetriesExhausted
from drivers.tiled import TiledDevice
from drivers.uri import parse_options, replace_params
from hil.config import ConfigError, RunConfig, check_devices, eb_blocks, past_bounds

if TYPE_CHECKING:
    from hil.runlog import RunLog


def open_board(uri: str, calibration: str = "") -> TiledDevice:
    """The Device behind `uri`; with a calibration record, wrapped so that the record corrects
    clamps, read-outs and programming targets (refused if it belongs to another board). The
    result is a `TiledDevice`: a network whose couplings exceed the board's tiles is placed on
    grids of physical tiles (`drivers.placement`), each calibrated by its own record entries
    (the record wraps the board, the placement wraps the record); one that fits passes through."""
    device = open_device(uri)
    if not calibration:
        return TiledDevice(device)
    from calibration import CalibratedDevice, load

    inner: Device
    try:
        record = load(calibration, board=device.info)
        session = shlex.join(["hil", "calibrate", uri, "--out", calibration])
        inner = CalibratedDevice(device, record, session=session)
    except Exception:
        device.close()
        raise
    return TiledDevice(inner)


def block_uri(uri: str, k: int) -> str:
    """The URI of the k-th board of a multi-block model: for the emulator, the same preset
    with seed + k; other schemes name one physical board each, so they cannot be expanded."""
    if k == 0:
        return uri
    scheme, _, options = parse_options(uri)
    if scheme != "emulator":
        raise ConfigError(
            f"an ff-EBM with several EB blocks needs one board per block; device = {uri!r} names one "
            "board. List one URI per block in `devices` (repeat a URI to put blocks on one board), "
            "or use the emulator (boards seed, seed+1, ...) or a one-block model."
        )
    return replace_params(uri, seed=options.seed + k)


def block_uris(cfg: RunConfig) -> list[str]:
    """The board URI of every EB block: `cfg.devices`, or `cfg.device` expanded by `block_uri`."""
    check_devices(cfg)
    return list(cfg.devices) or [block_uri(cfg.device, k) for k in range(eb_blocks(cfg))]


def _same_board(k: int, uri: str, j: int, other: str, why: str, what: str) -> ConfigError:
    return ConfigError(
        f"devices[{k}] ({uri}) is the board devices[{j}] ({other}) already opened ({why}): two URIs "
        f"of one board would put two {what} on it, each configuring it over the other. To put them "
        f"on one board, repeat its URI (devices[{k}] = {other!r}); else give devices[{k}] a board of "
        "its own"
    )


def opened_twice(
    error: BaseException, uri: str, k: int, opened: Sequence[Device], uris: Sequence[str], what: str
) -> ConfigError | None:
    """The error of `devices[k]` = `uri` refused by a board's lock whose owner is this very run:
    a board `opened` already holds under another URI (`uris`: the devices list); None for any
    other refusal. The lock's own refusal said to wait for the owner or break the lock."""
    if not isinstance(error, BoardLocked):
        return None
    for d in opened:
        token = getattr(board_of(d), "lock_token", None)
        if isinstance(token, str) and token and token in str(error):
            other = next((u for u in uris if u != uri and _opened_by(u, opened, uris) is d), None)
            if other is not None:
                why = f"the board refused it as owned by this run, {token!r}"
                return _same_board(k, uri, list(uris).index(other), other, why, what)
    return None


def _opened_by(u: str, opened: Sequence[Device], uris: Sequence[str]) -> Device | None:
    """The device of `opened` that URI `u` opened (`opened` in the order of the distinct `uris`)."""
    distinct = list(dict.fromkeys(uris))
    i = distinct.index(u) if u in distinct else -1
    return opened[i] if 0 <= i < len(opened) else None


def open_distinct(
    open_one: Callable[[], Device],
    uri: str,
    k: int,
    opened: Sequence[Device],
    uris: Sequence[str],
    what: str,
    within: Sequence[tuple[str, float, str]] = (),
) -> Device:
    """`open_one()`, the board of `devices[k]` = `uri`, refused (`ConfigError`, naming both
    entries) when it is a board `opened` holds under another of `uris` (`opened_twice`: its
    lock refuses this very run; `check_distinct`: the same *IDN), its second handle closed;
    and refused, naming the config key, when a value of `within` is past the bound the board
    declares (`check_within_board`)."""
    try:
        board = open_one()
    except BoardLocked as err:
        twice = opened_twice(err, uri, k, opened, uris, what)
        if twice is not None:
            raise twice from err
        raise
    try:
        check_distinct(board, uri, k, opened, uris, what)
    except ConfigError:
        board.close()  # this second handle; the board itself is closed with the run's boards
        raise
    try:
        check_within_board(board, uri, within)
    except ConfigError:
        board.close()  # in its safe state, before anything was configured on it
        raise
    return board


def check_within_board(board: Device, uri: str, within: Sequence[tuple[str, float, str]]) -> None:
    """Refuse a run whose config asks for more than `board` declares: each of `within` is
    (config key, value, the `Limits` field that bounds its magnitude), e.g. ``("ep.beta", 0.2,
    "max_beta")``. Checked as the board opens, so the error names the key to change before a
    run log exists, where the board's own refusal at the first settle named only the request."""
    past = past_bounds(within, board.info.limits)
    if past:
        key, value, bound, most = past[0]
        what = " (the largest nudge current the run injects)" if bound == "max_drive" else ""
        raise ConfigError(
            f"{key} = {value:g}{what}, but the board at {uri} declares {bound} {most:g}: "
            f"set {key} to at most {most:g} (`hil info {shlex.quote(uri)}` shows what it declares)"
        )


def check_distinct(
    board: Device, uri: str, k: int, opened: Sequence[Device], uris: Sequence[str], what: str
) -> None:
    """Refuse `board`, just opened from `devices[k]` = `uri`, when it is a board `opened` holds
    under another URI (same *IDN, serial number included; boards that take no lock, ``?lock=0``).
    In-process emulator boards are each their own board, whatever their identity."""
    scheme, _, _ = parse_options(uri)
    ident = board.info.identity
    if scheme == "emulator" or not ident.serial.strip():
        return
    for u in dict.fromkeys(uris):
        d = _opened_by(u, opened, uris)
        if u != uri and d is not None and d is not board and d.info.identity == ident:
            raise _same_board(k, uri, list(uris).index(u), u, f"both answer *IDN? {ident.idn()}", what)


class BoardLost(DeviceError):
    """A run stopped because the link to one of its boards was given up (`lost_board`)."""


def link_lost(device: Device, error: BaseException | None) -> bool:
    """Whether `error` (a failed run's) means that `device`'s link is gone: the driver gave up
    an operation on it (`RetriesExhausted`, in `error`'s chain, and counted in the driver's
    recovery statistics). Its end-of-run reads and safe state would each spend the driver's
    retry budget again (one warning per attempt) on a board known to be unreachable."""
    from hil.runlog.meta import recovery_stats

    if error is None or _exhausted(error) is None:
        return False
    stats = recovery_stats(device)
    return stats is not None and getattr(stats, "exhausted", 0) > 0


def lost_board(
    error: BaseException, devices: Sequence[Device], uris: Sequence[str], where: str
) -> BoardLost | None:
    """The one-line error of a run whose board's link was given up: ``lost the board URI after
    step 37 (epoch 3): settle failed 4 time(s) ...`` (which board, where the run was, which
    operation failed and why), to raise from `error`; None for any other failure."""
    gave_up = _exhausted(error)
    if gave_up is None or isinstance(error, BoardLost):
        return None
    lost = [uri for dev, uri in zip(devices, uris, strict=False) if link_lost(dev, error)]
    board = f"the board {', '.join(dict.fromkeys(lost))}" if lost else "the board"
    return BoardLost(f"lost {board} {where}: {gave_up}".replace("  ", " "))


def _exhausted(error: BaseException) -> RetriesExhausted | None:
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, RetriesExhausted):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def close_boards(devices: Iterable[Device], *, during: BaseException | None = None) -> None:
    """Put every board of `devices` in its safe state and close it, carrying on after a failure
    (a board whose `safe_state` or `close` raises does not keep the others driven or open);
    then raise the first error, the others added to it as notes (an interrupt, e.g. Ctrl-C,
    before any other error). With `during`, the error a failed run is raising, nothing is
    raised: the errors are added to `during` as notes, never in place of the run's own error."""
    errors: list[BaseException] = []
    for d in devices:
        # a board whose link the run lost: closed only (the driver skips the safe state of a link
        # that failed), not sent a safe state through another round of retries
        ops = (d.close,) if link_lost(d, during) else (d.safe_state, d.close)
        for op in ops:  # close after a failed safe_state too: the port is released
            try:
                op()
            except BaseException as e:  # an interrupt too: the remaining boards are still closed
                errors.append(e)
    if not errors:
        return
    if during is not None:
        for e in errors:
            during.add_note(f"closing the boards also failed: {type(e).__name__}: {e}")
        return
    first = next((e for e in errors if not isinstance(e, Exception)), errors[0])
    for e in errors:
        if e is not first:
            first.add_note(f"closing another board also failed: {type(e).__name__}: {e}")
    raise first


def record_end_state(
    log: RunLog | None, devices: Sequence[Device], uris: Sequence[str], during: BaseException | None = None
) -> None:
    """Record the boards' state (their counters) in `log` as a run fails, ignoring errors:
    the failure's cause may be the boards themselves, and this is never in place of the run's
    own error. Boards whose link `during` (the run's error) lost are not read (`link_lost`).
    Nothing without a log or boards."""
    if log is not None and devices:
        with contextlib.suppress(Exception):
            log.device_state("end", devices, uris, lost=[d for d in devices if link_lost(d, during)])
