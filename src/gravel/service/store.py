"""What the service keeps across restarts: SQLite rows and content-addressed blob files.

Rows (models, sessions, jobs) live in SQLite (WAL, synchronous=FULL). Large bytes (artifact
files, evaluation keys, job inputs and results) live in `blobs/`, one file per SHA-256 of the
content, written to `tmp/` first, fsynced, then renamed into place. A row is committed only
after its blobs are in place, so anything acknowledged to a client survives a SIGKILL; a blob
whose row never got committed is an orphan, removed at the next start.

One lock serializes "put blob + insert row" against "delete row + unlink unreferenced blob";
otherwise two uploads of identical keys could race with the removal of one of them.

A full disk (ENOSPC, EDQUOT, EFBIG, SQLite's "database or disk is full") becomes
StorageFullError wherever the store writes, so the service answers 507 instead of a bare 500;
the write that failed is rolled back (a partial file is removed, SQLite rolls the statement
back), and reads never write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gravel.errors import StorageFullError

__all__ = ["BlobWriter", "Store", "TooLarge", "storage_errors"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    manifest_sha TEXT NOT NULL,
    files TEXT NOT NULL,            -- JSON {file name: sha256}
    manifest TEXT NOT NULL,         -- the manifest's JSON, for describe
    created REAL NOT NULL,
    keys_bytes INTEGER,             -- exact size of this program's framed evaluation keys
    input_bytes INTEGER             -- exact size of one framed input ciphertext
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,
    token_hash TEXT NOT NULL,
    keys_sha TEXT NOT NULL,
    keys_bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    session TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    status TEXT NOT NULL,            -- queued, running, done, failed
    items INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    input_sha TEXT,
    result_sha TEXT,
    error TEXT,
    error_status INTEGER,            -- the HTTP status of a failure: 4xx the input's, 5xx the server's
    created REAL NOT NULL,
    finished REAL,
    fetched REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_session ON jobs(session);
"""

# Columns added since the first schema, for stores created before them.
ADDED_COLUMNS = (
    ("models", "keys_bytes", "INTEGER"),
    ("models", "input_bytes", "INTEGER"),
    ("jobs", "error_status", "INTEGER"),
)

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

BLOB_COLUMNS = (
    ("sessions", "keys_sha"),
    ("jobs", "input_sha"),
    ("jobs", "result_sha"),
)


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn a full disk into StorageFullError naming what could not be stored."""
    try:
        yield
    except OSError as exc:
        if exc.errno in FULL_ERRNOS:
            raise StorageFullError(f"the server's disk is full: could not store {what}; "
                                   "try again later (nothing stored before was lost)") from exc
        raise
    except sqlite3.OperationalError as exc:
        if "full" in str(exc).lower():
            raise StorageFullError(f"the server's disk is full: could not record {what}; "
                                   "try again later (nothing stored before was lost)") from exc
        raise


class TooLarge(Exception):
    """A streamed body went over its size limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"body is larger than the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class Blob:
    sha: str
    size: int


