"""The Device interface's front door: URIs, topology validation and request checks."""

from __future__ import annotations

import dataclasses
import pathlib
import typing
from collections.abc import Iterator
from typing import ClassVar, Literal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import drivers.emulated as emulated
import drivers.options as options_mod
from drivers import ConfigurationError, Coupling, Device, LimitViolation, Nudge, Topology, open_device
from drivers.base import CAPABILITIES
from drivers.emulated import EmulatorOptions
from drivers.options import QueryOptions, QueryParams
from drivers.serial import SerialOptions
from drivers.uri import (
    BackendRegistry,
    format_uri,
    known_schemes,
    parse_options,
    parse_uri,
    register_backend,
    replace_params,
    unregister_backend,
)
from drivers.visa import VisaOptions
from drivers.wire.client import MAX_ACK_TIMEOUT_S, MAX_TIMEOUT_S
from emulator.presets import PRESETS


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("emulator://?preset=rram&seed=0", ("emulator", "", {"preset": "rram", "seed": "0"})),
        ("visa://TCPIP0::127.0.0.1::5025::SOCKET", ("visa", "TCPIP0::127.0.0.1::5025::SOCKET", {})),
        ("visa://ASRL/dev/ttyUSB0::INSTR", ("visa", "ASRL/dev/ttyUSB0::INSTR", {})),
        ("serial:///dev/ttyACM0?baud=921600", ("serial", "/dev/ttyACM0", {"baud": "921600"})),
        ("serial+socket://127.0.0.1:7000", ("serial+socket", "127.0.0.1:7000", {})),
        ("serial://COM3?baud=115200", ("serial", "COM3", {"baud": "115200"})),
    ],
)
def test_parse_uri(uri: str, expected: tuple) -> None:
    assert parse_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("rram", "has no scheme"),
        ("gpib://1", "unknown device scheme 'gpib'"),
        ("emulator://?preset=memristor", "unknown preset 'memristor'"),
        ("emulator://?preset=rram&adc_bit=6", "unknown emulator URI parameter 'adc_bit'"),
        ("emulator://?preset=rram&adc_bits=six", "adc_bits='six': expected an integer or none"),
        ("emulator://?seed=x", "seed='x': expected an integer"),
        ("emulator://somehost?preset=rram", "take no host or path"),
        ("serial+socket://localhost", "need HOST:PORT"),
        ("serial://?baud=9600", "need a port"),
        ("visa://garbage", "not a VISA resource string"),
        (
            "serial+socket://127.0.0.1:1?attempts=1",
            r"Is the board on and this the right address\? \(`hil emulator",
        ),
    ],
)
def test_bad_uris_name_the_problem(uri: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        open_device(uri)


def test_the_known_emulator_parameters_are_only_what_a_uri_can_set() -> None:
    """The list offered for a misspelt parameter held state_range, which a URI cannot carry
    (a tuple): every name offered must be accepted by a URI."""
    with pytest.raises(ConfigurationError, match="unknown emulator URI parameter 'bogus'") as info:
        open_device("emulator://?preset=rram&bogus=1")
    known = str(info.value).split("known: ", 1)[1].split(", ")
    assert "adc_bits" in known and "capabilities" in known
    assert "state_range" not in known
    unsettable = [k for k in known if k not in _BOARD_PARAMS and k not in _SETTABLE]
    assert unsettable == []
    with pytest.raises(ConfigurationError, match=r"'state_range' cannot be set from a URI .* preset of your"):
        open_device("emulator://?preset=rram&state_range=0,0.5")


def test_exhausted_retries_ask_the_generic_question_only_where_the_cause_asks_none() -> None:
    from drivers.errors import ProtocolError, RetriesExhausted

    plain = str(RetriesExhausted("open", 4, 0.2, ProtocolError("bad framing")))
    assert plain.endswith("bad framing. Is the board powered and the link connected?")
    asking = str(RetriesExhausted("open", 4, 0.2, ProtocolError("refused. Is the board on at this address?")))
    assert asking.endswith("Is the board on at this address?") and asking.count("?") == 1
    # a board that answers every time with a malformed reply: its firmware, not the cable
    malformed = ProtocolError("malformed status reply: field 'epoch' is missing")
    bad = str(RetriesExhausted("status", 4, 0.2, malformed))
    assert "powered" not in bad and "the link works: its reply breaks docs/protocol.md" in bad


def test_uri_overrides_reach_the_board() -> None:
    with open_device("emulator://?preset=rram&seed=4&adc_bits=6&dac_bits=none&read_noise=1e-8") as dev:
        assert dev.info.limits.adc_bits == 6 and dev.info.limits.dac_bits is None
        assert dev.board.preset.device.read_noise == 1e-8
        assert dev.info.identity.serial == "EMU-00000004"


def test_topology_validation() -> None:
    with pytest.raises(ConfigurationError, match="reserved"):
        Topology({"bias": 3}, ())
    with pytest.raises(ConfigurationError, match="unknown group 'h'"):
        Topology({"x": 3}, (Coupling("W", ("x",), ("h",)),))
    with pytest.raises(ConfigurationError, match="dense tile 'W': rows must be cols"):
        Topology({"x": 3, "h": 2}, (Coupling("W", ("x",), ("h",), kind="dense"),))
    topo = Topology.layered([4, 5, 3])
    assert topo.tile_shape("W0") == (5, 5) and topo.tile_shape("W1") == (6, 3)
    assert topo.cells() == 25 + 18
    dense = Topology.dense({"x": 4, "h": 6})
    assert dense.tile_shape("W") == (11, 10) and dense.cells() == 110


def test_requests_are_checked_before_the_board() -> None:
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        with pytest.raises(ConfigurationError, match="configure"):
            dev.settle({"s0": np.zeros((1, 4), np.float32)})
        dev.configure(Topology.layered([4, 5, 3]))
        with pytest.raises(ConfigurationError, match=r"expected shape \(batch, 4\)"):
            dev.settle({"s0": np.zeros((2, 5), np.float32)})
        with pytest.raises(ConfigurationError, match="NaN"):
            dev.settle({"s0": np.full((2, 4), np.nan, np.float32)})
        with pytest.raises(ConfigurationError, match="unknown group 'out'"):
            dev.settle({"s0": np.zeros((2, 4), np.float32)}, nudge={"out": Nudge(0.1)})
        with pytest.raises(ConfigurationError, match="batch size 3 differs"):
            dev.settle(
                {"s0": np.zeros((2, 4), np.float32)}, nudge={"s2": Nudge(0.1, target=np.zeros((3, 3)))}
            )
        with pytest.raises(ConfigurationError, match="unknown tile 'W9'"):
            dev.read_conductance("W9")
        with pytest.raises(ConfigurationError, match="whole pulse counts"):
            dev.pulse("W0", np.full((5, 5), 0.5), np.zeros((5, 5)))
        with pytest.raises(LimitViolation, match="tile size"):
            dev.configure(Topology.layered([2000, 3]))
        assert dev.safety().violations == 0


def test_boundary_arrays_are_not_copied_on_cpu() -> None:
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        dev.configure(Topology.layered([4, 3], bias=False))
        x = np.random.default_rng(0).uniform(0, 1, (2, 4)).astype(np.float32)
        eq = dev.settle({"s0": x})
        assert eq.states["s0"] is x  # the clamp comes back as given
        assert torch.from_numpy(x).data_ptr() == x.ctypes.data


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_board_matches_cpu_board() -> None:
    x = np.random.default_rng(0).uniform(0, 1, (8, 16)).astype(np.float32)
    results = []
    for device in ("cpu", "cuda"):
        with open_device(f"emulator://?preset=ideal&seed=0&device={device}") as dev:
            dev.configure(Topology.layered([16, 12, 4]))
            lim = dev.info.limits
            g = np.random.default_rng(1).uniform(lim.g_min, lim.g_max, (17, 12)).astype(np.float32)
            dev.program("W0", g, g[::-1].copy())
            results.append(dev.settle({"s0": x}).states["s1"])
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)


