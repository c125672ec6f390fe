"""`drivers.numerics.to_numpy`, the one tensor-to-numpy conversion of the host stack and the
Device layer: float32 by default (dtype=None keeps the input's), C-contiguous, a view where
no copy is needed."""

import numpy as np
import torch

from drivers.numerics import to_numpy


def test_a_contiguous_float32_tensor_is_viewed_not_copied() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    a = to_numpy(t)
    assert a.dtype == np.float32 and np.shares_memory(a, t.numpy())
    b = np.arange(6, dtype=np.float32)
    assert to_numpy(b) is b


def test_dtype_converts_or_keeps() -> None:
    t = torch.arange(6, dtype=torch.float64, requires_grad=True)
    assert to_numpy(t).dtype == np.float32
    assert to_numpy(t, dtype=None).dtype == np.float64
    assert to_numpy(torch.arange(3), dtype=None).dtype == np.int64
    assert to_numpy(torch.ones(3, dtype=torch.bfloat16)).dtype == np.float32
    assert to_numpy(np.arange(3), dtype=None).dtype == np.arange(3).dtype
    assert to_numpy([1, 2], dtype=np.uint8).dtype == np.uint8


def test_the_result_is_contiguous_and_0d_stays_0d() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).T
    a = to_numpy(t)
    assert a.flags.c_contiguous and np.array_equal(a, t.numpy())
    assert to_numpy(np.arange(6.0).reshape(2, 3).T, dtype=None).flags.c_contiguous
    assert to_numpy(torch.tensor(2.0)).shape == () and to_numpy(2.0).shape == ()
