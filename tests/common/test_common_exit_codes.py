"""The one exit-code table of every ``fedfstq`` command."""

from __future__ import annotations

from common.exit_codes import ExitCode, for_connect_refusal


def test_exit_codes_are_distinct_and_explained() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "UNEXPECTED": 1,
        "CONFIG": 2,
        "DATA": 3,
        "MODEL": 4,
        "BROKER_UNREACHABLE": 5,
    }
    assert all(c.help for c in ExitCode)


def test_a_refused_connection_is_configuration_only_when_a_restart_cannot_fix_it() -> None:
    assert for_connect_refusal(0x86) is ExitCode.CONFIG  # bad user name or password
    assert for_connect_refusal(0x87) is ExitCode.CONFIG  # not authorised
    assert for_connect_refusal(0x89) is ExitCode.BROKER_UNREACHABLE  # server busy
    assert for_connect_refusal(None) is ExitCode.BROKER_UNREACHABLE
