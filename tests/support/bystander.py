"""The innocent party of every hostile test: another user's tunnel on the same relay.

`Bystander` registers its own `H2Gateway`, keeps an SSE stream open through
it, and measures the latency of small requests through it: once quietly
before the attack (the baseline) and again during or after it.  A hostile
test asserts `await bystander.unaffected()`: the SSE stream still delivers,
it was never reset, and the median latency stays within a bound of the
baseline measured in the same test on the same machine, never a fixed time.
"""

from __future__ import annotations

import statistics
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from tests.support.h2_gateway import H2Gateway, Stream
from tests.support.public import RawClient, raw

# How much slower than its quiet baseline the bystander may get while an offender is being dealt
# with: generous, since the relay shares two cores with the test and the offender.
SLOWDOWN = 5.0
FLOOR_S = 0.05


class Bystander:
    def __init__(self, port: int, domain: str, name: str = "bystander") -> None:
        self.port = port
        self.host = f"{name}.{domain}"
        self.gateway = H2Gateway(port, f"tok-{name}", name)
        self.baseline: float | None = None
        self._sse: RawClient | None = None
        self._sse_stream: Stream | None = None
        self._serving = False

    async def start(self, testcase) -> "Bystander":
        """Register, open the SSE stream, and measure the quiet baseline."""
        testcase.addCleanup(self.gateway.close)
        await self.gateway.connect()
        self._sse = await raw(self.port, (f"GET /events HTTP/1.1\r\nHost: {self.host}\r\n"
                                          "Accept: text/event-stream\r\n\r\n").encode())
        self._sse_stream = await self.gateway.requests.get()
        self.gateway.respond(self._sse_stream, 200, headers=[(b"content-type", b"text/event-stream")], end=False)
        self.gateway.send(self._sse_stream, b"data: hello\n\n")
        await self._sse.until(b"data: hello")
        self._serving = True
        Deferred.fromCoroutine(self._serve())
        testcase.addCleanup(self._stop)
        self.baseline = await self.median_latency()
        return self

    def _stop(self) -> None:
        self._serving = False
        if self._sse is not None and self._sse.transport is not None:
            self._sse.transport.loseConnection()

    async def _serve(self) -> None:
        """Answer every plain request on the bystander's tunnel at once."""
        while self._serving:
            stream = await self.gateway.requests.get()
            if stream is None:
                return
            self.gateway.respond(stream, 200, b"ok", headers=[(b"content-length", b"2")])

    async def request(self) -> float:
        """Seconds for one small GET through the bystander's tunnel (new connection each time)."""
        started = time.monotonic()
        client = await raw(self.port, f"GET /ping HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n"
                           .encode())
        response = await client.closed
        elapsed = time.monotonic() - started
        if not response.startswith(b"HTTP/1.1 200") or not response.endswith(b"ok"):
            raise AssertionError(f"bystander request failed: {response[:200]!r}")
        return elapsed

    async def median_latency(self, n: int = 15) -> float:
        return statistics.median([await self.request() for _ in range(n)])

    async def unaffected(self) -> None:
        """The bystander's SSE stream still delivers and its requests are not much slower."""
        assert self._sse is not None and self._sse_stream is not None and self.baseline is not None
        if self._sse_stream.reset.called or self._sse.closed.called:
            raise AssertionError("the bystander's SSE stream was cut")
        marker = b"data: still-here-%d\n\n" % int(reactor.seconds() * 1000)
        self.gateway.send(self._sse_stream, marker)
        received = await self._sse.until(marker)
        if marker not in received:
            raise AssertionError("the bystander's SSE stream stopped delivering")
        latency = await self.median_latency()
        bound = max(SLOWDOWN * self.baseline, self.baseline + FLOOR_S)
        if latency > bound:
            raise AssertionError(f"bystander median latency {latency * 1000:.1f} ms > bound {bound * 1000:.1f} ms "
                                 f"(baseline {self.baseline * 1000:.1f} ms)")
