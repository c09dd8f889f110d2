"""The services' settings as documented: the README tables ("Configuration reference") and the
example configs in deploy/config/ name every setting, and state the settings models' defaults.

The models are the one place a default is written (tests/aggregator/test_aggregator_settings.py
and tests/edge_agent/test_agent_settings.py tie them to the domain objects); this keeps the
documents from drifting away from them.
"""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from aggregator.settings import AggregatorSettings
from common.settings import ServiceSettings
from edge_agent.settings import AgentSettings

ROOT = Path(__file__).resolve().parents[1]

SERVICES: dict[str, tuple[type[ServiceSettings], Path, Path]] = {
    "aggregator": (
        AggregatorSettings,
        ROOT / "aggregator" / "README.md",
        ROOT / "deploy" / "config" / "aggregator.example.toml",
    ),
    "agent": (
        AgentSettings,
        ROOT / "edge_agent" / "README.md",
        ROOT / "deploy" / "config" / "agent.example.toml",
    ),
}
#: Required by MqttSettings, filled in by the service from its own id (documented in words).
DERIVED = {"mqtt.client_id"}
REQUIRED = object()


def flat_fields(model: type[BaseModel], prefix: str = "") -> dict[str, FieldInfo]:
    """Every leaf setting by its dotted path; nested tables (``X`` or ``X | None``) recursed."""
    out: dict[str, FieldInfo] = {}
    for name, info in model.model_fields.items():
        nested = [
            t
            for t in (info.annotation, *typing.get_args(info.annotation))
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if nested:
            out.update(flat_fields(nested[0], f"{prefix}{name}."))
        else:
            out[prefix + name] = info
    return out


def default_of(info: FieldInfo) -> Any:
    return REQUIRED if info.is_required() else info.get_default(call_default_factory=True)


def same(documented: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(documented, bool):
        return documented is default
    if isinstance(default, int | float) and isinstance(documented, int | float):
        return float(documented) == float(default)
    if isinstance(default, tuple):
        return tuple(documented) == default
    return bool(documented == default)


# -- README tables -----------------------------------------------------------------------------

CODE = re.compile(r"`([^`]*)`")
UNITS = {"MiB": 1 << 20}


def parse_default(cell: str) -> Any:
    """A README default cell as a value; raises ValueError on a form the table must not use."""
    if cell == "required":
        return REQUIRED
    if cell == "none" or cell.startswith("none ("):  # "none (= what None means)"
        return None
    if cell == "empty":  # an empty list
        return ()
    if cell in ("true", "false"):
        return cell == "true"
    codes = CODE.findall(cell)
    if codes and CODE.sub("", cell).strip(" ,") == "":
        return codes[0] if len(codes) == 1 else tuple(codes)
    number, _, unit = cell.partition(" ")
    return float(number) * UNITS[unit] if unit else float(number)


def readme_rows(readme: Path) -> dict[str, dict[str, str]]:
    """The "Configuration reference" table: key -> {column: cell}."""
    text = readme.read_text().split("## Configuration reference", 1)[1]
    lines = [line for line in text.split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[2:]:
        cells = dict(
            zip(header, (c.strip() for c in line.strip().strip("|").split(" | ")), strict=True)
        )
        keys = CODE.findall(cells["key"])
        assert len(keys) == 1, f"{readme.name}: one setting per row: {line}"
        assert keys[0] not in rows, f"{readme.name}: {keys[0]} twice"
        rows[keys[0]] = cells
    return rows


@pytest.mark.parametrize("service", SERVICES)
def test_readme_table_names_every_setting_with_its_default(service: str) -> None:
    settings, readme, _ = SERVICES[service]
    fields = flat_fields(settings)
    rows = readme_rows(readme)
    # A `table.*` row refers to another document for that whole table (the aggregator's mqtt).
    wildcards = {key[:-1] for key in rows if key.endswith(".*")}
    expected = {k for k in fields if not any(k.startswith(w) for w in wildcards)}
    assert set(rows) - {w + "*" for w in wildcards} == expected
    wrong = {}
    for key in sorted(expected - DERIVED):
        try:
            documented = parse_default(rows[key]["default"])
        except (ValueError, KeyError):
            wrong[key] = f"unreadable default {rows[key]['default']!r}"
            continue
        if not same(documented, default_of(fields[key])):
            wrong[key] = f"README {rows[key]['default']!r}, model {default_of(fields[key])!r}"
    assert wrong == {}


@pytest.mark.parametrize("service", SERVICES)
def test_readme_table_names_each_settings_environment_variable(service: str) -> None:
    settings, readme, _ = SERVICES[service]
    wrong = {}
    for key, cells in readme_rows(readme).items():
        if key.endswith(".*"):
            continue
        env = settings.env_name(key.split("."))
        written = CODE.findall(cells["env"])[0]
        # `..._ROUNDS__QUORUM` abbreviates the prefix.
        ok = env.endswith(written[3:]) if written.startswith("...") else written == env
        if not ok:
            wrong[key] = (written, env)
    assert wrong == {}


def test_the_aggregators_mqtt_table_is_the_one_the_agent_readme_documents() -> None:
    # The aggregator's `mqtt.*` row points there; both embed the same MqttSettings.
    assert "mqtt" in AggregatorSettings.model_fields and "mqtt" in AgentSettings.model_fields
    assert (
        AggregatorSettings.model_fields["mqtt"].annotation
        is AgentSettings.model_fields["mqtt"].annotation
    )
    assert "edge_agent/README.md" in readme_rows(SERVICES["aggregator"][1])["mqtt.*"]["default"]


# -- deploy/config examples ----------------------------------------------------------------------

SETTING = re.compile(r"^(# )?([a-z_][a-z0-9_]*) = (.+)$")


def example_settings(path: Path) -> dict[str, tuple[bool, Any]]:
    """dotted key -> (commented out, value) of every `key = value` line of an example config."""
    table: tuple[str, ...] = ()
    out: dict[str, tuple[bool, Any]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("["):
            table = tuple(line.strip("[]").split("."))
        elif m := SETTING.match(line):
            key = ".".join((*table, m[2]))
            assert key not in out, f"{path.name}: {key} twice"
            out[key] = (m[1] is not None, tomllib.loads(f"v = {m[3]}")["v"])
    return out


@pytest.mark.parametrize("service", SERVICES)
def test_example_config_lists_every_setting_and_comments_show_the_defaults(service: str) -> None:
    settings, _, example = SERVICES[service]
    fields = flat_fields(settings)
    listed = example_settings(example)
    assert set(listed) == set(fields)
    wrong = {}
    for key, (commented, value) in listed.items():
        default = default_of(fields[key])
        # A commented line shows the default; for a setting that is unset by default it shows an
        # example value instead (its comment says what unset means).
        shows_default = commented and key not in DERIVED and default not in (None, REQUIRED)
        if shows_default and not same(value, default):
            wrong[key] = (value, default)
    assert wrong == {}
