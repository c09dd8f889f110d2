"""The fstq exception hierarchy: everything fstq raises on bad input derives from FstqError."""

from __future__ import annotations

__all__ = ["BudgetError", "ConfigError", "DecodeError", "FstqError"]


class FstqError(Exception):
    """Base class of every error fstq raises deliberately."""


class ConfigError(FstqError, ValueError):
    """A configuration value is out of range or inconsistent."""


class BudgetError(FstqError, ValueError):
    """The byte budget is too small to encode even an empty update of these tensors."""


class DecodeError(FstqError, ValueError):
    """Encoded bytes are truncated, corrupted, hostile or exceed the decode limits."""
