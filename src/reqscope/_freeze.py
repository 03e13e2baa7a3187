"""Deep-freezing and lossless JSON encoding of context metadata and event payloads.

Values are validated, copied and frozen in one walk: mappings become :class:`FrozenDict`,
lists and tuples become tuples, enum members become their value. Nothing the caller passed
in is kept, so mutating it afterwards never changes a context.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import math
import uuid
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any, Final

from reqscope.exceptions import ContextValidationError

__all__ = ["EMPTY", "FrozenDict", "decode_json_value", "encode_json_value", "freeze_mapping"]

MAX_DEPTH: Final = 16
MAX_NODES: Final = 10_000

_SCALARS: Final = (str, int, float, bool, type(None))
_LEAVES: Final = (dt.datetime, dt.date, uuid.UUID, Decimal, bytes)


class FrozenDict(Mapping[str, Any]):
    """A read-only, hashable mapping whose values are deep-frozen.

    Instances are only built by reqscope from validated data; users see them as
    ``Mapping[str, Any]``.
    """

    __slots__ = ("_data", "_hash")

    _data: dict[str, Any]
    _hash: int | None

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        object.__setattr__(self, "_data", {} if data is None else data)
        object.__setattr__(self, "_hash", None)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenDict):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            object.__setattr__(self, "_hash", hash(frozenset(self._data.items())))
        return self._hash  # type: ignore[return-value]  # set just above

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("metadata is read-only; derive a new context with with_metadata()")

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[str, Any]]]:
        return (FrozenDict, (self._data,))


EMPTY: Final = FrozenDict()


def _path(base: str, key: object) -> str:
    return f"{base}[{key!r}]"


class _Budget:
    __slots__ = ("nodes", "root")

    def __init__(self, root: str) -> None:
        self.nodes = -1  # the root mapping is the container, not a value
        self.root = root


def _resource_kind(value: object) -> str | None:
    """Name the kind of database resource ``value`` is, if it is one."""
    module = type(value).__module__ or ""
    if not module.startswith("sqlalchemy"):
        return None
    name = type(value).__name__.lower()
    for kind in ("session", "connection", "engine", "pool"):
        if kind in name:
            return f"a database {kind}"
    return "a SQLAlchemy object"


def _freeze(value: object, path: str, depth: int, budget: _Budget) -> object:  # noqa: C901, PLR0912
    budget.nodes += 1
    if budget.nodes > MAX_NODES:
        raise ContextValidationError(
            budget.root,
            f"more than {MAX_NODES} values; keep metadata small and look large data up "
            "by id instead",
        )
    cls = type(value)
    if cls is str or cls is int or cls is bool or value is None:
        return value
    if cls is float:
        if not math.isfinite(value):  # type: ignore[arg-type]  # cls is float
            raise ContextValidationError(
                path, f"{value!r} is not JSON-safe; use None or a finite number"
            )
        return value
    if isinstance(value, enum.Enum):
        # Contexts cross process boundaries and enum classes do not: keep the value.
        return _freeze(value.value, path, depth, budget)
    if isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            raise ContextValidationError(
                path, f"nested deeper than {MAX_DEPTH} levels; flatten the metadata"
            )
        frozen: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ContextValidationError(
                    _path(path, key), f"keys must be str, got {type(key).__name__}"
                )
            frozen[str(key)] = _freeze(item, _path(path, key), depth + 1, budget)
        return FrozenDict(frozen)
    if isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            raise ContextValidationError(
                path, f"nested deeper than {MAX_DEPTH} levels; flatten the metadata"
            )
        return tuple(
            _freeze(item, f"{path}[{index}]", depth + 1, budget) for index, item in enumerate(value)
        )
    if isinstance(value, _LEAVES):
        return value
    if isinstance(value, _SCALARS):  # subclasses of str/int/float: keep the plain value
        for base in (bool, int, float, str):
            if isinstance(value, base):
                return _freeze(base(value), path, depth, budget)
    kind = _resource_kind(value)
    if kind is not None:
        raise ContextValidationError(
            path,
            f"{kind} ({cls.__name__}) cannot be stored in a context: contexts carry "
            "request metadata, never resources; open a session per request with "
            "factory.session(ctx) instead",
        )
    if isinstance(value, (set, frozenset)):
        raise ContextValidationError(path, f"{cls.__name__} is not allowed; use a list or tuple")
    if isinstance(value, (bytearray, memoryview)):
        raise ContextValidationError(path, f"{cls.__name__} is mutable; pass bytes(value)")
    raise ContextValidationError(
        path,
        f"values of type {cls.__module__}.{cls.__qualname__} cannot be stored; use JSON-like "
        "data (None, bool, int, float, str, list, tuple, dict) or datetime, date, UUID, "
        "Decimal, Enum, bytes",
    )


def freeze_mapping(value: object, root: str = "metadata") -> FrozenDict:
    """Validate, copy and deep-freeze a mapping of metadata.

    Args:
        value: the caller's mapping (or ``None`` for an empty one).
        root: the name used in error messages (``metadata['a'][2]``).

    Returns:
        A :class:`FrozenDict` that shares nothing mutable with ``value``.

    Raises:
        ContextValidationError: naming the key path of the first invalid value.
    """
    if value is None:
        return EMPTY
    if isinstance(value, FrozenDict):
        return value
    if not isinstance(value, Mapping):
        raise ContextValidationError(root, f"must be a mapping, got {type(value).__name__}")
    frozen = _freeze(value, root, 0, _Budget(root))
    assert isinstance(frozen, FrozenDict)  # noqa: S101 - a Mapping always freezes to one
    return frozen


_TAGS: Final = ("$datetime", "$date", "$uuid", "$decimal", "$bytes")


def encode_json_value(value: object) -> object:
    """Encode a frozen value as JSON-safe data, losslessly.

    Non-JSON leaves become one-key tagged objects (``{"$uuid": "..."}``); user keys that
    start with ``$`` are escaped by doubling the ``$``.
    """
    if isinstance(value, FrozenDict):
        return {
            (f"${key}" if key.startswith("$") else key): encode_json_value(item)
            for key, item in value.items()
        }
    if isinstance(value, tuple):
        return [encode_json_value(item) for item in value]
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    return value


def _decode_tag(tag: str, raw: object, path: str) -> object:
    if not isinstance(raw, str):
        raise ContextValidationError(path, f"{tag} must hold a string")
    try:
        if tag == "$datetime":
            return dt.datetime.fromisoformat(raw)
        if tag == "$date":
            return dt.date.fromisoformat(raw)
        if tag == "$uuid":
            return uuid.UUID(raw)
        if tag == "$decimal":
            return Decimal(raw)
        return base64.b64decode(raw.encode("ascii"), validate=True)
    except (ValueError, ArithmeticError) as exc:
        raise ContextValidationError(path, f"invalid {tag} value {raw!r}: {exc}") from None


def decode_json_value(value: object, path: str = "metadata") -> object:
    """Invert :func:`encode_json_value` (the result still needs :func:`freeze_mapping`)."""
    if isinstance(value, dict):
        if len(value) == 1:
            (key,) = value
            if key in _TAGS:
                return _decode_tag(key, value[key], path)
        decoded: dict[str, object] = {}
        for key, item in value.items():
            if isinstance(key, str) and key.startswith("$"):
                if not key.startswith("$$"):
                    raise ContextValidationError(
                        _path(path, key), "unknown tag; keys starting with '$' are escaped as '$$'"
                    )
                key = key[1:]  # noqa: PLW2901 - unescaping in place is the point
            decoded[key] = decode_json_value(item, _path(path, key))
        return decoded
    if isinstance(value, list):
        return [decode_json_value(item, f"{path}[{index}]") for index, item in enumerate(value)]
    return value
