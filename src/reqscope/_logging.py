"""reqscope's loggers, and the filter that gives every record the request's ids.

Every module logs to a child of ``logging.getLogger("reqscope")`` (``reqscope._leaks``,
``reqscope._sessions``...: configure ``"reqscope"``). Each record carries ``request_id``,
``user_id`` and ``session_id`` as attributes: those the record was logged with, else the
current context's, else ``None``; so a JSON formatter or ``%(request_id)s`` always finds them.
"""

from __future__ import annotations

import logging
from typing import Final

from reqscope._context import current_context_or_none

__all__ = ["ContextLogFilter", "get_logger"]

FIELDS: Final = ("request_id", "user_id", "session_id")


class ContextLogFilter(logging.Filter):
    """Give each record ``request_id``, ``user_id`` and ``session_id`` (``None`` if unknown).

    reqscope's own loggers have it. Add it to your handler to give your application's
    records the ids of the request they were logged in too:

    Example:
        >>> handler = logging.StreamHandler()
        >>> handler.addFilter(ContextLogFilter())
        >>> handler.setFormatter(logging.Formatter("%(request_id)s %(user_id)s %(message)s"))
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Fill in the fields the record lacks; never drops a record."""
        if all(hasattr(record, name) for name in FIELDS):
            return True
        ctx = current_context_or_none()
        if not hasattr(record, "request_id"):
            record.request_id = None if ctx is None else ctx.request_id
        if not hasattr(record, "user_id"):
            record.user_id = None if ctx is None else ctx.user_id
        if not hasattr(record, "session_id"):
            record.session_id = None
        return True


_FILTER: Final = ContextLogFilter()


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (a ``reqscope.*`` module), with the context fields filter."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
