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

`power_norm` is the one power iteration that estimates the norm of the free groups' drive on one
another, which bounds a settle's step: the emulator's analog settles (`emulator.settle_plan`,
`emulator.conv_settle`) and the host-iterated settle (`hil.host_settle`) call it with their own
operator, start vector, iteration count, stopping rule and margin.

torch is imported where a tensor is handled, not by this module: `drivers.base` imports
`to_numpy`, and a command that only reads a board or a run log (`hil info`, `hil inspect`)
loads no torch (tests/test_cli_lazy_imports.py). A value can only be a tensor once torch is
loaded, so `to_numpy` looks torch up in `sys.modules`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["denormals_flushed", "flushing_denormals", "power_norm", "to_numpy"]

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
    import torch

    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


# the numpy dtypes a tensor is converted to before it leaves torch (a bfloat16 tensor has no
# numpy view), by the names of their torch dtypes; any other dtype is cast by numpy after the
# conversion
_TORCH_DTYPES = {
    np.dtype(np.float16): "float16",
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
    np.dtype(np.int32): "int32",
    np.dtype(np.int64): "int64",
}


def to_numpy(x: Any, dtype: Any = np.float32) -> np.ndarray:
    """`x` (a torch tensor, a numpy array or anything `np.asarray` takes) as a C-contiguous
    numpy array of `dtype` (float32 by default; None keeps the input's dtype). No copy when
    possible: a contiguous CPU tensor or array of that dtype is returned as a view of its
    memory. A tensor is detached and, off the CPU, copied to the host; a 0-d input stays 0-d."""
    torch = sys.modules.get("torch")  # no tensor exists before torch is imported
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if dtype is None:
            return x.contiguous().numpy()
        want = np.dtype(dtype)
        to = _TORCH_DTYPES.get(want)
        if to is not None:
            return x.to(getattr(torch, to)).contiguous().numpy()
        return np.ascontiguousarray(x.contiguous().numpy(), dtype=want)
    a = np.asarray(x, dtype=dtype)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


# a vector of the power iteration: one tensor, or one tensor per node group (one vector over all
# of them, whose norm is that of all their entries together)
Vector = TypeVar("Vector", "torch.Tensor", "dict[str, torch.Tensor]")


def _norm(v: Vector) -> tuple[float, torch.Tensor | None]:
    """The 2-norm of `v` as a float, and for a single tensor as the 0-d tensor it came from."""
    import torch

    if isinstance(v, torch.Tensor):
        n = torch.linalg.vector_norm(v)
        return float(n), n
    return sum(float(x.square().sum()) for x in v.values()) ** 0.5, None


def _divided(v: Vector, est: float, n: torch.Tensor | None, eps: float | None) -> Vector:
    """`v` over its norm (`est`, or `n` for one tensor), plus `eps` where that is given."""
    import torch

    if isinstance(v, torch.Tensor):
        assert n is not None
        return v / est if eps is None else v / (n + eps)
    by = est if eps is None else est + eps
    return {g: x / by for g, x in v.items()}


def power_norm(
    apply: Callable[[Vector], Vector],
    v: Vector,
    *,
    iters: int,
    margin: float,
    stop: float | None = None,
    eps: float | None = None,
) -> tuple[float, Vector]:
    """Estimate the norm of the linear map `apply` by power iteration from `v`: the norm of the
    map's image of the last unit vector, times `margin` (the iteration approaches the norm from
    below), and that unit vector (to start a later iteration from). A zero image ends it at 0.

    `iters` is the most iterations; `stop`, where given, ends them from the fourth on once the
    estimate is no more than `stop` times the one before (a settled estimate). `eps`: None, each
    image is divided by its norm as a float and the start is used as it is (the host's
    iterations); a float, the start is normalised too and each vector is divided by its norm
    plus `eps`, for a single tensor a 0-d tensor on its device (the emulator's). The two are
    kept apart so that every caller's figures stay what they were to the bit (a CUDA division
    by a Python float multiplies by its reciprocal, one by a tensor divides)."""
    if eps is not None:
        est, n = _norm(v)
        v = _divided(v, est, n, eps)
    est = 0.0
    for i in range(iters):
        u = apply(v)
        last, (est, n) = est, _norm(u)
        if est == 0.0:
            return 0.0, v
        v = _divided(u, est, n, eps)
        if stop is not None and i >= 3 and est <= stop * last:
            break
    return margin * est, v
