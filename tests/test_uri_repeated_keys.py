"""A device URI that gives one query key twice is refused, naming the key and every value
(``emulator://?preset=rram&max_batch=64&max_batch=32`` used to take 32 without a word: on a
board where a bound protects devices, a copy-paste must not pick one of two values)."""

from __future__ import annotations

import pytest

from drivers.errors import ConfigurationError
from drivers.uri import open_device, parse_options, parse_uri, replace_params


@pytest.mark.parametrize(
    ("uri", "key", "values"),
    [
        ("emulator://?preset=rram&max_batch=64&max_batch=32", "max_batch", ("64", "32")),
        ("visa://TCPIP0::127.0.0.1::5025::SOCKET?timeout=5&timeout=500", "timeout", ("5", "500")),
        ("serial:///dev/ttyACM0?baud=921600&baud=115200", "baud", ("921600", "115200")),
        ("serial+socket://127.0.0.1:7000?attempts=3&retries=1&attempts=30", "attempts", ("3", "30")),
    ],
)
def test_a_repeated_uri_key_is_refused_naming_it_and_both_values(
    uri: str, key: str, values: tuple[str, str]
) -> None:
    for check in (parse_uri, parse_options):
        with pytest.raises(ConfigurationError) as info:
            check(uri)
        message = str(info.value)
        assert f"{key!r} 2 times" in message
        for value in values:
            assert f"{key}={value}" in message
        assert "keep the one you mean" in message


def test_a_repeated_key_is_refused_when_opening_and_when_rewriting() -> None:
    uri = "emulator://?preset=rram&max_batch=64&max_batch=32"
    with pytest.raises(ConfigurationError, match="'max_batch' 2 times"):
        open_device(uri)
    with pytest.raises(ConfigurationError, match="'max_batch' 2 times"):
        replace_params(uri, seed=1)


def test_distinct_keys_still_parse() -> None:
    assert parse_uri("emulator://?preset=rram&max_batch=64&seed=0")[2] == {
        "preset": "rram",
        "max_batch": "64",
        "seed": "0",
    }


def test_a_served_boards_uri_with_a_parameter_it_has_replaces_it() -> None:
    """`ServedBoard.uri` (behind the plugin's `device_on`) pasted parameters onto its URI: on a
    board with byte faults, whose SCPI URIs carry ``?check=1``, ``check=...`` came twice."""
    from hil.testing import FaultPlan, served_board

    with served_board(plan=FaultPlan(ber=1e-9)) as servers:
        uri = servers.uri("visa-tcp", check="1", timeout="2")
        assert uri.count("check=") == 1 and uri.endswith("?check=1&timeout=2"), uri
        with open_device(uri) as dev:
            assert dev.info.identity.model


def test_serve_refuses_a_set_key_given_twice() -> None:
    """`hil emulator serve --set max_batch=64 --set max_batch=32` built its URI from a dict:
    the same copy-paste as in a URI's query, and 32 was served without a word."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "hil.cli", "emulator", "serve", "--preset", "ideal", "--scpi-port", "-1"]
    cmd += ["--set", "max_batch=64", "--set", "max_batch=32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--set max_batch given twice (--set max_batch=64, --set max_batch=32)" in done.stderr
