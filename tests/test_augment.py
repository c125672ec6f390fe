"""Random translations of the training images (`train.shift`, `hil.augment`): the moved
images against an independent construction, the bounds, and training with them: resumable
(the offsets are indexed by the step) and different from training without them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hil.augment import check_shift, shift_images, step_offsets
from hil.config import ConfigError, load_config, validate


def _moved_by_hand(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Pixel (r, c) of the result is img[r - dy, c - dx] where that exists, else 0."""
    _, h, w = img.shape
    out = torch.zeros_like(img)
    for r in range(h):
        for q in range(w):
            if 0 <= r - dy < h and 0 <= q - dx < w:
                out[:, r, q] = img[:, r - dy, q - dx]
    return out


@settings(max_examples=40, deadline=None)
@given(
    offsets=st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=1, max_size=5),
    channels=st.integers(1, 3),
    flat=st.booleans(),
)
def test_each_image_moves_by_its_own_offset(
    offsets: list[tuple[int, int]], channels: int, flat: bool
) -> None:
    shape = (channels, 7, 9)
    gen = torch.Generator().manual_seed(len(offsets) * 10 + channels)
    x = torch.rand(len(offsets), *shape, generator=gen)
    off = torch.tensor(offsets, dtype=torch.int64)
    got = shift_images(x.reshape(len(x), -1) if flat else x, shape, off)
    assert got.shape == ((len(x), channels * 63) if flat else x.shape) and got.dtype == x.dtype
    for i, (dy, dx) in enumerate(offsets):
        torch.testing.assert_close(got[i].reshape(shape), _moved_by_hand(x[i], dy, dx), rtol=0, atol=0)


def test_no_offset_is_the_same_image_and_a_move_back_restores_the_centre() -> None:
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(shift_images(x, (1, 8, 8), torch.zeros(4, 2, dtype=torch.int64)), x)
    off = torch.tensor([[2, -1], [-2, 2], [0, 1], [1, 0]])
    back = shift_images(shift_images(x, (1, 8, 8), off), (1, 8, 8), -off)
    torch.testing.assert_close(back[..., 2:6, 2:6], x[..., 2:6, 2:6], rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 offsets for 4 images"):
        shift_images(x, (1, 8, 8), off[:3])


def test_offsets_are_bounded_and_a_function_of_seed_and_step() -> None:
    a = step_offsets(1000, 2, seed=0, step=5)
    assert a.shape == (1000, 2) and a.dtype == torch.int64
    assert int(a.min()) == -2 and int(a.max()) == 2  # every value of the range occurs
    assert torch.equal(a, step_offsets(1000, 2, seed=0, step=5))
    assert not torch.equal(a, step_offsets(1000, 2, seed=0, step=6))
    assert not torch.equal(a, step_offsets(1000, 2, seed=1, step=5))


def test_shift_bounds_are_checked_against_the_config_and_the_images() -> None:
    check_shift(3, (1, 8, 8))
    check_shift(0, (1, 8, 8))
    with pytest.raises(ConfigError, match=r"8 x 8 images: at most 3"):
        check_shift(4, (1, 8, 8))
    for bad in (-1, 9):
        with pytest.raises(ConfigError, match=r"train\.shift"):
            validate(load_config(None, [f"train.shift={bad}"]))
        with pytest.raises(ConfigError, match=r"train\.shift"):
            check_shift(bad, (1, 28, 28))


def test_training_with_shifts_resumes_exactly_and_differs_from_training_without(
    tmp_path, crash_and_resume
) -> None:
    """Ideal preset, 8 x 8 digits moved by up to one pixel: a run that dies after its first
    epoch and is resumed ends with the weights of a run that never stopped (the offsets are
    indexed by the step), and those weights differ from the same run without shifts."""
    from hil.train_classifier import train_classifier

    sets = ["train.epochs=2", "data.limit_train=160", "data.limit_test=60", "model.sizes=[64,32,10]"]
    cfg = load_config(None, [*sets, "train.shift=1"])
    resumed = crash_and_resume(cfg, tmp_path / "run.zarr")
    straight = train_classifier(cfg)
    plain = train_classifier(load_config(None, sets))
    for tile, p in straight.model.block.weights.items():
        torch.testing.assert_close(resumed.model.block.weights[tile], p, atol=1e-6, rtol=0)
        assert (p - plain.model.block.weights[tile]).abs().max() > 1e-3
