"""Sessions in SQLite: one row per session holding its context state (safetensors bytes).

WAL journal with synchronous=FULL: a committed update survives a crash of the server (kill -9)
and of the machine; every update is one statement, hence one transaction, so an append lands
whole or not at all. A version number makes an update from a stale read fail instead of
overwriting a newer state (two servers on one file, or a session deleted meanwhile).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from foldformer.config import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    tokens INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    version INTEGER NOT NULL,
    state BLOB NOT NULL
)
"""


@dataclass
class Session:
    id: str
    tokens: int
    created: float
    updated: float
    version: int
    state: bytes | None = None  # left out of listings

    def info(self) -> dict:
        return {"id": self.id, "tokens": self.tokens, "created": self.created,
                "updated": self.updated}  # fmt: skip


class SessionStore:
    """Thread-safe: each thread gets its own connection to the database file."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._local = threading.local()
        try:
            db = self._connect()
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
        except sqlite3.Error as error:  # not a database, a folder, no permission …
            raise ConfigError(f"session database {self.path!r}: {error}") from None

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    def create(self, session_id: str, state: bytes, tokens: int, max_sessions: int) -> Session:
        """A new session; raises SessionLimitError when max_sessions are stored already."""
        db, now = self._connect(), time.time()
        db.execute("BEGIN IMMEDIATE")  # the count and the insert in one transaction
        try:
            (count,) = db.execute("SELECT COUNT(*) FROM sessions").fetchone()
            if count >= max_sessions:
                raise SessionLimitError(
                    f"the server holds its maximum of {max_sessions} sessions; delete one first"
                )
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, 0, ?)",
                (session_id, tokens, now, now, state),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Session(session_id, tokens, now, now, 0, state)

    def get(self, session_id: str) -> Session | None:
        row = (
            self._connect()
            .execute(
                "SELECT id, tokens, created, updated, version, state FROM sessions WHERE id = ?",
                (session_id,),
            )
            .fetchone()
        )
        return None if row is None else Session(*row)

    def list(self) -> list[Session]:
        rows = self._connect().execute(
            "SELECT id, tokens, created, updated, version FROM sessions ORDER BY created"
        )
        return [Session(*row) for row in rows]

    def count(self) -> int:
        return self._connect().execute("SELECT COUNT(*) FROM sessions").fetchone()[0]

    def update(self, session: Session, state: bytes, tokens: int) -> bool:
        """Replace the state read as `session`; False if it changed or vanished meanwhile."""
        cursor = self._connect().execute(
            "UPDATE sessions SET state = ?, tokens = ?, updated = ?, version = version + 1 "
            "WHERE id = ? AND version = ?",
            (state, tokens, time.time(), session.id, session.version),
        )
        return cursor.rowcount == 1

    def delete(self, session_id: str) -> bool:
        cursor = self._connect().execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        return cursor.rowcount == 1


class SessionLimitError(Exception):
    """No room for another session."""
