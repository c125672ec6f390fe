"""A list key given without brackets is refused with an example to copy: ``--set
model.sizes=64,32,10`` said "e.g. model.sizes=['64,32,10']", a list of one string, which the
key then refused again (a list of int). The example is now the list the words make, and it is
taken as given."""

from __future__ import annotations

import pytest

from hil.config import ConfigError, RunConfig, load_into


@pytest.mark.parametrize(
    ("given", "example"),
    [
        ("model.sizes=64,32,10", "model.sizes=[64,32,10]"),
        ("model.sizes=64 32 10", "model.sizes=[64,32,10]"),
        ("train.lr=0.05", "train.lr=[0.05]"),
        (
            "devices=emulator://?seed=1,emulator://?seed=2",
            "devices=['emulator://?seed=1','emulator://?seed=2']",
        ),
    ],
)
def test_the_example_is_the_list_and_is_taken(given: str, example: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_into(RunConfig(), None, [given])
    assert str(info.value).endswith(f"write it in brackets, e.g. {example}"), str(info.value)
    load_into(RunConfig(), None, [example])  # the example runs as it reads
