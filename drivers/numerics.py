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

`to_numpy` is the one conversion of a tensor (or array-like) to a numpy array that the host
stack and the Device layer use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

__all__ = ["denormals_flushed", "flushing_denormals", "to_numpy"]

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


# the numpy dtypes a tensor is converted to before it leaves torch (a bfloat16 tensor has no
# numpy view); any other dtype is cast by numpy after the conversion
_TORCH_DTYPES = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
}


def to_numpy(x: Any, dtype: Any = np.float32) -> np.ndarray:
    """`x` (a torch tensor, a numpy array or anything `np.asarray` takes) as a C-contiguous
    numpy array of `dtype` (float32 by default; None keeps the input's dtype). No copy when
    possible: a contiguous CPU tensor or array of that dtype is returned as a view of its
    memory. A tensor is detached and, off the CPU, copied to the host; a 0-d input stays 0-d."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if dtype is None:
            return x.contiguous().numpy()
        want = np.dtype(dtype)
        to = _TORCH_DTYPES.get(want)
        if to is not None:
            return x.to(to).contiguous().numpy()
        return np.ascontiguousarray(x.contiguous().numpy(), dtype=want)
    a = np.asarray(x, dtype=dtype)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)
