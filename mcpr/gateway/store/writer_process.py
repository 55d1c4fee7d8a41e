"""The gateway's end of the store's writer process (`mcpr.gateway.store.worker`): calls sent as frames,
answered in order, as Deferreds.

The process is started with the store's service and again by the first call
after it died (a crash, or killed): the calls it had not answered fail with
`StoreError`, so the batch they carried is dropped and counted as any batch
the disk refused, and the next batch goes to a new process.  What it says on
stderr is logged, a line at a time.
"""

from __future__ import annotations

import marshal
import os
import sys
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcpr.gateway.store.schema import StoreError, open_store
from mcpr.gateway.store.worker import FRAME
from mcpr.gateway.store.writer import Batch, StoreWriter, Written

log = Logger()

# What a line on the process's stderr may hold before it is logged as it is.
MAX_ERROR_LINE = 4096


class _Pipe(ProcessProtocol):
    """One run of the process: frames in, answers matched to their calls by number."""

    def __init__(self, owner: WriterProcess) -> None:
        self.owner = owner
        self.buffer = bytearray()
        self.errors = bytearray()
        self.ended: Deferred[None] = Deferred()
        self.pending: deque[tuple[int, Deferred[Any]]] = deque()
        self.transport: IProcessTransport | None = None

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= FRAME.size:
            (size,) = FRAME.unpack_from(self.buffer)
            if len(self.buffer) < FRAME.size + size:
                return
            seq, ok, value = marshal.loads(bytes(self.buffer[FRAME.size:FRAME.size + size]))
            del self.buffer[:FRAME.size + size]
            expected, d = self.pending.popleft()
            assert seq == expected, (seq, expected)
            if ok:
                d.callback(value)
            else:
                d.errback(StoreError(value))

    def errReceived(self, data: bytes) -> None:
        self.errors += data
        *lines, rest = self.errors.split(b"\n")
        self.errors = bytearray(rest[-MAX_ERROR_LINE:])
        for line in lines:
            self.owner.said(line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        if self.errors:
            self.owner.said(self.errors.decode("utf-8", "replace"))
        self.owner.ended(self, reason)
        why = StoreError(f"the store's writer process stopped ({reason.value})")
        while self.pending:
            self.pending.popleft()[1].errback(why)
        self.ended.callback(None)


class WriterProcess:
    """`EventStore`'s writer: each call a Deferred of what `StoreWriter`'s method of the same name
    returns in the process."""

    def __init__(self, reactor: Any, path: str, run_id: int, *, argv: list[str] | None = None) -> None:
        self.reactor = reactor
        self.path = path
        self.run_id = run_id
        self.argv = argv or [sys.executable, "-m", "mcpr.gateway.store.worker"]
        self._pipe: _Pipe | None = None
        self._seq = 0
        self.starts = 0

    @property
    def pid(self) -> int | None:
        pipe = self._pipe
        return pipe.transport.pid if pipe is not None and pipe.transport is not None else None

    def start(self) -> None:
        """Start the process, if it is not running."""
        if self._pipe is not None:
            return
        self._pipe = pipe = _Pipe(self)
        self.starts += 1
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.reactor.spawnProcess(pipe, self.argv[0], [*self.argv, self.path, str(self.run_id)], env=env,
                                  childFDs={0: "w", 1: "r", 2: "r"})

    def _call(self, op: str, *args: Any) -> Deferred[Any]:
        self.start()
        pipe = self._pipe
        assert pipe is not None and pipe.transport is not None
        self._seq += 1
        d: Deferred[Any] = Deferred()
        pipe.pending.append((self._seq, d))
        data = marshal.dumps((self._seq, op, args))
        pipe.transport.write(FRAME.pack(len(data)) + data)
        return d

    def commit(self, batch: Batch, now: float, dropped: int, rows: bool) -> Deferred[Written]:
        d = self._call("commit", batch.count, batch.packed, batch.sessions, batch.tunnel, now, dropped, rows)
        return d.addCallback(lambda value: Written(*value))

    def heartbeat(self, now: float, dropped: int) -> Deferred[None]:
        return self._call("heartbeat", now, dropped)

    def prune(self, now: float, retain: float, max_size: int) -> Deferred[int]:
        return self._call("prune", now, retain, max_size)

    async def close(self, now: float, dropped: int) -> None:
        """Close the run, then let the process end (one is started for it if the last one died)."""
        self.start()
        pipe = self._pipe
        assert pipe is not None
        try:
            await self._call("close", now, dropped)
        finally:
            if pipe.transport is not None and self._pipe is pipe:
                pipe.transport.closeStdin()
            await pipe.ended

    def close_unstarted(self, batch: Batch | None, now: float, dropped: int) -> None:
        """What the store must still write when the reactor never ran (a gateway whose start failed
        further on): written here, at once, as `EventStore.open` made the run."""
        writer = StoreWriter.attach(open_store(self.path), self.run_id)
        if batch is not None and batch.count:
            writer.commit(batch, now, dropped)
        writer.close(now, dropped)

    # -- told by the pipe

    def said(self, line: str) -> None:
        if line.strip():
            log.error("store: the writer process says: {line}", line=line.strip())

    def ended(self, pipe: _Pipe, reason: Failure) -> None:
        if self._pipe is pipe:
            self._pipe = None
        if not reason.check(ProcessDone):
            log.error("store: the writer process {pid} stopped ({why}); the next batch starts another",
                      pid=pipe.transport.pid if pipe.transport is not None else "?", why=str(reason.value))
