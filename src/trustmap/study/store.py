"""The study file: one SQLite database (WAL mode) that holds a blinded reader study.

A study directory holds ``study.sqlite`` and ``ADMIN_KEY``. The database keeps

* ``meta``: format, version, design, criteria, scale, classes, seed, provenance;
* ``cases``: the drawn test images (label, model prediction);
* ``images``: every picture a reader can see, as metadata-free PNG bytes under a random id;
* ``readers``: one row per reader with the SHA-256 of the reader's token (for log-in) and
  the token itself encrypted with the admin key (so that the admin can print the URLs
  again);
* ``questions`` and ``items``: each reader's own sequence of questions and, per question,
  the answer fields (one per panel) under random ids;
* ``answers`` (the latest answer per item) and ``answer_log`` (every change).

The blinding key (which method drew which image) is one JSON object encrypted with a
key derived from the admin key (scrypt, then Fernet: AES-128-CBC with HMAC-SHA256), so the
file can be copied to the server without revealing it; only ``analyze`` and the admin
export decrypt it. Every answer is one transaction. In WAL mode with SQLite's default
``synchronous=NORMAL`` an acknowledged answer survives a killed or crashed server (it is
in the WAL before the server replies); ``sync="full"`` also syncs the WAL to disk at every
answer, so it survives a power cut too, at the price of one disk flush per answer (on a
busy disk that multiplied the 95th percentile latency by about 3.5 in
``benchmarks/study_load.py``). After a power cut in ``normal`` mode the last answers
before it may be missing; the reader's page then asks them again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ADMIN_KEY_FILE",
    "STUDY_FILE",
    "STUDY_FORMAT",
    "STUDY_VERSION",
    "Study",
    "connect",
    "derive_cipher",
    "read_admin_key",
    "study_path",
]

STUDY_FORMAT = "trustmap-study"
#: Version of the file layout this trustmap writes and the newest it reads.
STUDY_VERSION = 1
STUDY_FILE = "study.sqlite"
ADMIN_KEY_FILE = "ADMIN_KEY"
#: Environment variable that may hold the admin key instead of ``ADMIN_KEY``.
ADMIN_KEY_ENV = "TRUSTMAP_STUDY_ADMIN_KEY"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE cases (
    case_id INTEGER PRIMARY KEY,
    sample_id TEXT NOT NULL,
    dataset_index INTEGER NOT NULL,
    label INTEGER NOT NULL,
    predicted INTEGER NOT NULL,
    probability REAL NOT NULL
);
CREATE TABLE images (
    image_id TEXT PRIMARY KEY,
    case_id INTEGER NOT NULL REFERENCES cases(case_id),
    png BLOB NOT NULL
);
CREATE TABLE readers (
    reader_id INTEGER PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    token_enc BLOB NOT NULL,
    variant TEXT NOT NULL
);
CREATE TABLE questions (
    question_id TEXT PRIMARY KEY,
    reader_id INTEGER NOT NULL REFERENCES readers(reader_id),
    seq INTEGER NOT NULL,
    case_id INTEGER NOT NULL REFERENCES cases(case_id),
    criterion TEXT,
    ref_image TEXT REFERENCES images(image_id),
    show_prediction INTEGER NOT NULL DEFAULT 0,
    UNIQUE (reader_id, seq)
);
CREATE TABLE items (
    item_id TEXT PRIMARY KEY,
    question_id TEXT NOT NULL REFERENCES questions(question_id),
    reader_id INTEGER NOT NULL REFERENCES readers(reader_id),
    slot INTEGER NOT NULL,
    field TEXT NOT NULL,
    image_id TEXT REFERENCES images(image_id)
);
CREATE INDEX items_by_question ON items(question_id);
CREATE TABLE answers (
    item_id TEXT PRIMARY KEY REFERENCES items(item_id),
    reader_id INTEGER NOT NULL REFERENCES readers(reader_id),
    value INTEGER NOT NULL,
    time_ms REAL,
    updated_at REAL NOT NULL,
    revision INTEGER NOT NULL
);
CREATE INDEX answers_by_reader ON answers(reader_id);
CREATE TABLE answer_log (
    log_id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL,
    reader_id INTEGER NOT NULL,
    value INTEGER NOT NULL,
    time_ms REAL,
    at REAL NOT NULL
);
"""


def study_path(path: str | os.PathLike[str]) -> Path:
    """The study file of a study directory (or the file itself)."""
    p = Path(path).expanduser()
    return p / STUDY_FILE if p.is_dir() else p


SYNC_MODES = ("normal", "full")


def connect(path: str | os.PathLike[str], sync: str = "normal") -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with ``synchronous``
    set to ``sync`` (see the module docstring)."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
    con = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA busy_timeout = 30000")
    con.execute("PRAGMA foreign_keys = ON")
    con.execute(f"PRAGMA synchronous = {sync.upper()}")
    return con