def test_wrapper_forwards_status_and_programming_transactions() -> None:
    """A wrapped board (e.g. calibrated) must not hide its reset epoch or an open transaction."""
    from drivers.wrapper import DeviceWrapper

    with open_device("emulator://?preset=ideal&seed=0") as inner:
        inner.configure(Topology.layered([3, 2]))
        dev = DeviceWrapper(inner)
        dev.begin("step-7")
        assert inner.status().transaction == "step-7" and dev.status().transaction == "step-7"
        dev.commit("step-7")
        assert dev.status().transaction is None and dev.status().configured


# ---- the backend registry and typed URI options ------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyOptions(QueryOptions):
    LABEL: ClassVar[str] = "toy"

    seed: int = 0
    gain: float = dataclasses.field(default=1.0, metadata={"gt": 0})
    noisy: bool = False


def _open_toy(target: str, options: ToyOptions) -> Device:
    """A third-party backend in miniature: a bench name and options, an emulated board inside."""
    dev = open_device(f"emulator://?preset=ideal&seed={options.seed}")
    dev.info.extra["bench"] = target
    return dev


@pytest.fixture
def toy_scheme() -> Iterator[str]:
    register_backend("toy", _open_toy, options=ToyOptions)
    try:
        yield "toy"
    finally:
        unregister_backend("toy")


