"""``fedfstq enrol``: broker credentials and an agent configuration for a new device.

Run on the server next to the Mosquitto password file::

    fedfstq enrol --client-id dev-07 --password-file deploy/secrets/passwd \\
        --broker-host broker.example.org --out-dir enrolled/

It generates a random password, adds the device to the password file with
``mosquitto_passwd -b`` (creating the file if needed) and writes ``<out-dir>/<id>/mqtt_password``
(0600) and ``<out-dir>/<id>/agent.toml`` (the annotated example with the device's id, fleet and
broker filled in). No ACL change is needed: the shipped ``fstq.acl`` grants every device its
topics through ``%u`` patterns (user name = client id). Mosquitto reads the password file at start
and on SIGHUP (``docker compose kill -s SIGHUP mosquitto``).

An existing user is only overwritten with ``--rotate`` (a new password for a device, e.g. after
a board was lost); the name ``aggregator`` is refused, since the ACL gives that user the
aggregator's rights.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import tomllib
from pathlib import Path

from fedfstq.errors import CliError

__all__ = ["EnrolError", "add_arguments", "enrol", "main"]

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "config" / "agent.example.toml"
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Users of fstq.acl with more than the per-device patterns.
RESERVED = frozenset({"aggregator"})
#: ACL lines that give every device its topics; with them no per-device line is needed.
DEVICE_PATTERNS = (
    "pattern write fstq/v1/+/up/%u/+",
    "pattern write fstq/v1/+/fetch/%u",
    "pattern write fstq/v1/+/status/%u",
    "pattern read fstq/v1/+/ack/%u",
    "pattern read fstq/v1/+/down/%u",
)


class EnrolError(CliError):
    """Enrolment refused or failed; the message says why (exit code CONFIG)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedfstq enrol``."""
    parser.add_argument(
        "--client-id", required=True, help="device id (= its MQTT user name), [A-Za-z0-9_.-]{1,64}"
    )
    parser.add_argument(
        "--password-file",
        type=Path,
        required=True,
        metavar="PATH",
        help="the broker's Mosquitto password file (created if missing, else appended to)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="writes DIR/<client-id>/agent.toml and DIR/<client-id>/mqtt_password",
    )
    parser.add_argument("--fleet", default="default", help="fleet id written into agent.toml")
    parser.add_argument(
        "--broker-host",
        default="broker.example.org",
        metavar="HOST",
        help="broker host name the device connects to",
    )
    parser.add_argument(
        "--broker-port", type=int, default=8883, metavar="PORT", help="broker TLS port"
    )
    parser.add_argument(
        "--acl", type=Path, metavar="PATH", help="check that this ACL covers the device by pattern"
    )
    parser.add_argument(
        "--example", type=Path, default=EXAMPLE, metavar="PATH", help="agent config template"
    )
    parser.add_argument(
        "--rotate", action="store_true", help="give an enrolled device a new password"
    )


def _users(password_file: Path) -> set[str]:
    if not password_file.exists():
        return set()
    lines = password_file.read_text().splitlines()
    return {line.split(":", 1)[0] for line in lines if ":" in line}


def _render(example: str, client_id: str, fleet: str, host: str, port: int) -> str:
    text = example.replace("CHANGE-ME", client_id)
    for key, value in (("fleet", f'"{fleet}"'), ("host", f'"{host}"'), ("port", str(port))):
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
        if n != 1:
            raise EnrolError(f"the template has no `{key} = ...` line")
    return text


def enrol(
    client_id: str,
    password_file: Path,
    out_dir: Path,
    *,
    fleet: str = "default",
    broker_host: str = "broker.example.org",
    broker_port: int = 8883,
    acl: Path | None = None,
    example: Path = EXAMPLE,
    rotate: bool = False,
) -> Path:
    """Enrol one device; returns its output directory (agent.toml, mqtt_password)."""
    if not ID_PATTERN.fullmatch(client_id):
        raise EnrolError(f"client id {client_id!r} must match [A-Za-z0-9_.-]{{1,64}}")
    if client_id in RESERVED:
        raise EnrolError(f"{client_id!r} is reserved (the ACL gives it more than a device)")
    if acl is not None:
        rules = {" ".join(line.split()) for line in acl.read_text().splitlines()}
        missing = [p for p in DEVICE_PATTERNS if p not in rules]
        if missing:
            raise EnrolError(f"{acl} lacks the device patterns {missing}; see fstq.acl")
    if client_id in _users(password_file) and not rotate:
        raise EnrolError(f"{client_id} is already in {password_file} (--rotate to replace)")
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise EnrolError("mosquitto_passwd not found (apt-get install mosquitto)")
    from pydantic import ValidationError

    from edge_agent.settings import AgentSettings

    text = _render(example.read_text(), client_id, fleet, broker_host, broker_port)
    try:  # the file must be a valid configuration before anything is changed
        AgentSettings(**tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise EnrolError(f"the rendered configuration is invalid: {exc}") from None

    device_dir = out_dir / client_id
    device_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    password = secrets.token_urlsafe(24)
    create = [] if password_file.exists() else ["-c"]
    # -b puts the password on mosquitto_passwd's command line for a moment (visible in ps to
    # the same user / root); run enrolment on the server, not on a shared machine.
    done = subprocess.run(
        [tool, *create, "-b", str(password_file), client_id, password],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise EnrolError(f"mosquitto_passwd failed: {(done.stderr or done.stdout).strip()}")
    if create:
        os.chmod(password_file, 0o600)
    secret = device_dir / "mqtt_password"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    os.chmod(secret, 0o600)  # also when the file existed (rotation)
    (device_dir / "agent.toml").write_text(text)
    return device_dir


def main(args: argparse.Namespace) -> int:
    """Enrol the device; a refusal is an :class:`EnrolError` (exit code 2, ``fedfstq.cli``)."""
    device_dir = enrol(
        args.client_id,
        args.password_file,
        args.out_dir,
        fleet=args.fleet,
        broker_host=args.broker_host,
        broker_port=args.broker_port,
        acl=args.acl,
        example=args.example,
        rotate=args.rotate,
    )
    print(
        f"enrolled {args.client_id}: {device_dir}/agent.toml and {device_dir}/mqtt_password\n"
        "reload the broker's password file (SIGHUP), then on the board:\n"
        f"  sudo deploy/install-agent.sh --config agent.toml --password-file mqtt_password "
        f"--ca-file ca.crt --data <train.jsonl>"
    )
    return 0
