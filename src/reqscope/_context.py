"""UserExecutionContext, AuditEvent and the contextvar helpers.

A context is immutable request metadata: who is asking (``user_id``), in which conversation
(``thread_id``), in which run (``run_id``) and which request this is (``request_id``). It never
holds resources: sessions, connections and engines are refused at any depth of its metadata.
"""

from __future__ import annotations

import base64
import contextvars
import datetime as dt
import json
import os
import threading
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field, fields
from types import TracebackType
from typing import Any, Final

from typing_extensions import Self

from reqscope._freeze import (
    EMPTY,
    decode_json_value,
    encode_json_value,
    freeze_mapping,
)
from reqscope.exceptions import ContextValidationError, NoActiveContextError

__all__ = [
    "AuditEvent",
    "UserExecutionContext",
    "current_context",
    "current_context_or_none",
    "use_context",
]

MAX_ID_LENGTH: Final = 256
MAX_OPERATION_DEPTH: Final = 32
MAX_AUDIT_EVENTS: Final = 128
PLACEHOLDER_IDS: Final = frozenset(
    {"none", "null", "undefined", "nil", "placeholder", "default_user"}
)
HEADER_PREFIX: Final = "x-reqscope-"
_LONGEST_PLACEHOLDER: Final = max(map(len, PLACEHOLDER_IDS))

# Code points an id may not hold, by Unicode category: what cannot be displayed, or shows
# as something else, or cannot be encoded (a lone surrogate fails at the driver).
_UNDISPLAYABLE: Final = {
    "Cc": "a control character",
    "Cf": "a format character (zero-width or bidirectional)",
    "Cs": "a lone surrogate",
    "Cn": "an unassigned code point",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}
_ID_FIELDS: Final = ("user_id", "thread_id", "run_id", "request_id")
_OPTIONAL_ID_FIELDS: Final = ("websocket_client_id", "parent_request_id")
_ROOT: Final = "root_request_id"
_UTC: Final = dt.timezone.utc