def test_a_backend_registered_at_run_time_is_found_by_scheme(toy_scheme: str) -> None:
    assert "toy" in known_schemes()
    with open_device("toy://bench-3?seed=5&gain=2.5") as dev:
        assert dev.info.identity.serial == "EMU-00000005" and dev.info.extra["bench"] == "bench-3"
    scheme, target, options = parse_options("TOY://bench-3?noisy=yes")
    assert (scheme, target, options) == ("toy", "bench-3", ToyOptions(noisy=True))
    assert replace_params("toy://bench-3?seed=5", gain=0.5) == "toy://bench-3?seed=5&gain=0.5"
    with pytest.raises(ConfigurationError, match=r"toy URI parameter gain=-1\.0: must be > 0"):
        open_device("toy://bench-3?gain=-1")
    with pytest.raises(
        ConfigurationError, match="unknown toy URI parameter 'speed'; known: seed, gain, noisy"
    ):
        open_device("toy://bench-3?speed=2")
    with pytest.raises(ConfigurationError, match="already has a backend; pass replace=True"):
        register_backend("toy", _open_toy)
    with pytest.raises(ConfigurationError, match="already has a backend"):
        register_backend("visa", _open_toy)  # built-in schemes are taken before they are loaded
    with pytest.raises(ConfigurationError, match="not a URI scheme"):
        register_backend("My Board", _open_toy)


def test_a_backend_without_options_class_gets_the_parameters_as_text() -> None:
    registry = BackendRegistry(builtin={}, entry_points=False)
    seen: list[QueryParams] = []
    registry.register("raw", lambda target, options: seen.append(options) or open_device("emulator://"))
    with registry.open("raw://x?a=1&b=two") as dev:
        assert dev.info.preset == "ideal"
    assert seen[0].as_dict() == {"a": "1", "b": "two"}
    assert registry.replace_params("raw://x?a=1", b="3") == "raw://x?a=1&b=3"
    with pytest.raises(ConfigurationError, match="unknown device scheme 'emulator'; known: raw"):
        registry.open("emulator://")  # this registry has no built-ins


def test_an_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        open_device("gpib://1")
    text = str(info.value)
    assert "unknown device scheme 'gpib'; known: emulator, serial, serial+socket, visa" in text
    assert "xbar_hil.backends" in text  # and how a third-party board adds one


