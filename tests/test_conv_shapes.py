"""Topology.convolutional (the Python API of docs/conv.md) refuses a kernel larger than its
map, a pool larger than the convolution's output and a non-positive input shape with an error
that names the layer, the map, the kernel (or pool) and the fix, as the run config's check does."""

from __future__ import annotations

import pytest

from drivers import ConfigurationError
from drivers.topology import Topology


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        (
            (1, 8, 8),
            {"kernel": 11, "padding": 1},
            r"conv layer 0 \(tile W0\): its 8 x 8 input map .*kernel 11",
        ),
        ((1, 4, 4), {"kernel": 5, "padding": 0}, r"conv layer 0 \(tile W0\): its 4 x 4 input map .*kernel 5"),
        ((1, 8, 8), {"kernel": 3, "padding": 0, "pools": [2, 1, 1]}, r"conv layer 2 \(tile W2\): its 1 x 1"),
        ((1, 4, 4), {"kernel": 3, "padding": 1, "pools": [8]}, r"conv layer 0 .*pool 8"),
    ],
)
def test_a_kernel_or_pool_past_the_map_is_named(shape, kwargs, match) -> None:
    pools = kwargs.pop("pools", [1])
    channels = [4] * len(pools)
    with pytest.raises(ConfigurationError, match=match) as err:
        Topology.convolutional(shape, channels, pools=pools, head=[10], **kwargs)
    assert "smaller kernel" in str(err.value) or "smaller pool" in str(err.value)


def test_an_empty_input_map_is_named() -> None:
    with pytest.raises(ConfigurationError, match=r"input_shape .*\(0, 8, 8\)"):
        Topology.convolutional((0, 8, 8), [4], pools=[1], head=[10])


def test_a_map_the_kernel_fits_still_builds() -> None:
    t = Topology.convolutional((1, 5, 5), [4], pools=[1], kernel=5, padding=0, head=[10])
    assert t.shapes["s1"] == (4, 1, 1)
