"""Local users of the review app: names, roles and bcrypt password hashes in one SQLite file.

Used when the app runs without a load balancer in front (``auth: local``); behind the ALB the
identity comes from Cognito and this file is not read.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from qcsight_review.errors import UserError

OPERATOR, ENGINEER = "operator", "engineer"
ROLES = (OPERATOR, ENGINEER)
MIN_PASSWORD = 10
# bcrypt hashes only the first 72 bytes; a longer password would silently share a hash with its prefix.
MAX_PASSWORD_BYTES = 72
# 12 rounds: ~0.25 s per hash on this VM's core, which is what makes a stolen users file slow to attack;
# the login rate limit bounds how often a request can make the server pay it.
BCRYPT_ROUNDS = 12
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def engineer(self) -> bool:
        return self.role == ENGINEER


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"invalid role {role!r}: one of {', '.join(ROLES)}")
    return role


class UserStore:
    """Users in a SQLite file; one connection guarded by a lock (the app's handlers share it)."""

    def __init__(self, path: str | Path, rounds: int = BCRYPT_ROUNDS) -> None:
        self.path = Path(path)
        self.rounds = rounds
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=10)
            self._db.execute("CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, role TEXT NOT NULL, "
                             "hash BLOB NOT NULL, created TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)")
        except sqlite3.Error as exc:
            raise UserError(f"users file {self.path}: cannot open: {exc}") from exc
        self._lock = threading.Lock()
        # Checked against when the user does not exist, so a wrong name costs as long as a wrong password.
        self._dummy = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, name: str, role: str, password: str, *, replace: bool = False) -> User:
        """Add a user (or, with replace, change an existing one's role and password)."""
        if not _NAME.match(name):
            raise UserError(f"invalid user name {name!r}: 1-64 of letters, digits, '.', '_', '@' and '-'")
        check_role(role)
        encoded = password.encode("utf-8")
        if len(password) < MIN_PASSWORD or len(encoded) > MAX_PASSWORD_BYTES:
            raise UserError(f"invalid password for {name}: {MIN_PASSWORD} characters to {MAX_PASSWORD_BYTES} bytes")
        digest = bcrypt.hashpw(encoded, bcrypt.gensalt(self.rounds))
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        with self._lock:
            try:
                self._db.execute(f"{verb} INTO users (name, role, hash) VALUES (?, ?, ?)", (name, role, digest))
            except sqlite3.IntegrityError:
                raise UserError(f"user {name!r} exists; pass --replace to change the role or password") from None
        return User(name, role)

    def get(self, name: str) -> User | None:
        with self._lock:
            row = self._db.execute("SELECT name, role FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else User(row[0], row[1])

    def list(self) -> list[User]:
        with self._lock:
            rows = self._db.execute("SELECT name, role FROM users ORDER BY name").fetchall()
        return [User(name, role) for name, role in rows]

    def verify(self, name: str, password: str) -> User | None:
        """The user when the password matches; None otherwise (a missing user costs the same time)."""
        with self._lock:
            row = self._db.execute("SELECT name, role, hash FROM users WHERE name = ?", (name,)).fetchone()
        encoded = password.encode("utf-8")[:MAX_PASSWORD_BYTES]
        if row is None:
            bcrypt.checkpw(encoded, self._dummy)
            return None
        return User(row[0], row[1]) if bcrypt.checkpw(encoded, bytes(row[2])) else None