def test_a_backend_is_discovered_through_its_entry_point(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed package declares ``[xbar_hil.backends] name = module:BACKEND``; no import
    or registration by the user is needed."""
    (tmp_path / "xbar_toy_backend.py").write_text(
        "from drivers import open_device\n"
        "from drivers.uri import Backend\n"
        "BACKEND = Backend('toyep', lambda target, options: open_device('emulator://?preset=rram&seed=2'))\n"
        "NOT_A_BACKEND = 42\n"
    )
    dist = tmp_path / "xbar_toy_backend-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: xbar-toy-backend\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[xbar_hil.backends]\ntoyep = xbar_toy_backend:BACKEND\nbadep = xbar_toy_backend:NOT_A_BACKEND\n"
        "gone = xbar_no_such_module:BACKEND\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = BackendRegistry()  # a fresh one: what a new process would see
    assert {"toyep", "badep"} <= set(registry.schemes())
    with registry.open("toyep://") as dev:
        assert dev.info.preset == "rram" and dev.info.identity.serial == "EMU-00000002"
    with pytest.raises(ConfigurationError, match=r"is 42, not a drivers.uri.Backend with scheme 'badep'"):
        registry.open("badep://")
    with pytest.raises(ConfigurationError, match=r"entry point 'gone' .* cannot be loaded: No module named"):
        registry.open("gone://")


EXISTING_URIS = [
    "emulator://?preset=rram&seed=0",
    "emulator://?preset=ideal",
    "emulator://?seed=7",
    "emulator://?preset=rram&seed=0&adc_bits=6",
    "emulator://?preset=rram&seed=4&adc_bits=6&dac_bits=none&read_noise=1e-8",
    "emulator://?preset=pcm&seed=1&mvm_range=2.5&device=cpu",
    "emulator://?preset=ecram&seed=2&one_sided=true&kind=linear&gamma_down=0.5",
    "emulator://?preset=rram&seed=0&capabilities=mvm,pulse,program_verify",
    "emulator://?preset=rram&seed=0&capabilities=",
    "visa://TCPIP0::127.0.0.1::5025::SOCKET",
    "visa://ASRL/dev/ttyUSB0::INSTR?timeout=0.25&check=1&attempts=16&backoff=0.01",
    "visa://TCPIP0::127.0.0.1::5025::SOCKET?backend=@py&fast=0&timeout=120",
    "serial:///dev/ttyACM0?baud=921600",
    "serial://COM3?baud=115200&retries=8&ack_timeout=0.05",
    "serial+socket://127.0.0.1:7000?timeout=5&fragment=64&attempts=4&backoff=0.05&retries=2",
]


@pytest.mark.parametrize("uri", EXISTING_URIS)
def test_options_round_trip(uri: str) -> None:
    """parse -> to_query -> parse gives the same options; the written URI is a fixed point."""
    scheme, target, options = parse_options(uri)
    again = format_uri(scheme, target, options)
    assert parse_options(again) == (scheme, target, options)
    assert replace_params(again) == again
    # nothing is invented: defaults are left out, only an emulator's preset and seed are always written
    _, _, given = parse_uri(uri)
    _, _, written = parse_uri(again)
    assert set(written) <= set(given) | {"preset", "seed"}


def test_option_values_are_typed() -> None:
    _, _, emu = parse_options(
        "emulator://?preset=rram&seed=4&adc_bits=6&dac_bits=none&capabilities=mvm,trace"
    )
    assert isinstance(emu, EmulatorOptions)
    assert (emu.seed, emu.capabilities) == (4, frozenset({"mvm", "trace"}))
    assert dict(emu.overrides) == {"adc_bits": 6, "dac_bits": None}
    _, _, visa = parse_options("visa://TCPIP0::h::5025::SOCKET?check=1&timeout=2")
    assert visa == VisaOptions(check=True, timeout=2.0)
    _, _, ser = parse_options("serial+socket://h:7?baud=9600")
    assert ser == SerialOptions(baud=9600)
    with open_device("emulator://?preset=ecram&seed=0&gamma_down=0.5&kind=linear") as dev:
        assert dev.board.preset.device.gamma_down == 0.5 and dev.board.preset.device.kind == "linear"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("visa://X::INSTR?check=maybe", r"visa URI parameter check='maybe': expected 0 or 1"),
        ("visa://X::INSTR?timeout=0", r"visa URI parameter timeout=0\.0: must be > 0"),
        ("visa://X::INSTR?attempts=0", r"attempts=0: must be >= 1"),
        ("visa://X::INSTR?timeout=nan", r"timeout='nan': expected a finite number"),
        (
            "visa://X::INSTR?speed=1&colour=2",
            r"unknown visa URI parameters 'speed', 'colour'; known: backend",
        ),
        ("visa://", "needs a VISA resource"),
        ("serial+socket://h:1?fragment=8", r"fragment=8: must be >= 16 and <= 32768"),
        ("serial://COM3?baud=fast", r"serial URI parameter baud='fast': expected an integer"),
        ("serial://COM3?retries=-1", r"retries=-1: must be >= 0"),
        ("emulator://?capabilities=mvm,relax", r"unknown capability 'relax'; known: settle, mvm, pulse"),
        ("emulator://?kind=spiral", r"kind='spiral': expected one of 'constant', 'linear'"),
        ("emulator://?one_sided=maybe", r"one_sided='maybe': expected 0 or 1"),
        ("emulator://?state_range=0", r"'state_range' cannot be set from a URI"),
        ("emulator://?device=gpu", r"device='gpu': expected a torch device"),
    ],
)
def test_bad_parameters_name_parameter_value_and_what_is_accepted(uri: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_options(uri)


def test_replace_params_rewrites_a_uri() -> None:
    assert (
        replace_params("emulator://?preset=rram&seed=0&adc_bits=6", seed=3)
        == "emulator://?preset=rram&seed=3&adc_bits=6"
    )
    assert replace_params(
        "emulator://?seed=2", read_noise=1e-7, dac_bits=None, capabilities={"settle", "mvm"}
    ) == ("emulator://?preset=ideal&seed=2&capabilities=settle,mvm&dac_bits=none&read_noise=1e-07")
    assert (
        replace_params("visa://TCPIP0::127.0.0.1::5025::SOCKET", check=True, timeout=2.5)
        == "visa://TCPIP0::127.0.0.1::5025::SOCKET?timeout=2.5&check=1"
    )
    assert (
        replace_params("serial+socket://127.0.0.1:7000?baud=9600", baud=115200)
        == "serial+socket://127.0.0.1:7000"  # back to the default: nothing to write
    )
    with pytest.raises(ConfigurationError, match="seed='x': expected an integer"):
        replace_params("emulator://?preset=rram", seed="x")


_BOARD_PARAMS = ("preset", "seed", "device", "capabilities")
_SETTABLE = {
    name: annotation
    for name, (_, annotation) in emulated._override_fields().items()
    if options_mod.settable(annotation)
}


def _value(annotation: object) -> st.SearchStrategy[object]:
    base, optional = options_mod._split_optional(annotation)
    if typing.get_origin(base) is Literal:
        strategy: st.SearchStrategy[object] = st.sampled_from(typing.get_args(base))
    else:
        strategy = {
            bool: st.booleans(),
            int: st.integers(-(2**40), 2**40),
            float: st.floats(allow_nan=False, allow_infinity=False),
            str: st.text(min_size=1),
        }[base]  # type: ignore[index]
    return st.none() | strategy if optional else strategy


_overrides = st.dictionaries(st.sampled_from(sorted(_SETTABLE)), st.just(None), max_size=5).flatmap(
    lambda names: st.fixed_dictionaries({n: _value(_SETTABLE[n]) for n in names})
)
_emulator_options = st.builds(
    EmulatorOptions,
    preset=st.sampled_from(sorted(PRESETS)),
    seed=st.integers(-(2**31), 2**31),
    device=st.sampled_from(["cpu", "cuda", "cuda:1"]),
    capabilities=st.frozensets(st.sampled_from(CAPABILITIES)),
    overrides=_overrides.map(lambda d: tuple(d.items())),
)
_seconds = st.floats(min_value=1e-6, max_value=MAX_TIMEOUT_S, allow_nan=False)  # the declared bound
_visa_options = st.builds(
    VisaOptions,
    backend=st.sampled_from(["@py", "@ivi", "@sim", "/opt/visa/lib.so@ivi"]),
    timeout=_seconds,
    fast=st.booleans(),
    check=st.booleans(),
    attempts=st.integers(1, 100),
    backoff=st.floats(min_value=0, max_value=10),
)
_serial_options = st.builds(
    SerialOptions,
    baud=st.integers(1, 10**7),
    timeout=_seconds,
    ack_timeout=st.floats(min_value=1e-6, max_value=MAX_ACK_TIMEOUT_S, allow_nan=False),
    retries=st.integers(0, 50),
    fragment=st.integers(16, 32768),
    attempts=st.integers(1, 100),
    backoff=st.floats(min_value=0, max_value=10),
)


@settings(max_examples=60, deadline=None)
@given(
    case=st.one_of(
        _emulator_options.map(lambda o: ("emulator", "", o)),
        _visa_options.map(lambda o: ("visa", "TCPIP0::10.0.0.2::5025::SOCKET", o)),
        _serial_options.map(lambda o: ("serial+socket", "127.0.0.1:7000", o)),
        _serial_options.map(lambda o: ("serial", "/dev/ttyACM0", o)),
    )
)
def test_any_valid_options_survive_a_round_trip_through_their_uri(case: tuple[str, str, object]) -> None:
    scheme, target, options = case
    uri = format_uri(scheme, target, options)  # type: ignore[arg-type]
    assert parse_options(uri) == (scheme, target, options)
