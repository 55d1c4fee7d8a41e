"""Hostile gateways that flood their tunnel with frames that carry nothing (S5): HTTP/2 control frames,
legacy messages without data, WebSocket pings; with and without reading what the relay answers.

Each offender is closed (HTTP/2: GOAWAY ENHANCE_YOUR_CALM, then 1008), the relay's memory stays
bounded, and a bystander's tunnel is unaffected.
"""

from __future__ import annotations

from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.support.bystander import Bystander
from tests.support.h2_gateway import H2Gateway
from tests.support.legacy_gateway import LegacyGateway
from tests.support.processes import PeakRSS, start_relay
from tests.support.public import raw

DOMAIN = "tunnel.test"
MiB = 1 << 20
# Relay memory growth allowed while an offender is dealt with: its flood is far larger.
MEMORY_BOUND_MIB = 16


def within(d: Deferred, seconds: float = 10) -> Deferred:
    return d.addTimeout(seconds, reactor)


class FloodTestBase(TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.relay, self.port = start_relay(self, DOMAIN)
        self.bystander = await Bystander(self.port, DOMAIN).start(self)
        self.memory = PeakRSS(self.relay.popen.pid)
        self.addCleanup(self.memory.stop)

    async def offender(self, name: str) -> H2Gateway:
        gateway = H2Gateway(self.port, f"tok-{name}", name)
        self.addCleanup(gateway.close)
        await gateway.connect()
        return gateway

    async def open_stream(self, gateway: H2Gateway, path: str = "/open") -> object:
        """A public request into the offender's tunnel, as the gateway sees it."""
        await raw(self.port, f"GET {path} HTTP/1.1\r\nHost: {gateway.subdomain}.{DOMAIN}\r\n\r\n".encode())
        return await gateway.requests.get()

    def flood(self, gateway: H2Gateway, frame: bytes, count: int) -> None:
        """`count` copies of `frame`, in messages of about 1 MiB."""
        per_message = max(1, MiB // len(frame))
        while count > 0 and gateway.proto.state == gateway.proto.STATE_OPEN:
            n = min(count, per_message)
            gateway.send_raw(frame * n)
            count -= n

    async def assert_calmed(self, gateway: H2Gateway) -> None:
        code, reason = await within(gateway.closed)
        self.assertEqual((code, reason), (1008, "flood of HTTP/2 control frames"))
        self.assertEqual([t.error_code for t in gateway.terminated], [ErrorCodes.ENHANCE_YOUR_CALM])

    async def assert_bounded(self) -> None:
        growth = self.memory.stop()
        self.assertLess(growth, MEMORY_BOUND_MIB, f"relay memory grew {growth} MiB")
        await self.bystander.unaffected()


class H2FloodTests(FloodTestBase):
    async def test_ping_flood_without_reading(self) -> None:
        """200,000 PINGs (each would be acknowledged) from a gateway that reads nothing."""
        offender = await self.offender("pinger")
        offender.proto.transport.pauseProducing()
        self.flood(offender, PingFrame(0, opaque_data=b"12345678").serialize(), 200_000)
        offender.proto.transport.resumeProducing()
        await self.assert_calmed(offender)
        await self.assert_bounded()

    async def test_settings_flood_without_reading(self) -> None:
        offender = await self.offender("settler")
        offender.proto.transport.pauseProducing()
        self.flood(offender, SettingsFrame(0, settings={0x4: 1 << 20}).serialize(), 200_000)
        offender.proto.transport.resumeProducing()
        await self.assert_calmed(offender)
        await self.assert_bounded()

    async def test_other_control_frames(self) -> None:
        """Empty DATA, WINDOW_UPDATE, PRIORITY, RST_STREAM for finished streams, HEADERS for them,
        CONTINUATION fragments, frames of unknown types: each flood closes its gateway."""
        async def empty_data(gw: H2Gateway) -> bytes:
            stream = await self.open_stream(gw)
            gw.respond(stream, 200, end=False)
            return DataFrame(stream.id, data=b"").serialize()

        async def finished(gw: H2Gateway) -> int:
            stream = await self.open_stream(gw)
            gw.respond(stream, 204)
            return stream.id

        async def window_update(gw: H2Gateway) -> bytes:
            return WindowUpdateFrame(0, window_increment=1).serialize()

        async def priority(gw: H2Gateway) -> bytes:
            return PriorityFrame(await finished(gw), depends_on=0, stream_weight=16).serialize()

        async def rst_stream(gw: H2Gateway) -> bytes:
            return RstStreamFrame(await finished(gw), error_code=0).serialize()

        async def headers(gw: H2Gateway) -> bytes:
            return HeadersFrame(await finished(gw), data=b"\x88", flags=["END_HEADERS"]).serialize()

        async def continuation(gw: H2Gateway) -> bytes:
            stream = await self.open_stream(gw)
            gw.send_raw(HeadersFrame(stream.id, data=b"").serialize())  # no END_HEADERS
            return ContinuationFrame(stream.id, data=b"").serialize()

        async def unknown(gw: H2Gateway) -> bytes:
            return b"\x00\x00\x01\x42\x00\x00\x00\x00\x00z"

        for name, make in [("empty-data", empty_data), ("window-update", window_update), ("priority", priority),
                           ("rst-stream", rst_stream), ("headers", headers), ("continuation", continuation),
                           ("unknown", unknown)]:
            offender = await self.offender(name)
            self.flood(offender, await make(offender), 50_000)
            code, reason = await within(offender.closed)
            if name == "continuation":  # h2 itself refuses a 65th fragment: a protocol error
                self.assertEqual(code, 1008, name)
            else:
                self.assertEqual((code, reason), (1008, "flood of HTTP/2 control frames"), name)
        await self.assert_bounded()


class PingFloodTests(FloodTestBase):
    async def test_websocket_ping_flood(self) -> None:
        """Autobahn would pong each one: pings draw on the socket's control budget."""
        offender = await self.offender("wsping")
        for i in range(5000):
            if offender.proto.state != offender.proto.STATE_OPEN:
                break
            offender.proto.sendPing(b"%d" % i)
        code, reason = await within(offender.closed)
        self.assertEqual((code, reason), (1008, "ping flood"))
        await self.assert_bounded()

    async def test_websocket_ping_flood_before_registering(self) -> None:
        offender = LegacyGateway(self.port, None, hello=False)
        self.addCleanup(offender.close)
        Deferred.fromCoroutine(offender.connect()).addErrback(lambda _: None)
        while offender.proto is None:
            await within(_tick())
        for i in range(5000):
            if offender.proto.state != offender.proto.STATE_OPEN:
                break
            offender.proto.sendPing(b"%d" % i)
        code, reason = await within(offender.closed)
        self.assertEqual((code, reason), (1008, "ping flood"))
        await self.assert_bounded()


class LegacyFloodTests(FloodTestBase):
    async def test_empty_chunks(self) -> None:
        offender = LegacyGateway(self.port, "tok-oldflood", "oldflood")
        self.addCleanup(offender.close)
        await offender.connect()
        client = await raw(self.port, f"GET /x HTTP/1.1\r\nHost: oldflood.{DOMAIN}\r\n\r\n".encode())
        request = await offender.requests.get()
        offender.head(request)
        for _ in range(5000):
            if offender.proto.state != offender.proto.STATE_OPEN:
                break
            offender.send({"kind": "response_chunk", "id": request["id"], "data": None, "last": False})
        code, reason = await within(offender.closed)
        self.assertEqual((code, reason), (1008, "protocol violation: flood of messages without data"))
        await within(client.closed)
        await self.assert_bounded()


def _tick() -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d
