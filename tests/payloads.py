"""A malicious pickle for the tests that check rnnkit never unpickles a checkpoint."""

from __future__ import annotations

from pathlib import Path


class Payload:
    """Unpickling this creates the file ``marker``: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
