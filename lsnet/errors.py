"""The project's own error types: bad input that the user can fix.

Every error raised for a user mistake derives from :class:`LsnetError`; its message is one line that
names the file / record / key and the problem. The ``lsnet`` dispatcher (``pipelines.cli``) prints it
as ``lsnet CMD: error: <message>`` and exits with status 2 — commands never catch these themselves.
``--debug`` (or ``LSNET_DEBUG=1``) shows the traceback instead.

Errors that are a ``ValueError`` / ``RuntimeError`` as well keep that base, so existing ``except
ValueError`` code (and code in other modules that raises subclasses of these) works unchanged.
"""
from __future__ import annotations


class LsnetError(Exception):
    """Base of all user-facing errors of lsnet (one-line message, CLI exit status 2)."""


class InputError(LsnetError, ValueError):
    """An input file or argument is missing, unreadable or malformed (the message names it)."""


def one_line(message: object) -> str:
    """``message`` with all whitespace runs (newlines from YAML/JSON parsers) folded into one space."""
    return " ".join(str(message).split())
