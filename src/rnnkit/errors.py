"""The one exception type users see.

Anything the user can fix (a bad path, a bad option, a broken checkpoint)
raises :class:`RnnkitError` with a one-line message that says what was wrong
and how to fix it. The CLI prints that line and exits with status 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class RnnkitError(Exception):
    """A user-facing error: the message is one line, and the CLI exits 2."""
