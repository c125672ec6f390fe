"""The capabilities a board may declare (`DeviceInfo.capabilities`), what a call needing each
one does, and what a host uses on a board without it. Plain data, importable without numpy or
torch (`hil emulator serve --help` names them)."""

CAPABILITIES = ("settle", "mvm", "pulse", "program_verify", "trace", "preset_state")

# The link's capability, not the array's: a board whose servers keep one owner at a time
# (docs/protocol.md, "Ownership") declares it; `emulator://?capabilities=` takes CAPABILITIES
# only, and `hil emulator serve` adds it.
LOCK = "lock"

# What a call needing each capability does, and what a host uses on a board without it:
# `Device.require` words every refusal from these two tables, so all backends say the same.
CAPABILITY_ACTIONS = {
    "settle": "settle",
    "mvm": "multiply (mvm)",
    "pulse": "apply programming pulses",
    "program_verify": "program with write-verify",
    "trace": "record a settle trace",
    "preset_state": "start a settle from given node states (init=)",
}
CAPABILITY_INSTEAD = {
    "settle": (
        "iterate the fixed point on the host: EBBlock(..., settle='host') or `--set ep.settle=host`, "
        "which use `mvm`"
    ),
    "mvm": "use settle, or read_conductance and multiply on the host",
    "pulse": "program with write-verify instead (programming scheme `verify`)",
    "program_verify": "use program(..., verify=False), or verify on the host with read_conductance",
    "trace": "settle with trace=False",
    "preset_state": "settle without init= (the board relaxes from its rest state), or settle on the host",
}
