"""Opening the board a run trains on, with its calibration record applied when one is given, and
the board URI of every EB block of a multi-block model (`block_uris`)."""

from __future__ import annotations

import shlex

from drivers import Device, open_device
from drivers.tiled import TiledDevice
from drivers.uri import parse_options, replace_params
from hil.config import ConfigError, RunConfig, check_devices, eb_blocks


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
