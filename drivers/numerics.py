"""Floating-point mode of the threads that settle networks.

A settle relaxes ``s <- s + dt (rho(u) - s)``: a unit held at the lower clamp (``rho = 0``)
decays geometrically, ``(1 - dt)^k s``, and after about 130 steps at ``dt = 0.5`` its state is
a subnormal float32 (below 1.2e-38). CPUs that take a microcode assist for every subnormal
operand (the Intel Xeon this project runs on since 2026-12-04 does) pay ~100 times a normal
element for each: the README's main job took over 12 minutes there instead of 37-58 s (2 cores,
one thread) until its settles flushed subnormals to zero.

`denormals_flushed` is a context manager that turns on the calling thread's flush-to-zero and
denormals-are-zero modes (SSE's MXCSR, through ``torch.set_flush_denormal``) for the settle it
wraps and restores the mode the thread had before. Scoped, not set once: the mode is per
thread (a server or Ray actor settles on threads of its own), and a mode left on would change
the caller's own arithmetic (hypothesis, for one, refuses to draw floats under it). Numpy's
loops follow the same register, so a numpy settle is covered too. Entering and leaving costs
about 1 us (timeit, this machine). The numerical effect is confined to values under 1.2e-38
(float32) or 2.2e-308 (float64), far below any node's noise floor or converter LSB.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["denormals_flushed", "flushing_denormals"]

# the smallest float32 subnormal, from its bits: a literal would be flushed itself if this module
# were imported on a thread that already flushes
_TINY = np.frombuffer(b"\x01\x00\x00\x00", dtype=np.float32)[0]
_ONE = np.float32(1.0)


def flushing_denormals() -> bool:
    """Whether the calling thread flushes subnormals to zero (its MXCSR's DAZ or FTZ bit)."""
    return bool(_TINY * _ONE == 0)


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Flush subnormal floats to zero on the calling thread inside the block, then restore the
    thread's mode. Where the CPU has no such mode, the block runs as it is."""
    if flushing_denormals():
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
