"""Opening the board a run trains on, with its calibration record applied when one is given."""

from __future__ import annotations

from drivers import Device, open_device


def open_board(uri: str, calibration: str = "") -> Device:
    """The Device behind `uri`; with a calibration record, wrapped so that the record corrects
    clamps, read-outs and programming targets (refused if it belongs to another board)."""
    device = open_device(uri)
    if not calibration:
        return device
    from calibration import CalibratedDevice, load

    try:
        record = load(calibration, board=device.info)
        return CalibratedDevice(device, record, session=f"hil calibrate '{uri}' --out {calibration}")
    except Exception:
        device.close()
        raise
