"""Keeping the store within `[store] retain` (age) and `[store] max_size` (disk), run from the store's thread.

Old rows go by age first; then, while the rows still take more than
`max_size`, the oldest requests go in slices of a tenth.  Deletes run in
chunks, each its own short transaction, so the gateway's batches (and another
gateway of the same project) never wait long behind a prune.  The file was
created with `auto_vacuum=INCREMENTAL`, so the pages freed are given back to
the file system at the end, and the file's size follows `max_size`.

The latest `*/list` answer of each method and page is kept whatever its age:
`mcpr schema` should still show the tools a server offered a month ago if
nobody listed them since.
"""

from __future__ import annotations

import sqlite3

CHUNK = 2000


def used_bytes(db: sqlite3.Connection) -> int:
    """Bytes the rows take (the file less its free pages)."""
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def _delete_requests_through(db: sqlite3.Connection, last_id: int) -> int:
    """Requests (and their exchanges) with id <= `last_id`, in chunks; how many went."""
    deleted = 0
    while True:
        db.execute("BEGIN IMMEDIATE")
        try:
            ids = [row[0] for row in db.execute("SELECT id FROM requests WHERE id <= ? ORDER BY id LIMIT ?",
                                                (last_id, CHUNK))]
            if ids:
                db.execute("DELETE FROM exchanges WHERE id BETWEEN ? AND ?", (ids[0], ids[-1]))
                db.execute("DELETE FROM requests WHERE id BETWEEN ? AND ?", (ids[0], ids[-1]))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        deleted += len(ids)
        if len(ids) < CHUNK:
            return deleted


def prune(db: sqlite3.Connection, *, now: float, retain: float, max_size: int, keep_run: int | None = None) -> int:
    """Delete what is older than `retain` seconds, then the oldest requests while the rows take
    more than `max_size` bytes; the number of requests deleted.  `keep_run` (the running
    gateway's run) is never deleted."""
    cutoff = now - retain
    deleted = 0
    newest_old = db.execute("SELECT max(id) FROM requests WHERE started < ?", (cutoff,)).fetchone()[0]
    if newest_old is not None:
        deleted += _delete_requests_through(db, newest_old)
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("DELETE FROM sessions WHERE last_activity < ?", (cutoff,))
        db.execute("DELETE FROM tunnel_events WHERE ts < ?", (cutoff,))
        db.execute("DELETE FROM runs WHERE last_seen < ? AND id IS NOT ?", (cutoff, keep_run))
        db.execute("DELETE FROM listings WHERE last_seen < ? AND id NOT IN "
                   "(SELECT max(id) FROM listings GROUP BY method, cursor)", (cutoff,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    while used_bytes(db) > max_size:
        count = db.execute("SELECT count(*) FROM requests").fetchone()[0]
        if count == 0:
            break
        last = db.execute("SELECT id FROM requests ORDER BY id LIMIT 1 OFFSET ?", (max(1, count // 10) - 1,)
                          ).fetchone()[0]
        deleted += _delete_requests_through(db, last)
    if deleted:
        _vacuum(db)
    return deleted


def _vacuum(db: sqlite3.Connection) -> None:
    """Give the free pages back.  `incremental_vacuum` frees one page per step, and `execute` steps
    a statement without result columns once; `executescript` runs it to the end."""
    db.executescript("PRAGMA incremental_vacuum")
