"""The relay's lifecycle in memory, on a Clock: draining on stop, revoking tokens on reload."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.settings import ConfigError
from mcpr.relay.identity import owner_id
from mcpr.relay.service import CLOSE_GRACE
from mcpr.relay.settings import RelaySettings
from tests.support.memory_relay import DOMAIN, MemoryRelay, relay_settings

GOING_AWAY = (1001, "relay shutting down")


class DrainTests(SynchronousTestCase):
    """RelayService.stopService: in-flight requests drain, then the tunnels close."""

    def setUp(self) -> None:
        self.relay = MemoryRelay(relay_settings(self, drain_timeout="10"))
        self.relay.service.startService()
        self.tunnel = self.relay.tunnel("a")

    def test_in_flight_requests_finish_then_tunnels_close(self) -> None:
        first = self.relay.request(f"a.{DOMAIN}", "/first")
        [stream] = self.tunnel.streams

        stopping = self.relay.service.stopService()
        self.relay.clock.advance(9)

        self.assertNoResult(stopping)
        self.assertEqual(self.tunnel.closes, [])
        self.assertEqual(self.relay.front.health()["status"], "draining")
        late = self.relay.request(f"a.{DOMAIN}", "/late")  # an open connection may still ask
        [_, late_stream] = self.tunnel.streams
        stream.respond(200, b"first done")
        self.relay.clock.advance(0)
        self.assertEqual(self.tunnel.closes, [], "closed while a request was still in flight")

        late_stream.respond(200, b"late done")
        self.assertEqual(self.tunnel.closes, [], "closed from inside the last response's callbacks")
        self.relay.clock.advance(0)

        self.assertEqual(self.tunnel.closes, [GOING_AWAY])
        self.assertTrue(first.value().endswith(b"first done\r\n0\r\n\r\n"))
        self.assertIn(b"Connection: close", late.value())
        self.assertTrue(late.value().endswith(b"late done\r\n0\r\n\r\n"))
        self.assertNoResult(stopping)
        self.relay.clock.advance(CLOSE_GRACE)
        self.assertIsNone(self.successResultOf(stopping))

    def test_drain_timeout_closes_tunnels_anyway(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.relay.request(f"a.{DOMAIN}", "/never")

        stopping = self.relay.service.stopService()
        self.relay.clock.advance(9.9)
        self.assertEqual(self.tunnel.closes, [])
        self.relay.clock.advance(0.1)

        self.assertEqual(self.tunnel.closes, [GOING_AWAY])
        warnings = [event for event in events if event["log_level"] == LogLevel.warn]
        self.assertEqual([event["n"] for event in warnings], [1])
        self.relay.clock.advance(CLOSE_GRACE)
        self.successResultOf(stopping)

    def test_nothing_in_flight(self) -> None:
        stopping = self.relay.service.stopService()
        self.assertEqual(self.tunnel.closes, [GOING_AWAY])
        self.relay.clock.advance(CLOSE_GRACE)
        self.successResultOf(stopping)


class ReloadTests(SynchronousTestCase):
    """RelayService.reload: revoked static tokens lose their tunnels; a broken file changes nothing."""

    def test_revoked_tokens_close_their_tunnels(self) -> None:
        running = relay_settings(self, "keep:a", "drop:b")
        fresh = relay_settings(self, "keep:a")
        relay = MemoryRelay(running, read=lambda: fresh)
        keep, drop = relay.tunnel("a", owner_id("keep")), relay.tunnel("b", owner_id("drop"))

        self.successResultOf(Deferred.fromCoroutine(relay.service.reload()))

        self.assertEqual(drop.closes, [(4001, "token revoked")])
        self.assertEqual(keep.closes, [])
        self.assertEqual(relay.auth.static_owners(), {owner_id("keep")})

    def test_a_broken_file_keeps_the_tokens(self) -> None:
        def broken() -> RelaySettings:
            raise ConfigError("relay.toml: key 'relay.tokens': broken")

        relay = MemoryRelay(relay_settings(self, "keep:a"), read=broken)
        keep = relay.tunnel("a", owner_id("keep"))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        self.successResultOf(Deferred.fromCoroutine(relay.service.reload()))

        self.assertEqual(keep.closes, [])
        self.assertEqual(relay.auth.static_owners(), {owner_id("keep")})
        self.assertEqual([event["why"] for event in events if event["log_level"] == LogLevel.error],
                         ["relay.toml: key 'relay.tokens': broken"])
