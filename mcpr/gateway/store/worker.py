"""The store's writer process: `python -m mcpr.gateway.store.worker PATH RUN_ID`, the gateway's child.

It owns the store's write connection and answers the gateway's calls in
order (`StoreWriter.commit`, `heartbeat`, `prune`, `close`): each call and
each answer one `marshal`led frame, its length first, on its stdin and
stdout.  What it cannot do it answers with one line, and goes on.

Why a process and not a thread: with the writer a thread of the gateway,
the gateway's reactor thread paid more for it than the writer did itself.
The writer takes the GIL back after every SQLite statement and holds it to
make rows, so the reactor was made to wait, switched out and back, with its
caches cold, hundreds of times a second; and the rows shared its allocator.
In a process of its own the writer costs the CPU it uses and no more
(bench/store_cost.py counts the gateway's CPU with this child's;
docs/PERFORMANCE.md, "Event store").

It stops when its stdin closes, after the call it is on.  Ctrl-C in a
terminal and systemd's SIGTERM reach every process of the group: this one
ignores them, so that the gateway can still hand it its last batch and
close the run.
"""

from __future__ import annotations

import marshal
import signal
import sqlite3
import struct
import sys
from typing import Any, BinaryIO, Callable, cast

from mcpr.gateway.store.schema import open_store
from mcpr.gateway.store.writer import Batch, StoreWriter

FRAME = struct.Struct(">I")


def write_frame(out: BinaryIO, value: Any) -> None:
    data = marshal.dumps(value)
    out.write(FRAME.pack(len(data)) + data)
    out.flush()


def _commit(writer: StoreWriter, count: int, packed: list[bytes], sessions: list[tuple[Any, ...]],
            tunnel: list[tuple[Any, ...]], now: float, dropped: int, rows: bool) -> tuple[Any, ...]:
    batch = Batch(writer.run_id, count, packed, sessions, tunnel)
    w = writer.commit(batch, now, dropped, rows=rows)
    return (w.count, w.first, w.rows, w.skipped, w.why)


OPS: dict[str, Callable[..., Any]] = {
    "commit": _commit,
    "heartbeat": StoreWriter.heartbeat,
    "prune": StoreWriter.prune,
    "close": StoreWriter.close,
}


def serve(writer: StoreWriter, inp: BinaryIO, out: BinaryIO) -> None:
    """Answer calls until stdin ends or the run is closed."""
    while True:
        head = inp.read(FRAME.size)
        if len(head) < FRAME.size:
            return
        (size,) = FRAME.unpack(head)
        seq, op, args = marshal.loads(inp.read(size))
        try:
            write_frame(out, (seq, True, OPS[op](writer, *args)))
        except Exception as e:
            write_frame(out, (seq, False, f"{type(e).__name__}: {e}"))
        if op == "close":
            return


def main(argv: list[str] | None = None) -> int:
    path, run_id = (argv if argv is not None else sys.argv[1:])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The sqlite3 module binds int, float, str and bytearray at once, but for None first looks for an
    # adapter, and raises and clears an AttributeError when there is none: a row's ten or so Nones cost
    # more than the rest of its binding (10 Nones: 5.9 us a statement, 2.0 with this). An adapter
    # found in the registry returns None, which is bound as NULL. The registry is this process's own.
    sqlite3.register_adapter(type(None), cast("Callable[[None], None]", {}.get))
    try:
        writer = StoreWriter.attach(open_store(path), int(run_id))
    except Exception as e:
        print(f"cannot open the event store {path}: {e}", file=sys.stderr)
        return 1
    serve(writer, sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
