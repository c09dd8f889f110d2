"""``fedfstq agent`` flags, settings assembly and ``--check-config`` exit codes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from agent_support import PAIRS

from broker.local import LocalBroker, free_port
from common.exit_codes import ExitCode
from edge_agent.cli import ConfigError, add_arguments, load_settings, main
from workload.data import write_jsonl


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def write_config(tmp_path: Path, port: int, **extra: str) -> Path:
    data = tmp_path / "data.jsonl"
    write_jsonl(data, PAIRS)
    lines = [
        'client_id = "dev-cli"',
        f'data_path = "{data}"',
        f'state_dir = "{tmp_path / "state"}"',
        'model = "tiny"',
        *(f"{k} = {v}" for k, v in extra.items()),
        "[mqtt]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "backoff_base_s = 0.05",
        "backoff_max_s = 0.2",
    ]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_flags_override_the_file_and_conflict_with_the_environment(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1883, max_rounds="3")
    s = load_settings(config, {"client_id": "dev-flag", "broker_port": 1999}, environ={})
    assert (s.client_id, s.mqtt.client_id, s.mqtt.port, s.max_rounds) == (
        "dev-flag",
        "dev-flag",
        1999,
        3,
    )
    with pytest.raises(ConfigError, match="--broker-port and FEDFSTQ_AGENT_MQTT__PORT"):
        load_settings(config, {"broker_port": 1999}, environ={"FEDFSTQ_AGENT_MQTT__PORT": "1"})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("client_id = ", "not valid TOML"),
        ('fleet = "f"\n', "client_id: Field required"),
        ('client_id = "a/b"\n', "client_id: String should match pattern"),
    ],
)
def test_bad_config_exits_with_config_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    assert main(parse("--config", str(config), "--check-config"), environ={}) == ExitCode.CONFIG
    assert message in caplog.text


@pytest.mark.parametrize(("flag", "code"), [("--data", ExitCode.DATA), ("--model", ExitCode.MODEL)])
def test_check_config_reports_missing_data_or_model(
    tmp_path: Path, flag: str, code: ExitCode
) -> None:
    config = write_config(tmp_path, free_port())
    args = parse("--config", str(config), flag, str(tmp_path / "nope"), "--check-config")
    assert main(args, environ={}) == code


def test_check_config_reports_an_unreachable_broker(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())  # nothing listens there
    args = parse("--config", str(config), "--check-config", "--check-timeout", "1")
    assert main(args, environ={}) == ExitCode.BROKER_UNREACHABLE


@pytest.mark.broker
def test_check_config_passes_for_a_good_config(
    mosquitto: LocalBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, mosquitto.port)
    assert main(parse("--config", str(config), "--check-config"), environ={}) == ExitCode.OK
    assert "configuration OK: client dev-cli" in capsys.readouterr().out


def test_agent_exits_with_data_error_before_touching_the_broker(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    (tmp_path / "data.jsonl").write_text('{"prompt": "no response"}\n')
    assert main(parse("--config", str(config)), environ={}) == ExitCode.DATA
