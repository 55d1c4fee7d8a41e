"""A disk that cannot keep up slows no request: the gateway whose store's writer process is stopped
(SIGSTOP: a commit that never ends) answers as fast as without a store, and counts what it could not
write."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import statistics
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mcpr.gateway.settings import load_gateway
from mcpr.gateway.store.recorder import EventStore
from mcpr.gateway.store.writer import RunInfo
from mcpr.gateway.tap import build_resource, build_site
from tests.proxy.test_resource import FakeUpstream
from tests.support.loopback import TrackingSite, client_agent, listen, track

def resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # ended already: the store was stopped
        pass


class SlowDiskTests(TestCase):
    timeout = 60

    async def gateway(self, up_port: int, *, store: bool) -> tuple[int, EventStore | None]:
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir(parents=True)
        cli = {"mcp": f"http://127.0.0.1:{up_port}/mcp", "store_path": str(cwd / "store.sqlite3")}
        settings = load_gateway(cli if store else {**cli, "no_store": True}, env={}, cwd=cwd)
        events = None
        if store:
            assert settings.store is not None
            events = EventStore.open(settings.store, RunInfo("t", settings.mcp, settings.listen), reactor,
                                     max_queue=5)
            events.startService()
            self.addCleanup(lambda: events.stopService() if events.running else None)
        resource = build_resource(settings, reactor, events)
        self.addCleanup(resource.forwarder.close)
        return await listen(self, track(build_site(resource, settings))), events

    async def timed_calls(self, port: int, count: int) -> list[float]:
        agent = client_agent(self)
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "add"}}).encode()
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            response = await agent.request(b"POST", f"http://127.0.0.1:{port}/mcp".encode(),
                                           Headers({b"content-type": [b"application/json"]}),
                                           FileBodyProducer(io.BytesIO(body)))
            await readBody(response)
            latencies.append(time.perf_counter() - start)
        return latencies

    async def test_requests_are_not_slowed_and_drops_are_counted(self) -> None:
        up_port = await listen(self, TrackingSite(FakeUpstream()))
        plain, _ = await self.gateway(up_port, store=False)
        stored, store = await self.gateway(up_port, store=True)
        assert store is not None
        await deferLater(reactor, 0.2)  # the writer process starts with the reactor's first turn
        pid = store._writer.pid  # type: ignore[attr-defined]
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(resume, pid)
        without = await self.timed_calls(plain, 40)
        with_store = await self.timed_calls(stored, 40)
        with open(f"/proc/{pid}/stat") as stat:
            self.assertEqual(stat.read().rsplit(")", 1)[1].split()[0], "T", "the writer stayed stopped")
        resume(pid)

        self.assertLess(max(with_store), 0.25, f"a request waited for the disk: {max(with_store):.3f} s")
        self.assertLess(statistics.median(with_store), statistics.median(without) + 0.02,
                        (statistics.median(with_store), statistics.median(without)))
        self.assertGreater(store.dropped, 0, "40 requests while the writer was stopped: the queue of 5 overflowed")

        agent = client_agent(self)
        health = json.loads(await readBody(await agent.request(b"GET", f"http://127.0.0.1:{stored}/healthz".encode())))
        self.assertEqual(health["store"]["dropped"], store.dropped)

        await store.stopService()
        db = sqlite3.connect(store.settings.path)
        self.addCleanup(db.close)
        written = db.execute("SELECT count(*) FROM requests WHERE path = '/mcp'").fetchone()[0]
        self.assertEqual(written + store.dropped, 40, "every request is either stored or counted as dropped")
        self.assertEqual(db.execute("SELECT dropped FROM runs").fetchone()[0], store.dropped)