class BlobWriter:
    """Receives a body chunk by chunk into a temporary file, hashing and counting as it goes."""

    def __init__(self, store: Store, limit: int) -> None:
        self.limit = limit
        with storage_errors("an upload"):
            fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="upload-")
        self._file = os.fdopen(fd, "wb")
        self.path = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0
        self.blob: Blob | None = None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise TooLarge(self.limit)
        self._hash.update(chunk)
        with storage_errors("this body"):
            self._file.write(chunk)

    def finish(self) -> Blob:
        """Close the file; it stays in tmp/ until `Store.adopt` makes it durable in blobs/
        (a body that is only read, like a synchronous inference's input, is never fsynced)."""
        with storage_errors("this body"):
            self._file.close()
        self.blob = Blob(self._hash.hexdigest(), self.size)
        return self.blob

    def read(self, offset: int = 0) -> bytes:
        """The body from `offset` on, in one read (no copy of the part before it)."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read()

    def discard(self) -> None:
        if not self._file.closed:
            try:
                self._file.close()
            except OSError:  # the flush of a full disk's last bytes; the file goes anyway
                pass
        self.path.unlink(missing_ok=True)


class Store:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.view_dir = self.root / "views"
        for d in (self.blob_dir, self.tmp_dir, self.view_dir):
            d.mkdir(parents=True, exist_ok=True)
        clear_leftovers(self.tmp_dir)
        self.lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "gravel.db", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._add_columns()
        self.collect_garbage()

    def _add_columns(self) -> None:
        for table, column, kind in ADDED_COLUMNS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        with self.lock:
            self._db.close()

    def integrity(self) -> str:
        with self.lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    # -- blobs ------------------------------------------------------------------------------
    def blob_path(self, sha: str) -> Path:
        return self.blob_dir / sha[:2] / sha

    def writer(self, limit: int) -> BlobWriter:
        return BlobWriter(self, limit)

    def adopt(self, writer: BlobWriter) -> None:
        """Make a finished upload durable in blobs/ under its hash: fsync, rename, fsync the
        directory (call with `lock` held, then reference it in a row)."""
        target = self.blob_path(writer.blob.sha)
        with storage_errors("a blob"):
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                writer.discard()
            else:
                _fsync(writer.path)
                os.replace(writer.path, target)
                _fsync(target.parent)

    def put_bytes(self, data: bytes) -> Blob:
        """Write bytes as a blob (call with `lock` held, then reference it in a row)."""
        return self._put([data])

    def put_file(self, src: Path) -> Blob:
        """Copy a file in as a blob (call with `lock` held, then reference it in a row)."""
        with open(src, "rb") as f:
            return self._put(iter(lambda: f.read(1 << 20), b""))

    def _put(self, chunks) -> Blob:
        w = self.writer(1 << 62)
        try:
            for chunk in chunks:
                w.write(chunk)
            blob = w.finish()
            self.adopt(w)
            return blob
        except BaseException:
            w.discard()
            raise

    def read_blob(self, sha: str, offset: int = 0) -> bytes:
        """A blob's bytes from `offset` on (e.g. past a frame header already checked)."""
        with open(self.blob_path(sha), "rb") as f:
            f.seek(offset)
            return f.read()

    def collect_garbage(self) -> int:
        """Unlink blobs no row references. Safe at any time: every adopt-and-insert holds the
        same lock, so no blob is ever in blobs/ and about to be referenced."""
        with self.lock:
            used = self._referenced()
            removed = 0
            for d in self.blob_dir.iterdir():
                for p in d.iterdir() if d.is_dir() else ():
                    if p.name not in used:
                        p.unlink(missing_ok=True)
                        removed += 1
            return removed

    def _referenced(self) -> set[str]:
        used = set()
        for table, column in BLOB_COLUMNS:
            used.update(r[0] for r in self._db.execute(f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL"))
        for (files,) in self._db.execute("SELECT files FROM models"):
            used.update(json.loads(files).values())
        return used

    # -- models -----------------------------------------------------------------------------
    def add_model(self, name: str, digest: str, manifest_sha: str, files: dict[str, str], manifest: dict,
                  keys_bytes: int | None = None, input_bytes: int | None = None) -> None:
        with self.lock, storage_errors(f"model {name}"):
            self._db.execute(
                "INSERT INTO models (name, digest, manifest_sha, files, manifest, created, keys_bytes, input_bytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, digest, manifest_sha, json.dumps(files), json.dumps(manifest), time.time(),
                 keys_bytes, input_bytes),
            )

    def get_model(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            row = self._db.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        return _model_row(row) if row else None

    def list_models(self) -> list[dict[str, Any]]:
        with self.lock:
            rows = self._db.execute("SELECT * FROM models ORDER BY name").fetchall()
        return [_model_row(r) for r in rows]

    def delete_model(self, name: str) -> list[str]:
        """Delete a model with its sessions and jobs; returns the ids of the sessions removed."""
        with self.lock, storage_errors("the deletion"):
            model = self.get_model(name)
            if model is None:
                return []
            sessions = [r[0] for r in self._db.execute("SELECT id FROM sessions WHERE model = ?", (name,))]
            self._db.execute("DELETE FROM models WHERE name = ?", (name,))
            self.collect_garbage()
            shutil.rmtree(self.view_dir / model["manifest_sha"], ignore_errors=True)
            return sessions

    def model_view(self, model: dict[str, Any]) -> Path:
        """A directory with the model's artifact files under their own names (hard links to
        blobs), which the backend loaders need. Rebuilt from blobs whenever missing."""
        view = self.view_dir / model["manifest_sha"]
        if not view.is_dir():
            with storage_errors("the model's files view"):
                tmp = Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix="view-"))
                for fname, sha in model["files"].items():
                    os.link(self.blob_path(sha), tmp / fname)
            try:
                os.replace(tmp, view)
            except OSError:  # another thread built it first
                for p in tmp.iterdir():
                    p.unlink()
                tmp.rmdir()
        return view

    # -- sessions ---------------------------------------------------------------------------
    def add_session(self, sid: str, model: str, token_hash: str, keys: Blob) -> None:
        now = time.time()
        with self.lock, storage_errors("the session"):
            self._db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sid, model, token_hash, keys.sha, keys.size, now, now),
            )

    def get_session(self, sid: str) -> dict[str, Any] | None:
        with self.lock:
            row = self._db.execute("SELECT * FROM sessions WHERE id = ?", (sid,)).fetchone()
        return dict(row) if row else None

    def touch_session(self, sid: str) -> None:
        with self.lock, storage_errors("the session's idle clock"):
            self._db.execute("UPDATE sessions SET last_used = ? WHERE id = ?", (time.time(), sid))

    def delete_session(self, sid: str) -> bool:
        with self.lock, storage_errors("the deletion"):
            cur = self._db.execute("DELETE FROM sessions WHERE id = ?", (sid,))
            self.collect_garbage()
            return cur.rowcount > 0

    def count_sessions(self) -> int:
        with self.lock:
            return self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]

    # -- jobs -------------------------------------------------------------------------------
    def add_job(self, jid: str, session: str, items: int, input_sha: str) -> None:
        with self.lock, storage_errors("the job"):
            self._db.execute(
                "INSERT INTO jobs (id, session, status, items, input_sha, created) VALUES (?, ?, 'queued', ?, ?, ?)",
                (jid, session, items, input_sha, time.time()),
            )

    def get_job(self, jid: str) -> dict[str, Any] | None:
        with self.lock:
            row = self._db.execute(
                "SELECT jobs.*, sessions.model AS model FROM jobs JOIN sessions ON sessions.id = jobs.session "
                "WHERE jobs.id = ?",
                (jid,),
            ).fetchone()
        return dict(row) if row else None

    def set_job_status(self, jid: str, status: str, done: int | None = None) -> None:
        with self.lock, storage_errors("the job's progress"):
            if done is None:
                self._db.execute("UPDATE jobs SET status = ? WHERE id = ?", (status, jid))
            else:
                self._db.execute("UPDATE jobs SET status = ?, done = ? WHERE id = ?", (status, done, jid))

    def finish_job(self, jid: str, result: bytes | None, error: str | None = None,
                   error_status: int | None = None) -> None:
        """Store the result blob and mark the job done (or failed); the input is dropped."""
        with self.lock, storage_errors("the job's result"):
            sha = self.put_bytes(result).sha if result is not None else None
            self._db.execute(
                "UPDATE jobs SET status = ?, done = CASE WHEN ? IS NULL THEN done ELSE items END, "
                "result_sha = ?, error = ?, error_status = ?, finished = ?, input_sha = NULL WHERE id = ?",
                ("done" if error is None else "failed", sha, sha, error, error_status, time.time(), jid),
            )
            self.collect_garbage()

    def mark_fetched(self, jid: str) -> None:
        with self.lock, storage_errors("the fetch time"):
            self._db.execute("UPDATE jobs SET fetched = COALESCE(fetched, ?) WHERE id = ?", (time.time(), jid))

    def delete_job(self, jid: str) -> bool:
        with self.lock, storage_errors("the deletion"):
            cur = self._db.execute("DELETE FROM jobs WHERE id = ?", (jid,))
            self.collect_garbage()
            return cur.rowcount > 0

    def unfinished_jobs(self) -> list[dict[str, Any]]:
        """Jobs acknowledged but not finished when the last process stopped, oldest first."""
        with self.lock:
            rows = self._db.execute(
                "SELECT jobs.*, sessions.model AS model FROM jobs JOIN sessions ON sessions.id = jobs.session "
                "WHERE status IN ('queued', 'running') ORDER BY created"
            ).fetchall()
        return [dict(r) for r in rows]

    def expire(self, session_ttl_s: float, result_ttl_s: float, fetched_grace_s: float,
               busy: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Remove idle sessions and old results; returns the ids of the sessions removed. A
        session in `busy` (work in progress) is not idle, whatever its clock says."""
        now = time.time()
        with self.lock, storage_errors("the expiry"):
            gone = [
                r[0]
                for r in self._db.execute("SELECT id FROM sessions WHERE last_used < ?", (now - session_ttl_s,))
                if r[0] not in busy
            ]
            self._db.executemany("DELETE FROM sessions WHERE id = ?", [(s,) for s in gone])
            self._db.execute(
                "DELETE FROM jobs WHERE (finished IS NOT NULL AND finished < ?) OR (fetched IS NOT NULL AND fetched < ?)",
                (now - result_ttl_s, now - fetched_grace_s),
            )
            self.collect_garbage()
            return gone


def clear_leftovers(tmp_dir: Path) -> None:
    """Empty tmp/ at start: uploads cut short by a crash are files, but an unpacked deploy
    (`artifact-*`) or a model view being built (`view-*`) is a directory, and a start-up that
    stumbled on one would keep the service down until someone removed it by hand."""
    for leftover in tmp_dir.iterdir():
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _model_row(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["files"] = json.loads(d["files"])
    d["manifest"] = json.loads(d["manifest"])
    return d


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