@contextlib.contextmanager
def transaction(con: sqlite3.Connection, *, write: bool = True) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (or DEFERRED) ... COMMIT, ROLLBACK on any exception."""
    con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


# ---------------------------------------------------------------------------------------
# the admin key


def new_secret(nbytes: int = 24) -> str:
    """A URL-safe random secret (192 bits by default)."""
    return secrets.token_urlsafe(nbytes)


def hash_secret(secret: str) -> str:
    """SHA-256 of a high-entropy secret (tokens, admin key); no salt is needed for those."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _fernet() -> Any:
    try:
        from cryptography.fernet import Fernet
    except ImportError as err:  # pragma: no cover - the study extra brings it
        raise ImportError(
            "the reader study needs the 'cryptography' package: pip install 'trustmap[study]'"
        ) from err
    return Fernet


def derive_cipher(admin_key: str, salt: bytes) -> Any:
    """A Fernet cipher keyed by scrypt(admin key, salt)."""
    raw = hashlib.scrypt(admin_key.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return _fernet()(base64.urlsafe_b64encode(raw))


def read_admin_key(study_dir: str | os.PathLike[str], admin_key: str | None = None) -> str:
    """The admin key: the argument, else ``$TRUSTMAP_STUDY_ADMIN_KEY``, else the study
    directory's ``ADMIN_KEY`` file; ValueError when none is there."""
    if admin_key:
        return admin_key.strip()
    if os.environ.get(ADMIN_KEY_ENV):
        return os.environ[ADMIN_KEY_ENV].strip()
    p = Path(study_dir).expanduser()
    key_file = (p if p.is_dir() else p.parent) / ADMIN_KEY_FILE
    if key_file.is_file():
        return key_file.read_text().strip()
    raise ValueError(
        f"no admin key: pass --admin-key, set {ADMIN_KEY_ENV} or put the key printed by "
        f"`trustmap study create` into {key_file}"
    )


# ---------------------------------------------------------------------------------------
# the study


@dataclass(frozen=True)
class Study:
    """An opened study file: its settings and a connection per thread.

    Attributes
    ----------
    path:
        The ``study.sqlite`` file.
    meta:
        The decoded ``meta`` table (``design``, ``criteria``, ``scale``, ``classes``, ...).
    """

    path: Path
    meta: dict[str, Any]
    _local: threading.local
    sync: str = "normal"

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, sync: str = "normal") -> Study:
        """Open and check a study file (or directory).

        Raises
        ------
        FileNotFoundError
            If there is no study file.
        ValueError
            If the file is not a trustmap study, is damaged, or comes from a newer trustmap.
        """
        file = study_path(path)
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} does not exist: create a study with `trustmap study create`"
            )
        with file.open("rb") as handle:
            magic = handle.read(16)
        if magic != b"SQLite format 3\x00":
            raise ValueError(f"{file} is not a trustmap study file (not an SQLite database)")
        try:
            con = connect(file)
            rows = con.execute("SELECT key, value FROM meta").fetchall()
            con.close()
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{file} is not a readable trustmap study file: {err}") from None
        meta = {key: json.loads(value) for key, value in rows}
        if meta.get("format") != STUDY_FORMAT:
            raise ValueError(f"{file} is not a trustmap study file (format {meta.get('format')!r})")
        version = meta.get("version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{file} has an invalid study version {version!r}")
        if version > STUDY_VERSION:
            raise ValueError(
                f"{file} was written by a newer trustmap (study format version {version}; this "
                f"trustmap reads up to {STUDY_VERSION}): upgrade trustmap to open it"
            )
        connect(file, sync).close()  # checks ``sync``
        return cls(file, meta, threading.local(), sync)

    # -- connections -------------------------------------------------------------------

    @property
    def con(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections must not be shared across threads
        while in use)."""
        con = getattr(self._local, "con", None)
        if con is None:
            con = connect(self.path, self.sync)
            self._local.con = con
        return con

    def close(self) -> None:
        """Close this thread's connection."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # -- the admin key -------------------------------------------------------------------

    def check_admin(self, admin_key: str | None) -> bool:
        """Whether ``admin_key`` is this study's admin key (constant-time comparison)."""
        if not admin_key:
            return False
        return hmac.compare_digest(hash_secret(admin_key), str(self.meta["admin_key_hash"]))

    def cipher(self, admin_key: str) -> Any:
        """The Fernet cipher of the blinding key; ValueError for a wrong admin key."""
        if not self.check_admin(admin_key):
            raise ValueError(f"wrong admin key for {self.path}")
        return derive_cipher(admin_key, base64.b64decode(self.meta["key_salt"]))

    def blinding_key(self, admin_key: str) -> dict[str, str | None]:
        """``image_id -> method`` (None for the plain image)."""
        cipher = self.cipher(admin_key)
        blob = self.con.execute("SELECT value FROM meta WHERE key = 'blinding_key'").fetchone()
        return json.loads(cipher.decrypt(json.loads(blob[0]).encode()))

    def reader_tokens(self, admin_key: str) -> dict[int, str]:
        """``reader_id -> token``, decrypted with the admin key."""
        cipher = self.cipher(admin_key)
        rows = self.con.execute("SELECT reader_id, token_enc FROM readers ORDER BY reader_id")
        return {int(r): cipher.decrypt(bytes(t)).decode() for r, t in rows}

    # -- readers ---------------------------------------------------------------------------

    def reader_of(self, token: str) -> tuple[int, str] | None:
        """``(reader_id, variant)`` of a token, or None."""
        row = self.con.execute(
            "SELECT reader_id, variant FROM readers WHERE token_hash = ?", (hash_secret(token),)
        ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def progress(self) -> list[dict[str, Any]]:
        """Per reader: answered and total items, last activity (epoch seconds or None)."""
        rows = self.con.execute(
            """
            SELECT r.reader_id, r.variant,
                   (SELECT COUNT(*) FROM items i WHERE i.reader_id = r.reader_id),
                   (SELECT COUNT(*) FROM answers a WHERE a.reader_id = r.reader_id),
                   (SELECT MAX(updated_at) FROM answers a WHERE a.reader_id = r.reader_id)
            FROM readers r ORDER BY r.reader_id
            """
        ).fetchall()
        return [
            {
                "reader": int(r),
                "variant": v,
                "total": int(t),
                "answered": int(a),
                "finished": int(a) == int(t),
                "last_answer_at": last,
            }
            for r, v, t, a, last in rows
        ]

    # -- answers --------------------------------------------------------------------------

    def save_answer(
        self, reader_id: int, item_id: str, value: int, time_ms: float | None
    ) -> tuple[int, int]:
        """Write one answer atomically (upsert + log); returns ``(revision, answered)``."""
        now = time.time()
        con = self.con
        with transaction(con):
            revision = con.execute(
                """
                INSERT INTO answers (item_id, reader_id, value, time_ms, updated_at, revision)
                VALUES (?, ?, ?, ?, ?, 1)
                ON CONFLICT (item_id) DO UPDATE SET
                    value = excluded.value, time_ms = excluded.time_ms,
                    updated_at = excluded.updated_at, revision = answers.revision + 1
                RETURNING revision
                """,
                (item_id, reader_id, value, time_ms, now),
            ).fetchone()[0]
            con.execute(
                "INSERT INTO answer_log (item_id, reader_id, value, time_ms, at) "
                "VALUES (?, ?, ?, ?, ?)",
                (item_id, reader_id, value, time_ms, now),
            )
            answered = con.execute(
                "SELECT COUNT(*) FROM answers WHERE reader_id = ?", (reader_id,)
            ).fetchone()[0]
        return int(revision), int(answered)

    def export(self, admin_key: str) -> list[dict[str, Any]]:
        """Every answer, de-blinded: one dict per answered item (see :mod:`.analysis`)."""
        key = self.blinding_key(admin_key)
        classes = list(self.meta.get("classes") or [])
        rows = self.con.execute(
            """
            SELECT q.reader_id, r.variant, q.seq, q.case_id, c.sample_id, c.label,
                   c.predicted, c.probability, q.criterion, q.show_prediction,
                   q.ref_image, i.item_id, i.slot, i.field, i.image_id, a.value, a.time_ms,
                   a.updated_at, a.revision
            FROM answers a
            JOIN items i ON i.item_id = a.item_id
            JOIN questions q ON q.question_id = i.question_id
            JOIN readers r ON r.reader_id = q.reader_id
            JOIN cases c ON c.case_id = q.case_id
            ORDER BY q.reader_id, q.seq, i.slot, i.field
            """
        ).fetchall()
        n_questions = dict(
            self.con.execute("SELECT reader_id, COUNT(*) FROM questions GROUP BY reader_id")
        )
        out = []
        for (
            reader,
            variant,
            seq,
            case,
            sample_id,
            label,
            predicted,
            prob,
            criterion,
            show_pred,
            ref_image,
            item_id,
            slot,
            field,
            image_id,
            value,
            time_ms,
            updated_at,
            revision,
        ) in rows:
            method = key.get(image_id) if image_id else key.get(ref_image)
            out.append(
                {
                    "reader": int(reader),
                    "variant": variant,
                    "seq": int(seq),
                    "n_questions": int(n_questions[reader]),
                    "case": int(case),
                    "sample_id": sample_id,
                    "label": int(label),
                    "label_name": classes[label] if label < len(classes) else str(label),
                    "model_prediction": int(predicted),
                    "model_probability": float(prob),
                    "criterion": criterion,
                    "show_prediction": bool(show_pred),
                    "method": method,
                    "item": item_id,
                    "slot": int(slot),
                    "field": field,
                    "value": int(value),
                    "time_ms": time_ms,
                    "updated_at": float(updated_at),
                    "revision": int(revision),
                }
            )
        return out


def write_meta(con: sqlite3.Connection, meta: Mapping[str, Any]) -> None:
    """Insert (or replace) ``meta`` entries, JSON-encoded."""
    con.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        [(k, json.dumps(v)) for k, v in meta.items()],
    )
