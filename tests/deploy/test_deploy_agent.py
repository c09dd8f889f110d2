"""The edge agent's deployment files: the systemd unit, the example config, the install script.

``systemd-analyze verify`` checks the unit's syntax and that ExecStart= names an executable, so
the unit is rendered with this virtualenv's ``fedfstq`` in place of /opt/fedfstq/.venv (what
deploy/install-agent.sh does for another PREFIX). verify exits 0 on unknown keys or bad values
("ignoring"), so any diagnostic naming the unit fails the test too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from broker.settings import MqttSettings, TlsSettings
from common.exit_codes import ExitCode
from edge_agent.settings import AgentSettings, CompressionSettings, TrainingSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "fedfstq-agent.service"
AGENT_EXAMPLE = DEPLOY / "config" / "agent.example.toml"
INSTALL = DEPLOY / "install-agent.sh"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None
)


def _directives(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (all sections; repeated keys keep every value)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _one(unit: dict[str, list[str]], key: str) -> str:
    (value,) = unit[key]
    return value


def test_unit_runs_the_agent_as_a_hardened_notify_service() -> None:
    unit = _directives(UNIT.read_text())
    assert _one(unit, "Type") == "notify"
    assert _one(unit, "ExecStart").startswith("/opt/fedfstq/.venv/bin/fedfstq ")
    assert " agent --config /etc/fedfstq/agent.toml" in _one(unit, "ExecStart")
    # Restart policy follows the exit codes: config/data/model errors need an operator.
    assert _one(unit, "Restart") == "on-failure"
    prevented = {int(code) for code in _one(unit, "RestartPreventExitStatus").split()}
    assert prevented == {ExitCode.CONFIG, ExitCode.DATA, ExitCode.MODEL}
    assert ExitCode.BROKER_UNREACHABLE not in prevented and ExitCode.UNEXPECTED not in prevented
    assert int(_one(unit, "WatchdogSec")) >= 300  # training blocks the loop's pings
    # Hardening and identity.
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "User": "fedfstq",
        "StateDirectory": "fedfstq-agent",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
    }.items():
        assert _one(unit, key) == value, key
    env = dict(v.split("=", 1) for v in unit["Environment"])
    assert env["FEDFSTQ_AGENT_STATE_DIR"] == "%S/fedfstq-agent"
    # The password comes in as a credential, never through the environment or the TOML file.
    assert _one(unit, "LoadCredential") == "mqtt_password:/etc/fedfstq/mqtt_password"
    assert env["FEDFSTQ_AGENT_MQTT_PASSWORD_FILE"] == "%d/mqtt_password"
    assert not any("PASSWORD=" in v for v in unit["Environment"])
    # SmolLM2-135M training peaks at ~2.3 GB RSS: the hard limit must leave headroom.
    match = re.fullmatch(r"(\d+)([MG])", _one(unit, "MemoryMax"))
    assert match is not None
    mib = int(match[1]) * (1024 if match[2] == "G" else 1)
    assert mib >= 2.3e9 * 1.2 / 2**20


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    fedfstq = venv / "bin" / "fedfstq"
    if not os.access(fedfstq, os.X_OK):
        pytest.skip(f"{fedfstq} is not installed (verify needs an executable ExecStart)")
    rendered = tmp_path / UNIT.name  # verify wants the unit's real name
    rendered.write_text(UNIT.read_text().replace("/opt/fedfstq/.venv/", f"{venv}/"))
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(rendered)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    problems = [line for line in (done.stdout + done.stderr).splitlines() if UNIT.name in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


def _field_names(model: type) -> set[str]:
    return set(model.model_fields)  # type: ignore[attr-defined]


def _keys_mentioned(text: str) -> set[str]:
    """Keys set or shown commented out (``key = ...`` / ``# key = ...``)."""
    return set(re.findall(r"^#? ?([a-z_]+) = ", text, flags=re.MULTILINE))


def test_agent_example_lists_every_setting_and_loads() -> None:
    text = AGENT_EXAMPLE.read_text()
    mentioned = _keys_mentioned(text)
    expected = (
        _field_names(AgentSettings)
        | _field_names(MqttSettings)
        | _field_names(TlsSettings)
        | _field_names(TrainingSettings)
        | _field_names(CompressionSettings)
    ) - {"mqtt", "training", "compression", "tls"}  # the tables themselves
    assert expected <= mentioned, sorted(expected - mentioned)
    assert not mentioned - expected, sorted(mentioned - expected)  # no stale keys
    # Uncommented, it is a valid configuration once the device id is filled in.
    data = tomllib.loads(text.replace("CHANGE-ME", "dev-07"))
    settings = AgentSettings(**data)
    assert settings.client_id == "dev-07" and settings.mqtt.username == "dev-07"
    assert settings.mqtt.tls is not None and settings.mqtt.port == 8883
    # Every commented default is valid as well.
    uncommented = re.sub(r"^# ([a-z_]+ = )", r"\1", text, flags=re.MULTILINE)
    full = tomllib.loads(uncommented.replace("CHANGE-ME", "dev-07"))
    full.pop("mqtt_password_file")  # points at a file that does not exist here
    full["mqtt"].pop("password")
    full["mqtt"]["tls"] = {"ca_file": "/etc/fedfstq/ca.crt"}  # cert/key pair: files
    AgentSettings(**full)


def test_install_script_dry_run_installs_the_unit_and_credential(tmp_path: Path) -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)
    done = subprocess.run(
        ["bash", str(INSTALL), "--client-id", "dev-07", "--password-file", "pw", "--data", "d"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "DRY_RUN": "1", "PREFIX": "/srv/fedfstq"},
    )
    assert done.returncode == 0, done.stderr
    steps = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert any("--index-url https://download.pytorch.org/whl/cpu" in s for s in steps)
    assert "install -m 0600 -o root -g root pw /etc/fedfstq/mqtt_password" in steps
    assert "sed -i s/CHANGE-ME/dev-07/g /etc/fedfstq/agent.toml" in steps
    assert "sed -i s#/opt/fedfstq/#/srv/fedfstq/#g /etc/systemd/system/fedfstq-agent.service" in (
        steps
    )
    assert any(s.endswith("agent --config /etc/fedfstq/agent.toml --check-config") for s in steps)
    assert steps[-1] == "systemctl enable --now fedfstq-agent"
    bad = subprocess.run(
        ["bash", str(INSTALL), "--client-id", "no spaces"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "DRY_RUN": "1"},
    )
    assert bad.returncode == 2
