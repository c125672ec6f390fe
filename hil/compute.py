"""The compute device of the host stack: where its tensors live (``cpu``, ``cuda``, ``cuda:1``).

A run config's ``compute`` key (top level, next to ``device``) names it. It is not called
``device`` because that key already is the *board*'s URI (``emulator://...``, ``visa://...``):
the board is where the physics happens, the compute device is where the host's arithmetic
happens (the EB blocks' weights and EP gradients, the digital ff-EBM parts, a host-iterated
settle, and the in-process emulator's arrays).

- `resolve_compute` checks the text and returns a ``torch.device``, with an error that names
  the fix (an unknown string; ``cuda`` asked for where torch sees no CUDA device).
- `board_uri` gives an in-process emulator board (``emulator://``) the same torch device
  unless its URI sets one (``&device=...``); remote boards keep numpy on the wire, so their
  URIs are left as they are.

Reproducibility across compute devices: every random draw of the host stack (initial weights,
the digital parts' initialisation, the sign of beta, the programming schemes' dithering) comes
from a *CPU* generator of `drivers.seeds` and the result is moved to the compute device, so one
seed gives the same numbers on CPU and CUDA up to float rounding (the CUDA matmuls sum in
another order). CUDA generators seeded from the same streams would not: torch's CPU (Mersenne
Twister) and CUDA (Philox) generators give different sequences for the same seed. The
emulator draws a board's fabrication variation and converter errors the same way (the same chip
on every device); its run-time noise (read, write and node noise) is drawn on the board's device
from a generator seeded from the ``board.noise`` stream, so noisy presets agree across devices
in distribution, not number by number (drawing that noise on the CPU and copying it would cost
a transfer per settle step).
"""

from __future__ import annotations

import torch

from drivers.uri import parse_uri, replace_params

__all__ = ["board_uri", "resolve_compute"]


class ComputeDeviceError(ValueError):
    """The ``compute`` key names no usable torch device; the message names the fix."""


def resolve_compute(
    text: str | torch.device | None, key: str = "compute", *, available: bool = True
) -> torch.device:
    """`text` (``cpu``, ``cuda``, ``cuda:1``; None: cpu) as a torch device, checked: an unknown
    string or a device type other than cpu/cuda raise `ComputeDeviceError`, naming `key` and the
    fix; with `available` (default) so do CUDA where torch sees none and a CUDA index past the
    devices present (a config is checked without it: a run recorded on a GPU machine can still be
    read on one without)."""
    if text is None:
        return torch.device("cpu")
    if isinstance(text, torch.device):
        dev = text
    else:
        try:
            dev = torch.device(str(text).strip())
        except (RuntimeError, ValueError):
            raise ComputeDeviceError(
                f"{key}={text!r}: not a torch device; use cpu, cuda or cuda:N (e.g. --set {key}=cuda:1)"
            ) from None
    if dev.type not in ("cpu", "cuda"):
        raise ComputeDeviceError(f"{key}={text!r}: the host stack runs on cpu or cuda[:N], not {dev.type}")
    if dev.type == "cuda" and available:
        if not torch.cuda.is_available():
            raise ComputeDeviceError(
                f"{key}={text!r} asked for, but torch sees no CUDA device (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'none'}); set {key}=cpu (--set {key}=cpu), or "
                "install a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        n = torch.cuda.device_count()
        if dev.index is None:  # indexed, as a tensor's device is (`cuda` != `cuda:0` in torch)
            return torch.device("cuda", torch.cuda.current_device())
        if dev.index >= n:
            raise ComputeDeviceError(
                f"{key}={text!r}: torch sees {n} CUDA device{'s' if n != 1 else ''} "
                f"(cuda:0{f' .. cuda:{n - 1}' if n > 1 else ''}); pick one of them"
            )
    return dev


def board_uri(uri: str, compute: torch.device | str | None) -> str:
    """`uri` with ``device=`` set to `compute` when it names an in-process emulator board that
    sets no device itself; any other URI (remote boards, an emulator URI with its own
    ``device=``) unchanged. A cpu compute device leaves the URI as it is (cpu is the default)."""
    dev = resolve_compute(compute)
    scheme, _target, params = parse_uri(uri)
    if scheme != "emulator" or "device" in params or dev.type == "cpu":
        return uri
    return replace_params(uri, device=str(dev))
