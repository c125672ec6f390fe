"""The converters' quantiser and channel errors make one tensor each and compute the same
numbers as the textbook expressions (`emulator.periphery`)."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from emulator.periphery import ChannelErrors, lsb, quantize


def reference(x: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    step = lsb(bits, hi - lo)
    return torch.round((x.clamp(lo, hi) - lo) / step) * step + lo


class CountNew(TorchFunctionMode):
    """Counts the calls that return a new tensor (not in place, no `out=`)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        fresh = isinstance(out, torch.Tensor) and not name.endswith("_") and "out" not in kwargs
        if fresh and name not in ("__get__", "shape", "dtype", "device"):
            self.n += 1
        return out


GEN = torch.Generator().manual_seed(0)
INPUTS = [
    torch.randn(300, 200, generator=GEN) * 2,
    torch.randn(200, 300, generator=GEN).T,  # a settle's batch-major states
    torch.randint(-3, 4, (50,), generator=GEN),
    torch.randn(64, dtype=torch.float64, generator=GEN),
]


@pytest.mark.parametrize("x", INPUTS, ids=["rows", "transposed", "int", "float64"])
@pytest.mark.parametrize(("bits", "lo", "hi"), [(8, 0.0, 1.0), (9, -1.5, 1.5), (4, 0.0, 1.0)])
def test_quantize_is_the_textbook_expression(x: torch.Tensor, bits: int, lo: float, hi: float) -> None:
    want, got = reference(x, bits, lo, hi), quantize(x, bits, lo, hi)
    assert got.dtype == want.dtype and got.stride() == want.stride()
    assert torch.equal(got, want)


def test_quantize_and_channel_errors_make_one_tensor_each() -> None:
    x = torch.rand(200, 256, generator=GEN).T
    errs = ChannelErrors.draw(300, 0.01, 0.5 / 256, torch.Generator().manual_seed(1), torch.device("cpu"))
    want = x * errs.gain[:200] + errs.offset[:200]
    with CountNew() as c:
        got = errs.apply(x)
    assert torch.equal(got, want) and c.n == 1
    with CountNew() as c:
        quantize(x, 8, 0.0, 1.0)
    assert c.n == 1  # the clamp; the rest in place (six tensors before)
