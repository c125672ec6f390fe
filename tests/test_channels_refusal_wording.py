"""An emulated board with fewer converter channels than a network's nodes said "give the emulated
board more with &channels=N in its URI" also to a host that reached it over a link (`hil
emulator serve`, the rehearsal of a lab board): `hil train --set device=visa://...` printed it,
and that URI takes no `channels` (it is refused as an unknown VISA parameter). The refusal names
where the count is set for both: the emulator:// URI, or `hil emulator serve --set channels=N`."""

from __future__ import annotations

import pytest

from drivers import Topology, open_device
from drivers.errors import ConfigurationError, DeviceError
from hil.testing import served_board

SMALL = "emulator://?preset=ideal&seed=0&channels=16"


def _refusal(uri: str, sizes: list[int] | None = None) -> str:
    with open_device(uri) as dev, pytest.raises(ConfigurationError) as info:
        dev.configure(Topology.layered(sizes or [16, 8, 4]))  # 28 nodes (the bias is no channel)
    return str(info.value)


def test_the_refusal_fits_an_scpi_error_whole() -> None:
    """A served board's refusal reaches its client as an SCPI error string, at most 255
    characters (longer ones are cut, ending in '...'): the whole fix must fit."""
    with served_board(board="emulator://?preset=ideal&seed=0&channels=1000") as servers:
        message = _refusal(servers.uri("visa-tcp"), [1023, 1024])  # a 4-digit count either side
    assert message.endswith("&channels=2047 in an emulator:// URI)"), message


def test_in_process_the_refusal_names_the_uri_parameter() -> None:
    message = _refusal(SMALL)
    assert "the board has 16 channels" in message
    assert "&channels=28 in an emulator:// URI" in message


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_over_a_link_the_refusal_names_the_servers_option(transport: str) -> None:
    with served_board(board=SMALL) as servers:
        message = _refusal(servers.uri(transport))
    assert "hil emulator serve --set channels=28; &channels=28 in an emulator:// URI)" in message
    # the fix the old wording gave, on the client's URI, is refused
    with served_board(board=SMALL) as servers, pytest.raises(DeviceError, match="channels"):
        open_device(servers.uri(transport) + ("&" if "?" in servers.uri(transport) else "?") + "channels=28")
