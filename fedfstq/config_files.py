"""Reading service configuration files at the entry point (never deeper)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

__all__ = ["ConfigFileError", "load_toml"]


class ConfigFileError(ValueError):
    """A configuration file is missing or malformed."""


def load_toml(path: Path | None) -> dict[str, Any]:
    """The tables of a TOML file (empty without a path); errors name the file."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"config file {path} is not valid TOML: {exc}") from None
