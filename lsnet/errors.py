"""The project's own error types: bad input that the user can fix, or a service that did not answer.

Every error raised for a user mistake derives from :class:`LsnetError`; its message is one line that
names the file / record / key and the problem. The ``lsnet`` dispatcher (``pipelines.cli``) is the one
place that catches them: it prints ``lsnet CMD: error: <message>`` and exits with the error's
``exit_status`` (2, as argparse for bad arguments; 1 for a :class:`ServiceError`). Two commands keep their
own line for a config error because their users and tests know it (``lsnet tune: <message>``,
``lsnet ablation ACTION: <message>``). ``--debug`` (or ``LSNET_DEBUG=1``) shows the traceback instead.

Errors that are a ``ValueError`` / ``RuntimeError`` as well keep that base, so existing ``except
ValueError`` code (and code in other modules that raises subclasses of these) works unchanged.
"""
from __future__ import annotations


class LsnetError(Exception):
    """Base of all user-facing errors of lsnet (one-line message)."""

    #: the exit status of a command that ends with this error
    exit_status = 2


class InputError(LsnetError, ValueError):
    """An input file or argument is missing, unreadable or malformed (the message names it)."""


class ServiceError(LsnetError, RuntimeError):
    """A service the command needs (the Ray job server, a Ray head) could not be reached or did not start."""

    exit_status = 1


def one_line(message: object) -> str:
    """``message`` with all whitespace runs (newlines from YAML/JSON parsers) folded into one space."""
    return " ".join(str(message).split())
