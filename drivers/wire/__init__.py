"""Wire codecs shared by the remote backends (drivers.visa, drivers.serial) and the
emulator's servers (emulator.server), so both ends speak from one definition.

- `payload`: the Device operations as messages (JSON metadata + raw little-endian arrays);
- `scpi`: SCPI headers, IEEE 488.2 blocks and error strings;
- `frames`: COBS/CRC-32 frames of the serial protocol;
- `codes`: error codes and their mapping to `drivers.errors`;
- `client`: the transport-independent half of a remote Device.

The specification is docs/protocol.md.
"""
