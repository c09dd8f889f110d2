"""How a service's settings are assembled: a TOML file, environment variables and flags.

One rule for both services (``fedfstq agent``, ``fedfstq aggregator``):

    defaults < TOML file < ``<PREFIX>*`` environment variables
    a flag beats the file; a flag *and* the variable of the same setting are refused

A flag next to a variable for the same setting is ambiguous: the variable usually comes from a
unit file, a container definition or a shell profile the person typing the flag does not see,
and silently preferring either one hides a mistake (an agent training against the wrong broker,
an aggregator writing into another state directory). Refusing costs one clear error naming both.

The entry point reads the file and the flags once (:meth:`ServiceSettings.load`); nothing deeper
reads the environment or the file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

__all__ = ["ConfigError", "Override", "ServiceSettings", "overrides", "read_toml"]


class ConfigError(ValueError):
    """A service's configuration (file, environment or flags) is unusable; the message says why."""

    @classmethod
    def from_validation(
        cls, what: str, exc: ValidationError, root: str = "settings"
    ) -> ConfigError:
        """One line naming every bad setting by its dotted path, e.g. ``rounds.quorum: ...``."""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or root}: {e['msg']}" for e in exc.errors()
        )
        return cls(f"invalid {what}: {problems}")


def read_toml(path: Path | None) -> dict[str, Any]:
    """The tables of a service's TOML file (empty without a path), read by the entry point."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


@dataclass(frozen=True)
class Override:
    """A flag given on the command line: ``--broker-port 1884`` sets ``mqtt.port``."""

    flag: str
    path: tuple[str, ...]
    value: object


def overrides(paths: Mapping[str, tuple[str, ...]], values: Mapping[str, Any]) -> list[Override]:
    """The flags given, from argparse dests (``broker_port`` is ``--broker-port``) to settings
    paths; a value of None means the flag was not given."""
    return [
        Override("--" + dest.replace("_", "-"), path, values[dest])
        for dest, path in paths.items()
        if values.get(dest) is not None
    ]


class ServiceSettings(BaseSettings):
    """Base of the services' settings: the environment beats the keyword arguments.

    Subclasses set ``model_config`` (their ``env_prefix``, ``env_nested_delimiter="__"``); the
    entry point builds them with :meth:`load`.
    """

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, init_settings

    @classmethod
    def env_name(cls, path: Iterable[str]) -> str:
        """The environment variable of a setting: ``("mqtt", "port")`` -> ``<PREFIX>MQTT__PORT``."""
        delimiter = cls.model_config.get("env_nested_delimiter") or "__"
        return cls.model_config.get("env_prefix", "") + delimiter.join(path).upper()

    @classmethod
    def load(
        cls,
        config: Path | None,
        flags: Iterable[Override],
        environ: Mapping[str, str],
        *,
        what: str,
    ) -> Self:
        """The settings from the TOML file at ``config``, ``flags`` and the environment.

        ``environ`` is what the flags are checked against (the variables themselves are read by
        pydantic-settings from the process environment). Raises :class:`ConfigError` with every
        problem in one message; ``what`` names the settings in it.
        """
        data = read_toml(config)
        present = {name.upper() for name in environ}
        for flag in flags:
            # A variable for the setting or for a table holding it (a JSON value) both compete.
            for depth in range(len(flag.path), 0, -1):
                env = cls.env_name(flag.path[:depth])
                if env in present:
                    raise ConfigError(f"{flag.flag} and {env} are both set; use one")
            table = data
            for key in flag.path[:-1]:
                table = table.setdefault(key, {})
                if not isinstance(table, dict):
                    raise ConfigError(f"[{key}] in the config file must be a table")
            table[flag.path[-1]] = flag.value
        try:
            return cls(**data)
        except ValidationError as exc:
            raise ConfigError.from_validation(what, exc) from None
