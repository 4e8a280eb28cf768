"""Errors users see: each names the file and line (or the param) and what is wrong."""

from __future__ import annotations


class TagtuneError(Exception):
    """Base class: caught by every stage's `main()`, printed without a traceback, exit code 1."""


class ConfigError(TagtuneError):
    """params.yaml (or an override) is invalid; the message names the key path."""


class DataError(TagtuneError):
    """Bad input data; the message names the file and line/record."""

    def __init__(self, path: object, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


def one_line(e: BaseException) -> str:
    """The error's message on one line (multi-line messages joined with `; `)."""
    text = str(e).strip() or type(e).__name__
    return "; ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def error_line(command: str, e: BaseException) -> str:
    """`tagtune <command>: error: <one line>` — how every entry point reports a failure.

    A TagtuneError is the user's to fix and speaks for itself; anything else is named by its type.
    """
    kind = "" if isinstance(e, TagtuneError) else f"{type(e).__name__}: "
    return f"tagtune {command}: error: {kind}{one_line(e)}"
