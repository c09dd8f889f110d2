"""Process exit codes of every ``fedfstq`` command, one per failure class.

One table for the edge agent, the aggregator and the other commands, so a script, a systemd unit
or a container engine reads them all the same way. They are distinct so a supervisor can tell
"fix the configuration" from "try again later": ``RestartPreventExitStatus=2 3 4`` stops restart
loops on errors a restart cannot fix, while ``Restart=on-failure`` retries
``BROKER_UNREACHABLE`` and ``UNEXPECTED``.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode", "for_connect_refusal"]


class ExitCode(IntEnum):
    """Exit status of ``fedfstq agent`` and ``fedfstq aggregator``; ``help`` says what it means.

    ``fedfstq aggregator --check`` answers a health probe with 0 (healthy), 1 (unhealthy) or 2
    (configuration error).
    """

    help: str

    def __new__(cls, value: int, help: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.help = help
        return member

    OK = 0, "stopped cleanly (signal, max_rounds reached, or a check passed)"
    UNEXPECTED = 1, "unexpected error (a bug or a broken state directory); see the log"
    CONFIG = 2, "invalid configuration (TOML, environment, flags, or broker credentials)"
    DATA = 3, "a data file (training or evaluation) is missing, unreadable or has no examples"
    MODEL = 4, "the base model, its tokenizer or a stored adapter could not be loaded"
    BROKER_UNREACHABLE = 5, "no connection to the MQTT broker within the start-up timeout"


#: CONNACK reason codes a restart cannot fix: unsupported protocol version, client id refused,
#: bad user name or password, not authorised, bad authentication method. Others (server busy,
#: quota exceeded, ...) may clear up, so they count as "broker unreachable".
_CONFIG_REFUSALS = frozenset({0x84, 0x85, 0x86, 0x87, 0x8C})


def for_connect_refusal(reason_code: int | None) -> ExitCode:
    """Exit code for a broker that refused the connection with ``reason_code``."""
    return ExitCode.CONFIG if reason_code in _CONFIG_REFUSALS else ExitCode.BROKER_UNREACHABLE
