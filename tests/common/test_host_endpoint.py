"""HostEndpoint: an IP literal connected to straight, a host name resolved once in a while."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mcpr.common import host_endpoint
from mcpr.common.host_endpoint import HostEndpoint


@implementer(IHostResolution)
class Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        raise AssertionError("the resolution is over before anyone could cancel it")


@implementer(IHostnameResolver)
class Resolver:
    """Resolves every name to `address`, counting the names asked."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.asked.append(hostName)
        receiver.resolutionBegan(Resolution(hostName))
        receiver.addressResolved(IPv4Address("TCP", self.address, portNumber))
        receiver.resolutionComplete()
        return receiver


class HostEndpointTests(SynchronousTestCase):
    """Which address a connect goes to, and when a name is resolved, on a MemoryReactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = Resolver("10.0.0.5")
        self.reactor.nameResolver = self.resolver

    def connect(self, endpoint: HostEndpoint) -> Deferred:
        connecting = endpoint.connect(Factory.forProtocol(Protocol))
        self.reactor.advance(0)  # HostnameEndpoint starts its first attempt on the next turn
        return connecting

    def accept(self) -> None:
        """The latest connect attempt succeeds."""
        self.accept_at(-1)

    def accept_at(self, index: int) -> None:
        """The connect attempt at `index` succeeds."""
        host, port, factory = self.reactor.tcpClients[index][:3]
        peer = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
        factory.buildProtocol(peer).makeConnection(StringTransport(peerAddress=peer))

    def refuse(self) -> None:
        """The latest connect attempt fails."""
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))

    def test_an_ip_literal_is_connected_to_straight(self) -> None:
        for host in ("127.0.0.1", "::1"):
            connecting = self.connect(HostEndpoint(self.reactor, host, 9000, timeout=5))
            self.assertEqual(self.reactor.tcpClients[-1][:2], (host, 9000))
            self.accept()
            self.successResultOf(connecting)
        self.assertEqual(self.resolver.asked, [])

    def test_a_name_is_resolved_once_then_its_address_is_used_for_a_while(self) -> None:
        endpoint = HostEndpoint(self.reactor, "upstream.test", 9000, timeout=5)
        for _ in range(3):
            connecting = self.connect(endpoint)
            self.assertEqual(self.reactor.tcpClients[-1][:2], ("10.0.0.5", 9000))
            self.accept()
            self.successResultOf(connecting)
        self.assertEqual(self.resolver.asked, ["upstream.test"])
        self.reactor.advance(host_endpoint.REMEMBER)
        self.resolver.address = "10.0.0.6"  # the name moved
        self.connect(endpoint)
        self.accept()
        self.assertEqual(self.resolver.asked, ["upstream.test"] * 2)
        self.assertEqual(self.reactor.tcpClients[-1][0], "10.0.0.6")

    def test_a_remembered_address_that_fails_is_forgotten_and_the_name_resolved_again(self) -> None:
        endpoint = HostEndpoint(self.reactor, "upstream.test", 9000, timeout=5)
        self.connect(endpoint)
        self.accept()
        self.resolver.address = "10.0.0.6"
        connecting = self.connect(endpoint)
        self.refuse()  # 10.0.0.5 is gone
        self.reactor.advance(0)
        self.assertEqual(self.reactor.tcpClients[-1][0], "10.0.0.6")
        self.accept()
        self.successResultOf(connecting)
        self.assertEqual(self.resolver.asked, ["upstream.test"] * 2)

    def test_a_literal_that_fails_fails(self) -> None:
        connecting = self.connect(HostEndpoint(self.reactor, "127.0.0.1", 9000, timeout=5))
        self.refuse()
        self.failureResultOf(connecting, ConnectionRefusedError)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_connects_during_the_first_resolution_wait_for_its_address(self) -> None:
        endpoint = HostEndpoint(self.reactor, "upstream.test", 9000, timeout=5)
        first = self.connect(endpoint)
        waiting = [self.connect(endpoint) for _ in range(3)]
        self.assertEqual(len(self.reactor.tcpClients), 1, "the others wait instead of resolving")
        self.accept()
        self.successResultOf(first)
        self.assertEqual([c[:2] for c in self.reactor.tcpClients[1:]], [("10.0.0.5", 9000)] * 3)
        for index, connecting in enumerate(waiting, 1):
            self.accept_at(index)
            self.successResultOf(connecting)
        self.assertEqual(self.resolver.asked, ["upstream.test"])

    def test_a_first_resolution_that_fails_fails_its_waiters(self) -> None:
        endpoint = HostEndpoint(self.reactor, "upstream.test", 9000, timeout=5)
        first, second = self.connect(endpoint), self.connect(endpoint)
        self.refuse()
        self.reactor.advance(1)  # HostnameEndpoint reports the failure of its last address after its delay
        self.failureResultOf(first, ConnectionRefusedError)
        self.failureResultOf(second, ConnectionRefusedError)
        self.assertEqual(self.resolver.asked, ["upstream.test"])

    def test_a_waiter_cancelled_leaves_the_others(self) -> None:
        endpoint = HostEndpoint(self.reactor, "upstream.test", 9000, timeout=5)
        first, cancelled, kept = self.connect(endpoint), self.connect(endpoint), self.connect(endpoint)
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.accept()
        self.successResultOf(first)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.accept()
        self.successResultOf(kept)

    def refresh(self) -> tuple[HostEndpoint, Deferred]:
        """An endpoint that reached 10.0.0.5, then, `REMEMBER` later, the connect that resolves
        the name again (now 10.0.0.6), its attempt pending."""
        endpoint = HostEndpoint(self.reactor, "upstream.test", 9000, timeout=5)
        self.connect(endpoint)
        self.accept()
        self.reactor.advance(host_endpoint.REMEMBER)
        self.resolver.address = "10.0.0.6"
        return endpoint, self.connect(endpoint)

    def test_after_a_while_one_connect_resolves_and_the_others_keep_the_known_address(self) -> None:
        endpoint, refreshing = self.refresh()
        self.assertEqual(self.reactor.tcpClients[-1][0], "10.0.0.6")
        meanwhile = self.connect(endpoint)
        self.assertEqual(self.reactor.tcpClients[-1][0], "10.0.0.5")
        self.accept()
        self.successResultOf(meanwhile)
        self.accept_at(-2)
        self.successResultOf(refreshing)
        self.connect(endpoint)
        self.assertEqual(self.reactor.tcpClients[-1][0], "10.0.0.6")
        self.assertEqual(self.resolver.asked, ["upstream.test"] * 2)

    def test_a_refresh_that_fails_falls_back_to_the_known_address(self) -> None:
        endpoint, refreshing = self.refresh()
        self.refuse()  # the new address refuses
        self.reactor.advance(1)
        self.assertEqual(self.reactor.tcpClients[-1][0], "10.0.0.5")
        self.accept()
        self.successResultOf(refreshing)
        self.connect(endpoint)  # kept a while longer: no resolution for this one
        self.assertEqual(self.reactor.tcpClients[-1][0], "10.0.0.5")
        self.assertEqual(self.resolver.asked, ["upstream.test"] * 2)
