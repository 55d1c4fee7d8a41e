"""The registration socket's own rules, in memory: the rate limit per address, what an address is,
and what a hang-up during authentication cancels (D11)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.web import TrustedProxies
from mcpr.relay.auth import Grant
from mcpr.relay.registration import (
    Admission,
    RegistrationFactory,
    RegistrationProtocol,
    RegistrationRate,
    address_key,
)
from mcpr.relay.registry import Registry


class RateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.rate = RegistrationRate(self.clock, per_minute=60, burst=3)

    def test_a_burst_then_the_rate(self) -> None:
        self.assertEqual([self.rate.admit("a") for _ in range(5)],
                         [Admission.OK] * 3 + [Admission.REFUSED, Admission.REFUSED_AGAIN])
        self.assertEqual(self.rate.admit("b"), Admission.OK, "each address has its own bucket")
        self.clock.advance(1)
        self.assertEqual([self.rate.admit("a") for _ in range(2)], [Admission.OK, Admission.REFUSED])
        self.clock.advance(3600)
        self.assertEqual([self.rate.admit("a") for _ in range(4)], [Admission.OK] * 3 + [Admission.REFUSED],
                         "the bucket holds at most the burst")

    def test_memory_is_bounded(self) -> None:
        rate = RegistrationRate(self.clock, per_minute=60, burst=3, max_addresses=100)
        for n in range(1000):
            rate.admit(f"10.0.{n // 256}.{n % 256}")
        self.assertEqual(len(rate), 100)
        self.clock.advance(3)  # every bucket is full again: they mean nothing any more
        rate.admit("192.0.2.1")
        self.assertEqual(len(rate), 1)


class AddressTests(SynchronousTestCase):
    def test_keys(self) -> None:
        self.assertEqual(address_key(IPv4Address("TCP", "192.0.2.7", 4000)), "192.0.2.7")
        self.assertEqual(address_key(IPv6Address("TCP", "2001:db8:1:2:3:4:5:6", 4000)), "2001:db8:1:2::/64")
        self.assertEqual(address_key(IPv6Address("TCP", "2001:db8:1:2::ffff", 4000)), "2001:db8:1:2::/64")
        self.assertEqual(address_key(IPv6Address("TCP", "::ffff:192.0.2.7", 4000)), "192.0.2.7")
        self.assertEqual(address_key(IPv6Address("TCP", "fe80::1%lo", 4000)), "fe80::/64")
        self.assertEqual(address_key(UNIXAddress(b"/run/relay.sock")), "local")


class _SlowAuth:
    """An authenticator whose answer never comes; it records whether its call was cancelled."""

    def __init__(self) -> None:
        self.cancelled = False
        self.calls = 0

    async def authenticate(self, token: str, subdomain: str | None = None) -> Grant:
        self.calls += 1
        try:
            await Deferred()
        except CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


class HangUpTests(SynchronousTestCase):
    def test_closing_during_authentication_cancels_it(self) -> None:
        errors: list[dict] = []

        def observe(event: dict) -> None:
            if event["log_level"] >= LogLevel.error:
                errors.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        clock = Clock()
        auth = _SlowAuth()
        factory = RegistrationFactory(
            clock, Registry(clock, max_per_owner=8, max_per_peer=8, max_tunnels=8, grace=60, max_reservations=8),
            auth, SimpleNamespace(), rate=RegistrationRate(clock, per_minute=60, burst=3),
            public_url="https://*.tunnel.test", registration_timeout=10, max_message_size=1 << 20,
            ping_interval=20, ping_timeout=10)
        protocol: RegistrationProtocol = factory.buildProtocol(None)
        protocol.transport = StringTransport()
        protocol.onConnect(SimpleNamespace(peer="tcp4:192.168.1.1:54321", protocols=[], headers={}))
        protocol.onOpen()
        protocol.onMessage(json.dumps({"token": "tok", "subdomain": "a"}).encode(), False)
        self.assertEqual((auth.calls, auth.cancelled), (1, False))
        protocol.onClose(False, 1006, None)
        self.assertTrue(auth.cancelled)
        self.assertEqual(errors, [], "a cancelled registration is not a crash")
        self.assertEqual(clock.getDelayedCalls(), [], "the registration timer went with the socket")


class ForwardedAddressTests(SynchronousTestCase):
    """Behind a trusted front proxy, registrations count against the client the proxy names."""

    def test_a_trusted_proxy_names_the_client(self) -> None:
        proxy = IPv4Address("TCP", "127.0.0.1", 4000)
        trusted = TrustedProxies(["127.0.0.1"])
        self.assertEqual(address_key(proxy, "6.6.6.6, 192.0.2.9", trusted), "192.0.2.9")
        self.assertEqual(address_key(proxy, None, trusted), "127.0.0.1")

    def test_anyone_else_is_counted_by_its_socket(self) -> None:
        stranger = IPv4Address("TCP", "198.51.100.4", 4000)
        self.assertEqual(address_key(stranger, "192.0.2.9", TrustedProxies(["127.0.0.1"])), "198.51.100.4")
        self.assertEqual(address_key(stranger, "192.0.2.9", None), "198.51.100.4")


class OptionTests(SynchronousTestCase):
    """Autobahn's options reach every registration socket from a class made for its factory, so
    that no socket copies (nor formats, for a debug log) all of them when it opens."""

    def factory(self) -> RegistrationFactory:
        clock = Clock()
        return RegistrationFactory(
            clock, Registry(clock, max_per_owner=8, max_per_peer=8, max_tunnels=8, grace=60, max_reservations=8),
            _SlowAuth(), SimpleNamespace(), rate=RegistrationRate(clock, per_minute=60, burst=3),
            public_url="https://*.tunnel.test", registration_timeout=7, max_message_size=1 << 20,
            ping_interval=20, ping_timeout=10)

    def test_options_are_the_factorys_and_not_copied(self) -> None:
        factory = self.factory()
        protocol: RegistrationProtocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.assertIsInstance(protocol, RegistrationProtocol)
        self.assertEqual((protocol.autoPingInterval, protocol.openHandshakeTimeout, protocol.maxMessagePayloadSize),
                         (20, 7, 1 << 20))
        self.assertFalse(set(vars(protocol)) & set(RegistrationProtocol.CONFIG_ATTRS), "copied onto the socket")
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_options_set_later_reach_new_sockets(self) -> None:
        factory = self.factory()
        factory.setProtocolOptions(autoPingInterval=5)
        protocol: RegistrationProtocol = factory.buildProtocol(None)
        self.assertEqual((protocol.autoPingInterval, protocol.autoPingTimeout), (5, 10))
