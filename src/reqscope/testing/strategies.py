"""Hypothesis strategies for property-based isolation tests.

Example:
    >>> from hypothesis import given
    >>> from reqscope.testing.strategies import contexts
    >>> @given(contexts())
    ... def test_round_trip(ctx):
    ...     assert UserExecutionContext.from_dict(ctx.to_dict()) == ctx
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final, Literal

from hypothesis import strategies as st

from reqscope._context import MAX_ID_LENGTH, PLACEHOLDER_IDS, UserExecutionContext

__all__ = ["contexts", "invalid_user_ids", "metadata", "user_ids"]


def _valid_id(value: str) -> bool:
    return value == value.strip() and value.lower() not in PLACEHOLDER_IDS


# Unicode categories an id may not hold (reqscope._context.undisplayable).
_Refused = Literal["Cc", "Cf", "Cs", "Cn", "Zl", "Zp"]
_REFUSED_CATEGORIES: Final[tuple[_Refused, ...]] = ("Cc", "Cf", "Cs", "Cn", "Zl", "Zp")


def user_ids() -> st.SearchStrategy[str]:
    """Valid ids: 1 to 256 displayable characters, no surrounding space, no placeholder.

    Displayable: no code point of the Unicode categories Cc, Cf, Cs, Cn, Zl or Zp.
    """
    characters = st.characters(exclude_categories=_REFUSED_CATEGORIES)
    # Long ids drawn on purpose: left to itself Hypothesis rarely makes text this long.
    return (
        st.text(characters, min_size=1, max_size=64)
        | st.text(characters, min_size=65, max_size=MAX_ID_LENGTH)
    ).filter(_valid_id)


def _leaves() -> st.SearchStrategy[Any]:
    return (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
        | st.datetimes(timezones=st.none() | st.just(dt.timezone.utc))
        | st.dates()
        | st.uuids()
        | st.decimals(allow_nan=False, allow_infinity=False, places=4)
        | st.binary(max_size=16)
    )


def metadata(*, max_leaves: int = 20) -> st.SearchStrategy[dict[str, Any]]:
    """Valid metadata: nested JSON-like data plus datetime, date, UUID, Decimal and bytes."""
    values = st.recursive(
        _leaves(),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=max_leaves,
    )
    return st.dictionaries(st.text(max_size=10), values, max_size=6)


@st.composite
def contexts(
    draw: st.DrawFn, *, users: st.SearchStrategy[str] | None = None, max_children: int = 3
) -> UserExecutionContext:
    """Valid contexts with nested metadata, some derived through ``child()``."""
    ctx = UserExecutionContext.create(
        draw(users if users is not None else user_ids()),
        thread_id=draw(st.none() | user_ids()),
        run_id=draw(st.none() | user_ids()),
        websocket_client_id=draw(st.none() | user_ids()),
        metadata=draw(metadata()),
    )
    for _ in range(draw(st.integers(0, max_children))):
        extra = draw(
            st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), _leaves(), max_size=2)
        )
        ctx = ctx.child(draw(user_ids()), **extra)
    return ctx


def _insert(text: str, char: str, index: int) -> str:
    """``text`` with ``char`` inserted at ``index`` (or at its end)."""
    return text[:index] + char + text[index:]


def invalid_user_ids() -> st.SearchStrategy[object]:
    """Every class of id that UserExecutionContext rejects.

    Empty, padded, too long, placeholders, not a str, and ids holding one code point of
    each refused Unicode category (control, format, surrogate, unassigned, line and
    paragraph separators) anywhere.
    """
    placeholders = st.sampled_from(sorted(PLACEHOLDER_IDS)).flatmap(
        lambda p: st.sampled_from([p, p.upper(), p.title()])
    )
    undisplayable = st.tuples(
        user_ids(),
        st.sampled_from(_REFUSED_CATEGORIES).flatmap(
            lambda category: st.characters(categories=(category,))
        ),
        st.integers(0, MAX_ID_LENGTH),
    ).map(lambda t: _insert(t[0][: MAX_ID_LENGTH - 1], t[1], t[2]))
    return st.one_of(
        st.just(""),
        user_ids().map(lambda s: f" {s}"),
        user_ids().map(lambda s: f"{s}\t"),
        undisplayable,
        st.text(min_size=MAX_ID_LENGTH + 1, max_size=MAX_ID_LENGTH + 20).filter(_valid_id),
        placeholders,
        st.integers(),
        st.none(),
        st.binary(min_size=1),
    )