def validate_id(field_name: str, value: object) -> str:
    """Return ``value`` if it is a valid id, else raise naming ``field_name``.

    Raises:
        ContextValidationError: not a str, empty, longer than 256 characters, padded with
            whitespace, holding a code point that cannot be displayed or encoded (Unicode
            categories Cc, Cf, Cs, Cn, Zl and Zp: :func:`undisplayable`), or a placeholder
            such as ``"null"``.
    """
    if type(value) is not str:
        if isinstance(value, str):
            value = str(value)
        else:
            raise ContextValidationError(
                field_name, f"must be a str, got {type(value).__name__} {value!r}"
            )
    if not value:
        raise ContextValidationError(field_name, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ContextValidationError(
            field_name, f"is {len(value)} characters long; the limit is {MAX_ID_LENGTH}"
        )
    # str.isprintable() is False for every refused category (and for a few allowed ones).
    if not value.isprintable() and (problem := undisplayable(value)) is not None:
        raise ContextValidationError(field_name, problem)
    if value != value.strip():
        raise ContextValidationError(field_name, f"has surrounding whitespace: {value!r}")
    if len(value) <= _LONGEST_PLACEHOLDER and value.lower() in PLACEHOLDER_IDS:
        raise ContextValidationError(
            field_name,
            f"{value!r} is a placeholder, which signals a bug upstream; "
            "pass the real id (or let UserExecutionContext.create() generate it)",
        )
    return value


def undisplayable(value: str) -> str | None:
    """Say what in ``value`` an id may not hold, or return None when it may hold it all.

    Refused: code points in the Unicode categories Cc (control), Cf (format: zero-width
    spaces, bidirectional overrides), Cs (lone surrogates), Cn (unassigned in the running
    Python's Unicode database), Zl and Zp (line and paragraph separators).
    """
    for index, char in enumerate(value):
        category = unicodedata.category(char)
        kind = _UNDISPLAYABLE.get(category)
        if kind is not None:
            name = unicodedata.name(char, "")
            named = f"U+{ord(char):04X}" + (f" {name}" if name else "")
            return (
                f"contains {kind}, {named} (category {category}), at index {index} of "
                f"{value!r}; ids must be displayable text: control, format, surrogate, "
                "unassigned and line or paragraph separator code points are refused"
            )
    return None


class _Lineage:
    """The identity of one request, shared by the contexts derived from its root context."""

    __slots__ = ("__weakref__",)  # what a request wrote is remembered until it is gone


class _RandomHex:
    """Hex digits from the OS CSPRNG, read 4 KiB at a time.

    ``os.urandom`` is a system call, and inside request handling a system call costs
    microseconds on a virtual machine (the kernel's page-table isolation flushes what the
    request had cached): two per request were a measurable share of a session scope's cost
    (docs/performance.md). Reading 4,096 bytes at once and handing out each byte exactly
    once keeps every id exactly as unguessable as ``os.urandom(16).hex()``. A forked child
    drops the buffer, so parent and child never hand out the same digits.
    """

    __slots__ = ("_digits", "_lock", "_next")

    _BATCH: Final = 4096  # bytes per os.urandom call: 256 ids

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._digits = ""
        self._next = 0

    def take(self, count: int) -> str:
        """Return ``count`` fresh hex digits (an even number), never handed out before."""
        with self._lock:
            start = self._next
            end = start + count
            if end > len(self._digits):
                self._digits = os.urandom(max(self._BATCH, count // 2)).hex()
                start, end = 0, count
            self._next = end
            return self._digits[start:end]

    def forget(self) -> None:
        """Drop the buffer (and a lock another thread may have held at fork time)."""
        self._lock = threading.Lock()
        self._digits = ""
        self._next = 0


_random_hex: Final = _RandomHex()
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_random_hex.forget)


def new_id() -> str:
    """Return a fresh random id: 128 bits from the OS CSPRNG as 32 hex digits.

    As unguessable as ``uuid4()``, at a fraction of the cost: the bytes come from
    ``os.urandom`` in batches (:class:`_RandomHex`), which matters on a path taken several
    times per request.
    """
    return _random_hex.take(32)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(_UTC)


def _utc(field_name: str, value: object) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        raise ContextValidationError(field_name, f"must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ContextValidationError(
            field_name, "must be timezone-aware; use datetime.now(timezone.utc)"
        )
    return value if value.tzinfo is dt.timezone.utc else value.astimezone(dt.timezone.utc)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One entry of a context's audit trail: when, what, and a short detail."""

    at: dt.datetime
    action: str
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", _utc("audit_trail.at", self.at))
        action: object = self.action  # annotations do not stop callers passing anything
        detail: object = self.detail
        if not isinstance(action, str) or not action:
            raise ContextValidationError("audit_trail.action", "must be a non-empty str")
        if not isinstance(detail, str):
            raise ContextValidationError("audit_trail.detail", "must be a str")

    def to_dict(self) -> dict[str, str]:
        """Return the event as JSON-safe data."""
        return {"at": self.at.isoformat(), "action": self.action, "detail": self.detail}

    @classmethod
    def from_dict(cls, data: object) -> AuditEvent:
        """Build an event from :meth:`to_dict` output, validating it."""
        if not isinstance(data, Mapping) or not {"at", "action"} <= data.keys():
            raise ContextValidationError("audit_trail", f"invalid audit event {data!r}")
        try:
            at = dt.datetime.fromisoformat(data["at"])
        except (TypeError, ValueError):
            raise ContextValidationError("audit_trail.at", f"invalid {data['at']!r}") from None
        return cls(at, data["action"], data.get("detail", ""))


@dataclass(frozen=True, slots=True)
class UserExecutionContext:
    """Immutable metadata of one request: who, which thread, which run, which request.

    Build one with :meth:`create` (which generates missing ids) or the constructor (which
    validates everything). Derive new ones with :meth:`child` and :meth:`with_metadata`.

    ``root_request_id`` is the request id of the context a chain of :meth:`child` calls
    started from (the id the client sees in ``X-Request-ID``); for a context that is not a
    child it is its own ``request_id`` (leave it empty in the constructor). A session
    opened with a context is usable by that context's *lineage* only: the contexts derived
    from the same root in this process, with :meth:`child` and :meth:`with_metadata`. A
    context built any other way (the constructor, :meth:`create`, :meth:`from_dict`), even
    with equal ids, is another request.

    Example:
        >>> ctx = UserExecutionContext.create("alice", metadata={"plan": "pro"})
        >>> child = ctx.child("summarize")
        >>> (child.user_id, child.parent_request_id == ctx.request_id, child.operation_depth)
        ('alice', True, 1)

    Raises:
        ContextValidationError: an id, the depth, ``created_at`` or a metadata value is
            invalid; the message names the field or the key path.
    """

    user_id: str
    thread_id: str
    run_id: str
    request_id: str
    _: KW_ONLY
    websocket_client_id: str | None = None
    parent_request_id: str | None = None
    root_request_id: str = ""
    operation_depth: int = 0
    created_at: dt.datetime = field(default_factory=_utcnow)
    metadata: Mapping[str, Any] = field(default=EMPTY)
    audit_trail: tuple[AuditEvent, ...] = ()
    # The request this context belongs to, as an object: the same one for the context that
    # started it and every context derived from it here (child(), with_metadata()), a new
    # one for any context built otherwise. Sessions check it (is, not ==): ids can repeat.
    _lineage: _Lineage = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in _ID_FIELDS:
            set_(self, name, validate_id(name, getattr(self, name)))
        for name in _OPTIONAL_ID_FIELDS:
            value = getattr(self, name)
            if value is not None:
                set_(self, name, validate_id(name, value))
        root = self.root_request_id
        set_(self, _ROOT, self.request_id if root == "" else validate_id(_ROOT, root))
        set_(self, "_lineage", _Lineage())
        depth = self.operation_depth
        if type(depth) is not int or not 0 <= depth <= MAX_OPERATION_DEPTH:
            raise ContextValidationError(
                "operation_depth",
                f"must be an int from 0 to {MAX_OPERATION_DEPTH}, got {depth!r}; "
                "a deeper chain of child contexts usually means unbounded recursion",
            )
        set_(self, "created_at", _utc("created_at", self.created_at))
        set_(self, "metadata", freeze_mapping(self.metadata))
        trail = self.audit_trail
        if type(trail) is not tuple:
            trail = tuple(trail)
            set_(self, "audit_trail", trail)
        for event in trail:
            if not isinstance(event, AuditEvent):
                raise ContextValidationError(
                    "audit_trail", f"must hold AuditEvent items, got {type(event).__name__}"
                )

    @classmethod
    def create(
        cls,
        user_id: str,
        *,
        thread_id: str | None = None,
        run_id: str | None = None,
        request_id: str | None = None,
        websocket_client_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Self:
        """Create a context for ``user_id``, generating any id not given.

        Args:
            user_id: the authenticated user (or tenant) the request acts for.
            thread_id: the conversation or thread; generated when omitted.
            run_id: the run (one agent execution, one job); generated when omitted.
            request_id: this request; generated when omitted.
            websocket_client_id: the WebSocket connection, if the request came through one.
            metadata: JSON-like data; copied and deep-frozen.

        Returns:
            A validated context whose audit trail starts with a ``created`` event.
        """
        # Three ids' worth of digits, used or not: one call is cheaper than counting.
        fresh = _random_hex.take(96)
        now = _utcnow()
        request_id = fresh[64:] if request_id is None else validate_id("request_id", request_id)
        return cls._trusted(
            user_id=validate_id("user_id", user_id),
            thread_id=fresh[:32] if thread_id is None else validate_id("thread_id", thread_id),
            run_id=fresh[32:64] if run_id is None else validate_id("run_id", run_id),
            request_id=request_id,
            websocket_client_id=None
            if websocket_client_id is None
            else validate_id("websocket_client_id", websocket_client_id),
            parent_request_id=None,
            root_request_id=request_id,
            operation_depth=0,
            created_at=now,
            metadata=EMPTY if metadata is None else freeze_mapping(metadata),
            audit_trail=(_event(now, "created", ""),),
            _lineage=_Lineage(),
        )

    @classmethod
    def _trusted(cls, **values: Any) -> Self:
        """A context of ``values``, every field given and already validated.

        Skips ``__init__``/``__post_init__``, which would validate them all again (this
        halves the cost of :meth:`create` and :meth:`child`).
        """
        self = object.__new__(cls)
        for name in _FIELD_NAMES:
            object.__setattr__(self, name, values[name])
        return self

    def _derived(self, **changes: Any) -> Self:
        """This context with ``changes`` (already validated) applied: the same request."""
        values = {name: getattr(self, name) for name in _FIELD_NAMES}
        values.update(changes)
        return self._trusted(**values)

    def _audited(self, action: str, detail: str, now: dt.datetime) -> tuple[AuditEvent, ...]:
        trail = (*self.audit_trail, _event(now, action, detail))
        return trail[-MAX_AUDIT_EVENTS:]

    def _merged(self, metadata: dict[str, Any]) -> Mapping[str, Any]:
        if not metadata:
            return self.metadata
        return freeze_mapping({**self.metadata, **metadata})

    def child(self, operation: str, **metadata: Any) -> Self:
        """Derive the context of a sub-operation of this request.

        The child keeps the user, thread, run and WebSocket ids and the
        ``root_request_id``, gets a new ``request_id``, points ``parent_request_id`` at this
        request, is one level deeper (at most 32) and carries this context's metadata
        updated with ``metadata``. It belongs to this request: it may use this request's
        sessions.

        Raises:
            ContextValidationError: ``operation`` is not a valid name, the chain is deeper
                than 32, or a metadata value is invalid.
        """
        validate_id("operation", operation)
        if self.operation_depth >= MAX_OPERATION_DEPTH:
            raise ContextValidationError(
                "operation_depth",
                f"child {operation!r} would be {self.operation_depth + 1} levels deep; the "
                f"limit is {MAX_OPERATION_DEPTH}: look for unbounded recursion",
            )
        now = _utcnow()
        return self._derived(
            request_id=new_id(),
            parent_request_id=self.request_id,
            operation_depth=self.operation_depth + 1,
            created_at=now,
            metadata=self._merged(metadata),
            audit_trail=self._audited("child", operation, now),
        )

    def with_metadata(self, **metadata: Any) -> Self:
        """Return a copy of this context (same ids, same request) with ``metadata`` merged in."""
        return self._derived(
            metadata=self._merged(metadata),
            audit_trail=self._audited("with_metadata", ",".join(sorted(metadata)), _utcnow()),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the context as JSON-safe data; :meth:`from_dict` inverts it losslessly."""
        return {
            "user_id": self.user_id,
            "thread_id": self.thread_id,
            "run_id": self.run_id,
            "request_id": self.request_id,
            "websocket_client_id": self.websocket_client_id,
            "parent_request_id": self.parent_request_id,
            "root_request_id": self.root_request_id,
            "operation_depth": self.operation_depth,
            "created_at": self.created_at.isoformat(),
            "metadata": encode_json_value(self.metadata),
            "audit_trail": [event.to_dict() for event in self.audit_trail],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild a context from :meth:`to_dict` output, validating every field.

        The context is equal to the one serialized but starts a new lineage: it may not use
        the sessions the original's request opened.

        Raises:
            ContextValidationError: a field is missing, unknown or invalid.
        """
        if not isinstance(data, Mapping):
            raise ContextValidationError("data", f"must be a mapping, got {type(data).__name__}")
        known = {*_ID_FIELDS, *_OPTIONAL_ID_FIELDS, _ROOT, "operation_depth", "created_at"}
        known |= {"metadata", "audit_trail"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ContextValidationError(unknown[0], "unknown field; was the dict tampered with?")
        missing = [name for name in _ID_FIELDS if name not in data]
        if missing:
            raise ContextValidationError(missing[0], "is required")
        created_raw = data.get("created_at")
        try:
            created = _utcnow() if created_raw is None else dt.datetime.fromisoformat(created_raw)
        except (TypeError, ValueError):
            raise ContextValidationError("created_at", f"invalid {created_raw!r}") from None
        trail_raw = data.get("audit_trail") or ()
        if not isinstance(trail_raw, (list, tuple)):
            raise ContextValidationError("audit_trail", "must be a list")
        return cls(
            data["user_id"],
            data["thread_id"],
            data["run_id"],
            data["request_id"],
            websocket_client_id=data.get("websocket_client_id"),
            parent_request_id=data.get("parent_request_id"),
            root_request_id=data.get(_ROOT) or "",
            operation_depth=data.get("operation_depth", 0),
            created_at=created,
            metadata=freeze_mapping(decode_json_value(data.get("metadata") or {})),
            audit_trail=tuple(AuditEvent.from_dict(event) for event in trail_raw),
        )

    def to_headers(self) -> dict[str, str]:
        """Return the context as ASCII HTTP/queue headers (``x-reqscope-*``).

        Meant for propagation between *trusted* internal services and queues; never accept
        these headers from the public internet.
        """
        payload = json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=True)
        headers = {
            f"{HEADER_PREFIX}{name.replace('_', '-')}": _header_id(getattr(self, name))
            for name in _ID_FIELDS
        }
        headers[f"{HEADER_PREFIX}context"] = base64.urlsafe_b64encode(payload.encode()).decode()
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> Self:
        """Rebuild a context from :meth:`to_headers` output (header names are case-insensitive).

        Raises:
            ContextValidationError: the headers are missing, malformed, or disagree.
        """
        items = headers.items() if isinstance(headers, Mapping) else headers
        lowered = {_text(key).lower(): _text(value) for key, value in items}
        name = f"{HEADER_PREFIX}context"
        raw = lowered.get(name)
        if raw is None:
            raise ContextValidationError(name, "header is missing; send ctx.to_headers()")
        try:
            data = json.loads(base64.urlsafe_b64decode(raw.encode("ascii")))
        except ValueError as exc:
            raise ContextValidationError(name, f"header is not valid: {exc}") from None
        ctx = cls.from_dict(data)
        for field_name in _ID_FIELDS:
            header = f"{HEADER_PREFIX}{field_name.replace('_', '-')}"
            sent = lowered.get(header)
            if sent is not None and sent != _header_id(getattr(ctx, field_name)):
                raise ContextValidationError(
                    header, "disagrees with the context header; the headers were altered"
                )
        return ctx


def _header_id(value: str) -> str:
    # Ids may hold any printable unicode; header values must be ASCII.
    return value if value.isascii() else json.dumps(value)


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _event(at: dt.datetime, action: str, detail: str) -> AuditEvent:
    return AuditEvent(at=at, action=action, detail=detail)


# Every field of a context, including the lineage (not an __init__ argument).
_FIELD_NAMES: Final = tuple(item.name for item in fields(UserExecutionContext))


def log_fields(ctx: UserExecutionContext) -> dict[str, str]:
    """Structured ``extra=`` fields naming ``ctx``'s user and request for a log record."""
    return {
        "user_id": ctx.user_id,
        "request_id": ctx.request_id,
        "root_request_id": ctx.root_request_id,
        "run_id": ctx.run_id,
    }


def identified(ctx: UserExecutionContext, user_id: str) -> UserExecutionContext:
    """``ctx`` as the same request (ids, lineage) acting for ``user_id`` from now on.

    For a request whose user is known only after it started (its authentication dependency
    ran): the audit trail records the change.

    Raises:
        ContextValidationError: ``user_id`` is not a valid id.
    """
    user_id = validate_id("user_id", user_id)
    now = _utcnow()
    return ctx._derived(  # noqa: SLF001 - the same module
        user_id=user_id,
        audit_trail=ctx._audited("identified", f"was {ctx.user_id}", now),  # noqa: SLF001
    )


def same_request(ctx: UserExecutionContext, other: UserExecutionContext) -> bool:
    """Whether ``other`` belongs to the same request as ``ctx`` (the same lineage).

    True for ``ctx`` itself and every context derived from the same root context in this
    process with ``child()`` and ``with_metadata()``; False for any other context, even one
    with the same ids (a request id can come from a client header, so it proves nothing).
    """
    return ctx._lineage is other._lineage  # noqa: SLF001 - the same class


def request_token(ctx: UserExecutionContext) -> object:
    """An object that stands for ``ctx``'s request (see :func:`same_request`).

    Weakly referenceable: kept in a ``WeakSet``, it is forgotten once the request's last
    context is gone.
    """
    return ctx._lineage  # noqa: SLF001 - the same module


_current: Final[contextvars.ContextVar[UserExecutionContext | None]] = contextvars.ContextVar(
    "reqscope_current_context", default=None
)


def current_context_or_none() -> UserExecutionContext | None:
    """Return the current context, or ``None`` when none is set."""
    return _current.get()


def current_context() -> UserExecutionContext:
    """Return the current context.

    Raises:
        NoActiveContextError: no context is set in this task or thread.
    """
    ctx = _current.get()
    if ctx is None:
        raise NoActiveContextError
    return ctx


class use_context:  # noqa: N801 - used like a function: `with use_context(ctx):`
    """Make ``ctx`` the current context for the ``with`` block, sync or async code alike.

    The previous context is restored on exit, also on error. Tasks started inside the block
    (``asyncio.create_task``, anyio task groups) inherit it, as contextvars do.

    Example:
        >>> ctx = UserExecutionContext.create("alice")
        >>> with use_context(ctx):
        ...     current_context().user_id
        'alice'
    """

    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: UserExecutionContext) -> None:
        if not isinstance(ctx, UserExecutionContext):
            raise TypeError(
                f"use_context() takes a UserExecutionContext, got {type(ctx).__name__}; "
                "build one with UserExecutionContext.create(user_id)"
            )
        self._ctx = ctx
        self._token: contextvars.Token[UserExecutionContext | None] | None = None

    def __enter__(self) -> UserExecutionContext:
        if self._token is not None:
            raise RuntimeError("this use_context() block is already entered; create a new one")
        self._token = _current.set(self._ctx)
        return self._ctx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self._token = self._token, None
        if token is not None:
            _current.reset(token)
