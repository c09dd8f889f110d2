"""The services' one settings rule: defaults < TOML file < environment; a flag beats the file,
and a flag together with the variable of the same setting is refused. Checked on a small
settings class here and through the real ``fedfstq agent`` / ``fedfstq aggregator`` commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict
from pydantic_settings import SettingsConfigDict

from common.exit_codes import ExitCode
from common.settings import ConfigError, Override, ServiceSettings, overrides, read_toml
from fedfstq import cli


class Inner(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "localhost"
    port: int = 1


class Example(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="FEDFSTQ_EXAMPLE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    name: str
    level: int = 0
    inner: Inner = Inner()


PATHS = {"name": ("name",), "port": ("inner", "port"), "level": ("level",)}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "example.toml"
    path.write_text('name = "from-file"\nlevel = 1\n[inner]\nhost = "file-host"\nport = 10\n')
    return path


def load(config: Path | None, environ: dict[str, str], **flags: object) -> Example:
    return Example.load(config, overrides(PATHS, flags), environ, what="example settings")


def test_the_environment_beats_the_file(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDFSTQ_EXAMPLE_LEVEL", "2")
    monkeypatch.setenv("FEDFSTQ_EXAMPLE_INNER__PORT", "20")
    s = load(config, {"FEDFSTQ_EXAMPLE_LEVEL": "2", "FEDFSTQ_EXAMPLE_INNER__PORT": "20"})
    assert (s.name, s.level, s.inner.host, s.inner.port) == ("from-file", 2, "file-host", 20)


def test_a_flag_beats_the_file_and_keeps_the_rest_of_its_table(config: Path) -> None:
    s = load(config, {}, name="from-flag", port=30, level=None)  # None: flag not given
    assert (s.name, s.level, s.inner.host, s.inner.port) == ("from-flag", 1, "file-host", 30)


def test_a_flag_fills_a_required_setting_without_a_file() -> None:
    assert load(None, {}, name="only-flag").name == "only-flag"


@pytest.mark.parametrize(
    "variable",
    [
        "FEDFSTQ_EXAMPLE_INNER__PORT",
        "fedfstq_example_inner__port",  # pydantic-settings reads names in any case
        "FEDFSTQ_EXAMPLE_INNER",  # the whole table as JSON holds the setting too
    ],
)
def test_a_flag_and_the_variable_of_the_same_setting_are_refused(
    config: Path, variable: str
) -> None:
    with pytest.raises(ConfigError, match=r"--port and FEDFSTQ_EXAMPLE_INNER.* are both set"):
        load(config, {variable: "40"}, port=30)


def test_a_flag_and_a_variable_of_another_setting_both_apply(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDFSTQ_EXAMPLE_INNER__HOST", "env-host")
    s = load(config, {"FEDFSTQ_EXAMPLE_INNER__HOST": "env-host"}, port=30)
    assert (s.inner.host, s.inner.port) == ("env-host", 30)


def test_every_bad_setting_is_named_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('level = "x"\nbogus = 1\n[inner]\nport = "y"\n')
    with pytest.raises(ConfigError) as caught:
        load(path, {})
    message = str(caught.value)
    assert "\n" not in message and message.startswith("invalid example settings: ")
    for key in ("name", "level", "bogus", "inner.port"):
        assert f"{key}: " in message


def test_a_flag_into_a_key_that_is_not_a_table_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "flat.toml"
    path.write_text('name = "n"\ninner = 3\n')
    with pytest.raises(ConfigError, match=r"\[inner\] in the config file must be a table"):
        Example.load(path, [Override("--port", ("inner", "port"), 5)], {}, what="example")


@pytest.mark.parametrize(
    ("text", "says"), [(None, "cannot read config file"), ("x = [", "not valid TOML")]
)
def test_an_unreadable_file_is_a_config_error(tmp_path: Path, text: str | None, says: str) -> None:
    path = tmp_path / "c.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=says):
        read_toml(path)


# -- both services follow the rule ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "variable"),
    [("agent", "FEDFSTQ_AGENT_MQTT__PORT"), ("aggregator", "FEDFSTQ_AGG_MQTT__PORT")],
)
def test_both_services_refuse_a_flag_next_to_its_variable(
    service: str,
    variable: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tmp_path / f"{service}.toml"
    config.write_text(
        f'client_id = "dev-1"\ndata_path = "{tmp_path}/d.jsonl"\nstate_dir = "{tmp_path}"\n'
        if service == "agent"
        else f'state_dir = "{tmp_path}"\n'
    )
    monkeypatch.setenv(variable, "1884")

    code = cli.main([service, "--config", str(config), "--broker-port", "1885"])

    assert code == ExitCode.CONFIG
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"--broker-port and {variable} are both set" in lines[0], lines
