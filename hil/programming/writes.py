"""Schemes that write whole tiles: every change of the host weights is a program of the
tile (``ideal``: a direct write, one pulse per device, landing with the device's write noise;
``verify``: a write-verify, closed loop to `tol`)."""

from __future__ import annotations

import numpy as np
import torch

from drivers.base import Device
from hil.programming.scheme import Programmed, SchemeBase, TileState, _keep_host


class IdealWrites(SchemeBase):
    """``ideal``: every change is a direct write of the whole tile."""

    name = "ideal"
    verify_first = False

    def _update(
        self, device: Device, tile: str, st: TileState, w: np.ndarray | torch.Tensor
    ) -> list[Programmed]:
        st.updates += 1
        out = [self._write(device, tile, st, w, kind="write", verify=self.verify_first)]
        _keep_host(st, w)  # what `target` and `commit` start from (no float64 copy)
        return out


class VerifiedWrites(IdealWrites):
    """``verify``: every change is a write-verify of the whole tile."""

    name = "verify"
    verify_first = True
