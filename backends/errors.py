"""Errors the backends raise for the launcher to report without a traceback."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """A platform that was asked for cannot run here. `what` says why, `fix` what to do."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what}\n{fix}")
        self.what = what
        self.fix = fix
