"""Opening the board a run trains on, with its calibration record applied when one is given."""

from __future__ import annotations

import shlex

from drivers import Device, open_device
from drivers.tiled import TiledDevice


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
