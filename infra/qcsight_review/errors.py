"""The review app's errors, rooted in qcsight_core.errors.QcsightError."""

from __future__ import annotations

from qcsight_core.errors import QcsightError


class ReviewAppError(QcsightError):
    """Something the review app could not do (a user file, an export, a notification)."""


class AuthError(ReviewAppError):
    """A request's identity could not be established: no session, a bad password, a forged header."""


class UserError(ReviewAppError):
    """A user could not be added or changed (a bad name, role or password)."""
