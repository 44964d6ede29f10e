"""User-facing errors.

Every problem a user can fix (a missing file, a malformed spec, an unknown target)
raises :class:`EdgeqError`. The CLI prints it as one line with its hint and exits
non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgeqError(Exception):
    """An error the user can act on: ``message`` names the problem, ``hint`` the fix."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def one_of(kind: str, name: str, choices) -> EdgeqError:
    """An error for an unknown name, listing the valid choices."""
    listed = ", ".join(sorted(choices))
    return EdgeqError(f"unknown {kind} '{name}'", f"choose one of: {listed}")
