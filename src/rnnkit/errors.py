"""The one exception type users see.

Anything the user can fix (a bad path, a bad option, a broken checkpoint)
raises :class:`RnnkitError` with a one-line message that says what was wrong
and how to fix it. The CLI prints that line and exits with status 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class RnnkitError(Exception):
    """A user-facing error: the message is one line, and the CLI exits 2."""


class UnknownTokens(RnnkitError):
    """Text holds pieces the tokenizer's vocabulary lacks (and the caller asked for an error, not skipping).

    The message says which; how to skip them instead is for the caller to say in its own words
    (the CLI's ``--unknown skip``, an API field), so it is left out here.
    """

    def within(self, context: str) -> UnknownTokens:
        """The same error, said of ``context`` ("prime 'abc'", "evaluation text")."""
        return UnknownTokens(f"{context}: {self}")


def describe_os_error(exc: OSError) -> str:
    """What an operating-system error means for the user, and what to do about it, in one phrase."""
    import errno

    reason = exc.strerror or str(exc) or type(exc).__name__
    advice = {
        errno.ENOSPC: "the disk is full; free some space or write somewhere else",
        errno.EDQUOT: "the disk quota is used up; free some space or write somewhere else",
        errno.EACCES: "permission denied; fix the permissions or use another path",
        errno.EPERM: "operation not permitted; fix the permissions or use another path",
        errno.EROFS: "the file system is read-only; choose a folder on a writable disk",
    }.get(exc.errno)
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{advice}{where}" if advice else f"{reason}{where}"
