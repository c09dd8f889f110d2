"""Typed records written as JSON: ``rounds.jsonl``, the fleet run records, the benchmark results.

A record is a frozen pydantic dataclass with :data:`RECORD_CONFIG`: strict (a float where a byte
count belongs, or a bool where a number does, is an error, not a conversion), unknown fields
refused, and a field whose JSON key differs from its name in the code (a key kept for the files
already written) read and written under that key. Dataclasses rather than ``BaseModel`` because
mypy checks ``dataclasses.replace`` on them: a renamed field is a type error wherever a record is
built or copied, not a ``KeyError`` somewhere downstream.

:func:`to_json` and :func:`from_json` are where records meet JSON text.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

__all__ = ["RECORD_CONFIG", "RecordError", "from_json", "jsonable", "omitted_if_none", "to_json"]

T = TypeVar("T")

RECORD_CONFIG = ConfigDict(
    strict=True,
    extra="forbid",
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
    # NaN stays a float on the way out: whoever writes decides (json.dumps(allow_nan=...)).
    ser_json_inf_nan="constants",
)


class RecordError(ValueError):
    """A JSON record that does not have the record's fields and types."""


def omitted_if_none() -> Any:
    """A field that defaults to None and is left out of the JSON while it is None (a key older
    files lack, or one a record only has once something was measured)."""
    return Field(default=None, exclude_if=_is_none)


def _is_none(value: object) -> bool:
    return value is None


_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def _adapter(kind: type[Any]) -> TypeAdapter[Any]:
    """One adapter per record type (building one compiles its schema)."""
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter


def jsonable(record: object) -> dict[str, Any]:
    """The record as JSON values (fields in declaration order, JSON keys): the one boundary
    where a record becomes an untyped mapping, for ``json`` and the store's JSON column."""
    out: dict[str, Any] = _adapter(type(record)).dump_python(record, mode="json")
    return out


def to_json(
    record: object, *, indent: int | None = None, sort_keys: bool = False, allow_nan: bool = False
) -> str:
    """The record as JSON text (``json.dumps`` formatting, so files keep their layout)."""
    return json.dumps(jsonable(record), indent=indent, sort_keys=sort_keys, allow_nan=allow_nan)


def from_json(
    kind: type[T], text: str | bytes, what: str, error: type[RecordError] = RecordError
) -> T:
    """Validate JSON ``text`` as a ``kind`` record; ``error`` (one line naming ``what`` and the
    first bad field) when it is not one."""
    try:
        value: T = _adapter(kind).validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the record"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise error(f"{what}: {where}: {first['msg']}{more}") from None
    return value
