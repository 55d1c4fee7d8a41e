"""The relay's TLS: SNI over a directory of PEM files, with reloads, on real loopback handshakes.

The clients verify the certificate for the name they ask for against our own
test root, so "served correctly" means what a browser would mean by it.  The
servers' chains go root -> intermediate -> leaf, and the files include the
root, which Twisted 26.10's own `tls:` endpoint loops on for ever.  The
servers are built from endpoint strings, through the `sni:` parser plugin.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL.SSL import Connection
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from mcpr.common.web import CappedSite
from mcpr.relay.tls import (
    CertificateDirectoryError,
    CertificateStore,
    CertificateWatcher,
    SNIServerEndpoint,
    listen_description,
)
from tests.support.certificates import CA, INTERMEDIATE, TRUST, cn, escape, full_chain, issue, leaf, pem, write

WILDCARD = "*.tunnel.example.test"
OTHER = "other.example.test"
BODY = b"hello over tls\n"


def served_serial(store: CertificateStore, name: str) -> int:
    context = store.lookup(name)
    assert context is not None
    certificate = Connection(context).get_certificate(as_cryptography=True)
    assert certificate is not None
    return certificate.serial_number


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return BODY


@implementer(IProtocolNegotiationFactory)
class Connections(WrappingFactory):
    """Wraps the site to know when the server side of every connection is gone: a TLS
    connection needs another reactor turn to close after the client's side did.  It passes on
    the protocols the site accepts, which Twisted's TLS offers by ALPN as the daemons'
    listeners (TLS directly around the site) do."""

    noisy = False

    def acceptableProtocols(self) -> list[bytes]:
        return list(self.wrappedFactory.acceptableProtocols())

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, protocol: Any) -> None:
        super().unregisterProtocol(protocol)
        if not self.protocols:
            idle, self._idle = self._idle, []
            for waiting in idle:
                waiting.callback(None)

    def whenIdle(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._idle.append(waiting)
        return waiting


@implementer(IHandshakeListener)
class Probe(Protocol):
    """A TLS client: `handshake` fires once the client has verified the served `certificate` (or
    fails with why not), `get()` does one keep-alive HTTP request, `closed` fires at
    connectionLost, which is when the reactor is clean again."""

    certificate: x509.Certificate

    def __init__(self) -> None:
        self.handshake: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self._response: Deferred[bytes] | None = None
        self._buffer = b""

    def handshakeCompleted(self) -> None:
        self.certificate = self.transport.getHandle().get_peer_certificate(as_cryptography=True)
        self.handshake.callback(None)

    def get(self) -> Deferred[bytes]:
        self._buffer = b""
        self._response = Deferred()
        self.transport.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        return self._response

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self._response is not None and self._buffer.endswith(BODY):
            response, self._response = self._response, None
            response.callback(self._buffer)

    def connectionLost(self, reason: Failure) -> None:
        if not self.handshake.called:
            self.handshake.errback(reason)
        self.closed.callback(None)


class Server:
    """An `sni:` listener on 127.0.0.1:0 serving `Hello`; the test's cleanup closes it and every
    connection, and waits until they are gone."""

    def __init__(self, testcase: TestCase, directory: Path, site: Site | None = None) -> None:
        self._testcase = testcase
        self._connections = Connections(site or Site(Hello()))
        self._endpoint = serverFromString(reactor, f"sni:{escape(directory)}:0:interface=127.0.0.1")
        assert isinstance(self._endpoint, SNIServerEndpoint)
        self.store = self._endpoint.store
        self.port = 0

    async def start(self) -> None:
        listening = await self._endpoint.listen(self._connections)
        self.port = listening.getHost().port

        async def close() -> None:
            await listening.stopListening()
            await self._connections.whenIdle()

        self._testcase.addCleanup(lambda: Deferred.fromCoroutine(close()))

    async def connect(self, name: str, **options: Any) -> Probe:
        """A TLS connection that verifies `name`; raises if the verification fails."""
        creator = optionsForClientTLS(name, trustRoot=TRUST, **options)
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))
        probe = await connectProtocol(endpoint, Probe())

        async def close() -> None:
            probe.transport.loseConnection()
            await probe.closed

        self._testcase.addCleanup(lambda: Deferred.fromCoroutine(close()))
        await probe.handshake
        return probe

    async def leaf(self, name: str) -> x509.Certificate:
        return (await self.connect(name)).certificate

    async def refused(self, name: str) -> Failure:
        """The client's verification failure for `name` (the server kept its default certificate)."""
        try:
            await self.connect(name)
        except VerificationError:
            return Failure()
        raise AssertionError(f"{name} was served a certificate that verifies")


class InlineThreads:
    """Stands in for the reactor's thread pool and callFromThread: the "thread" work runs at once,
    so a Clock alone drives the watcher, deterministically."""

    def getThreadPool(self) -> InlineThreads:
        return self

    def callInThreadWithCallback(self, onResult: Callable[[bool, Any], None],
                                 f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def certificate_directory(testcase: SynchronousTestCase) -> Path:
    """The wildcard in one file (key, leaf, intermediate and the root), OTHER as separate
    .crt/.key files.  The directory's name has a colon, to exercise endpoint-string escaping."""
    directory = Path(testcase.mktemp()) / "certs:v1"
    directory.mkdir(parents=True)
    write(directory, "tunnel.pem", full_chain(leaf(WILDCARD)))
    other = leaf(OTHER)
    write(directory, "other.crt", pem(other[1], INTERMEDIATE[1]))
    write(directory, "other.key", pem(other[0]))
    return directory


def add_awkward_files(directory: Path) -> None:
    """Files a real directory may hold beside the certificates, none of them servable."""
    write(directory, "root.pem", pem(CA[1]))
    write(directory, "intermediate.crt", pem(INTERMEDIATE[1], CA[1]))
    write(directory, "broken.pem", b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    write(directory, "empty.key", b"")


def logged(testcase: SynchronousTestCase) -> EventLoggingObserver:
    return EventLoggingObserver.createWithCleanup(testcase, globalLogPublisher)


def about(events: EventLoggingObserver, file: str) -> list[str]:
    """The problems logged about one file."""
    return [event["why"] for event in events if event.get("file") == file and "why" in event]


def san(certificate: x509.Certificate) -> list[str]:
    extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return extension.value.get_values_for_type(x509.DNSName)


class HandshakeTests(TestCase):
    """Real, verifying TLS clients against the endpoint on 127.0.0.1."""

    timeout = 5  # a handshake or reload that never completes fails the test

    async def test_two_names_in_one_run(self) -> None:
        server = Server(self, certificate_directory(self))
        await server.start()
        wildcard = await server.connect("abc.tunnel.example.test")
        self.assertEqual(san(wildcard.certificate), [WILDCARD])
        self.assertTrue((await wildcard.get()).endswith(BODY))
        sent = wildcard.transport.getHandle().get_peer_cert_chain(as_cryptography=True)
        self.assertEqual(sent, [wildcard.certificate, INTERMEDIATE[1]])  # no root
        self.assertEqual(san(await server.leaf(OTHER)), [OTHER])
        self.assertEqual(san(await server.leaf("xyz.TUNNEL.example.test")), [WILDCARD])
        self.assertEqual(server.store.names(), [WILDCARD, OTHER])

    async def test_alpn_never_offers_h2(self) -> None:
        """The tunnels are WebSockets, which HTTP/2 would break; also after the SNI switch.  With the
        relay's public site (a twisted.web Site says it accepts h2 when the h2 package is there)."""
        server = Server(self, certificate_directory(self), CappedSite(Hello(), max_request_body=1024))
        await server.start()
        for name in (OTHER, "abc.tunnel.example.test"):  # the default context, then a switched one
            probe = await server.connect(name, acceptableProtocols=[b"h2", b"http/1.1"])
            self.assertEqual(probe.transport.negotiatedProtocol, b"http/1.1")

    async def test_wildcard_covers_one_label_only(self) -> None:
        server = Server(self, certificate_directory(self))
        await server.start()
        for name in ("a.b.tunnel.example.test", "tunnel.example.test", "unknown.example.test"):
            failure = await server.refused(name)
            self.assertIn(name, str(failure.value))

    async def test_renewal(self) -> None:
        """A renewed certificate is served to new handshakes after reload(); an open connection
        keeps its certificate and keeps working."""
        directory = certificate_directory(self)
        server = Server(self, directory)
        await server.start()
        before = await server.connect("abc.tunnel.example.test")
        old = before.certificate
        renewed = leaf(WILDCARD, days=90)
        write(directory, "tunnel.pem", full_chain(renewed))

        self.assertTrue(await server.store.reload())

        self.assertEqual((await server.leaf("abc.tunnel.example.test")).serial_number,
                         renewed[1].serial_number)
        self.assertNotEqual(renewed[1].serial_number, old.serial_number)
        self.assertTrue((await before.get()).endswith(BODY))
        self.assertEqual(before.transport.getHandle().get_peer_certificate(as_cryptography=True), old)

    async def test_new_name_after_reload(self) -> None:
        directory = certificate_directory(self)
        server = Server(self, directory)
        await server.start()
        await server.refused("new.example.test")
        write(directory, "new.pem", full_chain(leaf("new.example.test")))

        self.assertTrue(await server.store.reload())

        self.assertEqual(san(await server.leaf("new.example.test")), ["new.example.test"])
        self.assertEqual(san(await server.leaf("abc.tunnel.example.test")), [WILDCARD])

    async def test_reload_skips_ca_only_and_broken_files(self) -> None:
        directory = certificate_directory(self)
        server = Server(self, directory)
        await server.start()
        events = logged(self)
        add_awkward_files(directory)

        self.assertTrue(await server.store.reload())  # within `timeout`: no loop

        self.assertEqual(server.store.names(), [WILDCARD, OTHER])
        self.assertEqual(len(about(events, "broken.pem")), 1)
        self.assertTrue(about(events, "broken.pem")[0].startswith("skipped: "))
        self.assertEqual(san(await server.leaf("abc.tunnel.example.test")), [WILDCARD])

    async def test_reload_with_nothing_usable_keeps_serving(self) -> None:
        directory = certificate_directory(self)
        server = Server(self, directory)
        await server.start()
        events = logged(self)
        for path in directory.iterdir():
            path.unlink()
        write(directory, "tunnel.pem", b"-----BEGIN PRIVATE KEY-----\ntruncated")

        self.assertFalse(await server.store.reload())

        self.assertEqual(server.store.names(), [WILDCARD, OTHER])
        self.assertEqual(san(await server.leaf("abc.tunnel.example.test")), [WILDCARD])
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual([e["directory"] for e in errors], [str(directory)])

    async def test_reload_if_changed_uses_a_thread(self) -> None:
        directory = certificate_directory(self)
        store = CertificateStore(directory)
        self.assertFalse(await store.reload_if_changed())
        write(directory, "new.pem", full_chain(leaf("new.example.test")))
        self.assertTrue(await store.reload_if_changed())
        self.assertIn("new.example.test", store.names())
        self.assertFalse(await store.reload_if_changed())


class StoreTests(SynchronousTestCase):
    """Loading and lookup, without sockets."""

    def test_empty_directory_fails_at_first_load(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        error = self.assertRaises(CertificateDirectoryError, CertificateStore, directory, InlineThreads())
        self.assertEqual(str(error), f"no usable certificate in {directory}")
        error = self.assertRaises(CertificateDirectoryError, serverFromString, reactor, f"sni:{escape(directory)}")
        self.assertIn(str(directory), str(error))

    def test_first_load_says_why_files_were_unusable(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        write(directory, "ca.pem", pem(*CA))  # a CA is never served, even with its key
        error = self.assertRaises(CertificateDirectoryError, CertificateStore, directory, InlineThreads())
        self.assertEqual(str(error), f"no usable certificate in {directory} "
                                     "(ca.pem: private key without a matching server certificate)")

    def test_missing_directory_fails_at_first_load(self) -> None:
        directory = Path(self.mktemp())
        error = self.assertRaises(CertificateDirectoryError, CertificateStore, directory, InlineThreads())
        self.assertIn(str(directory), str(error))

    def test_awkward_files_load_without_looping(self) -> None:
        """CA-only files, broken files and intermediates that issued each other: the first load
        (run in a daemon thread here, so a loop fails the test instead of hanging the run)
        serves what is usable and says what it skipped."""
        directory = certificate_directory(self)
        add_awkward_files(directory)
        x, y = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        _, x_by_y = issue("cycle X", (y, cn("cycle Y")), ca=True, key=x)
        _, y_by_x = issue("cycle Y", (x, cn("cycle X")), ca=True, key=y)
        cycle = issue("cycle.example.test", (x, cn("cycle X")), names=("cycle.example.test",))
        write(directory, "cycle.pem", pem(*cycle, x_by_y, y_by_x))
        events = logged(self)
        stores: list[CertificateStore] = []

        loader = threading.Thread(target=lambda: stores.append(CertificateStore(directory, InlineThreads())),
                                  daemon=True)
        loader.start()
        loader.join(timeout=5)

        self.assertFalse(loader.is_alive(), "the first load did not finish within 5 s")
        self.assertEqual(stores[0].names(), [WILDCARD, "cycle.example.test", OTHER])
        self.assertEqual(len(about(events, "broken.pem")), 1)
        self.assertTrue(about(events, "broken.pem")[0].startswith("skipped: "))
        self.assertEqual(about(events, "empty.key"), ["skipped: no PEM certificate or private key in it"])
        self.assertEqual(about(events, "root.pem") + about(events, "intermediate.crt"), [])

    def test_lookup(self) -> None:
        store = CertificateStore(certificate_directory(self), InlineThreads())
        wildcard, other = store.lookup("*.tunnel.example.test"), store.lookup(OTHER)
        self.assertIsNotNone(wildcard)
        self.assertIsNot(wildcard, other)
        for name in (b"abc.tunnel.example.test", "ABC.Tunnel.Example.Test.", "x-1.tunnel.example.test"):
            self.assertIs(store.lookup(name), wildcard, name)
        self.assertIs(store.lookup(b"Other.Example.Test."), other)
        for name in (None, b"", "a.b.tunnel.example.test", "tunnel.example.test", "example.test", "test"):
            self.assertIsNone(store.lookup(name), name)

    def test_default_is_the_first_file(self) -> None:
        """"other.crt" sorts before "tunnel.pem": clients without SNI get OTHER."""
        store = CertificateStore(certificate_directory(self), InlineThreads())
        connection = store.serverConnectionForTLS(None)
        self.assertEqual(san(connection.get_certificate(as_cryptography=True)), [OTHER])

    def test_later_expiry_wins_whatever_the_file_order(self) -> None:
        for old_file, new_file in [("a.pem", "b.pem"), ("b.pem", "a.pem")]:
            directory = Path(self.mktemp())
            directory.mkdir()
            old, new = leaf(WILDCARD, days=10), leaf(WILDCARD, days=80)
            write(directory, old_file, full_chain(old))
            write(directory, new_file, full_chain(new))
            store = CertificateStore(directory, InlineThreads())
            self.assertEqual(served_serial(store, "a.tunnel.example.test"), new[1].serial_number)
            self.assertEqual(san(store.serverConnectionForTLS(None).get_certificate(as_cryptography=True)),
                             [WILDCARD])


    def test_only_regular_files_of_bounded_size_are_read(self) -> None:
        """A FIFO hung the first load for ever (read() blocks until a writer comes); a device
        never ends; a huge file filled memory.  Each is skipped with a reason, without blocking."""
        directory = certificate_directory(self)
        os.mkfifo(directory / "pipe.pem")
        os.symlink("/dev/zero", directory / "zero.pem")
        with open(directory / "huge.pem", "wb") as huge:
            huge.truncate(64 << 20)  # sparse: costs no disk
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(str(directory / "sock.pem"))
        events = logged(self)
        stores: list[CertificateStore] = []

        loader = threading.Thread(target=lambda: stores.append(CertificateStore(directory, InlineThreads())),
                                  daemon=True)
        loader.start()
        loader.join(timeout=5)

        self.assertFalse(loader.is_alive(), "the first load did not finish within 5 s")
        self.assertEqual(stores[0].names(), [WILDCARD, OTHER])
        self.assertEqual(about(events, "pipe.pem"), ["skipped: not a regular file"])
        self.assertEqual(about(events, "zero.pem"), ["skipped: not a regular file"])
        self.assertEqual(about(events, "huge.pem"), ["skipped: larger than 1 MiB"])
        self.assertEqual(len(about(events, "sock.pem")), 1)

    def test_an_expired_certificate_is_never_the_default_beside_a_valid_one(self) -> None:
        """"a.pem" sorts first, but its certificate has expired: clients without SNI get b.pem's."""
        directory = Path(self.mktemp())
        directory.mkdir()
        write(directory, "a.pem", full_chain(leaf(OTHER, days=30, start=timedelta(days=-60))))
        write(directory, "b.pem", full_chain(leaf(WILDCARD)))
        events = logged(self)
        store = CertificateStore(directory, InlineThreads())
        self.assertEqual(san(store.serverConnectionForTLS(None).get_certificate(as_cryptography=True)), [WILDCARD])
        self.assertIsNotNone(store.lookup(OTHER), "still served for its own name, with a warning")
        [warning] = about(events, "a.pem")
        self.assertRegex(warning, rf"^certificate [0-9a-f]+ for {OTHER} expired on \d{{4}}-\d\d-\d\d")
        self.assertEqual(about(events, "b.pem"), [])

    def test_a_certificate_about_to_expire_is_warned_about(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        write(directory, "soon.pem", full_chain(leaf(WILDCARD, days=5)))
        events = logged(self)
        CertificateStore(directory, InlineThreads())
        [warning] = about(events, "soon.pem")
        self.assertRegex(warning, r"^certificate [0-9a-f]+ for \*\.tunnel\.example\.test expires on "
                                  r"\d{4}-\d\d-\d\d, in [45] days$")

    def test_a_valid_certificate_wins_over_one_not_valid_yet(self) -> None:
        """A renewal dated tomorrow expires later, but is not served before its time."""
        directory = Path(self.mktemp())
        directory.mkdir()
        current, future = leaf(WILDCARD, days=30), leaf(WILDCARD, days=90, start=timedelta(days=1))
        write(directory, "current.pem", full_chain(current))
        write(directory, "future.pem", full_chain(future))
        store = CertificateStore(directory, InlineThreads())
        self.assertEqual(served_serial(store, "a.tunnel.example.test"), current[1].serial_number)


class EndpointStringTests(SynchronousTestCase):
    """`sni:` (and the relay's `tls:` alias) through Twisted's own endpoint-string parsing: the
    listening port is read back from a MemoryReactor."""

    def listened(self, description: str) -> tuple[int, int, str]:
        """(port, backlog, interface) that listening on `description` asks the reactor for."""
        memory = MemoryReactor()
        endpoint = serverFromString(memory, description)
        self.assertIsInstance(endpoint, SNIServerEndpoint)
        self.successResultOf(endpoint.listen(Factory.forProtocol(Protocol)))
        [(port, _, backlog, interface)] = memory.tcpServers
        return port, backlog, interface

    def test_descriptions(self) -> None:
        """The directory's name has a colon (escaped as in every endpoint string)."""
        directory = escape(certificate_directory(self))
        cases = {
            f"sni:{directory}:port=443": (443, 50, "::"),
            f"sni:{directory}:443": (443, 50, "::"),
            f"sni:{directory}": (443, 50, "::"),
            f"SNI:{directory}:8443:interface=127.0.0.1:backlog=10": (8443, 10, "127.0.0.1"),
            f"sni:{directory}:interface=\\:\\:1:port=0": (0, 50, "::1"),
        }
        for description, expected in cases.items():
            self.assertEqual(self.listened(description), expected, description)

    def test_store_is_the_directory_given(self) -> None:
        directory = certificate_directory(self)
        endpoint = serverFromString(reactor, f"sni:{escape(directory)}")
        self.assertEqual(endpoint.store.directory, directory)
        self.assertEqual(endpoint.store.names(), [WILDCARD, OTHER])

    def test_wrong_descriptions(self) -> None:
        """Each is refused before any directory is read (there is no `certs` here)."""
        for wrong in ("sni:", "sni", "sni:certs:1:port=2", "sni:certs:443:key=x", "sni:certs:https",
                      "sni:certs:99999", "sni:certs:backlog=lots", "sni:certs:1:2"):
            self.assertRaises(ValueError, serverFromString, reactor, wrong)

    def test_tls_is_the_relays_alias_of_sni(self) -> None:
        for description, expected in {"tls:/etc/mcpr/certs:443": "sni:/etc/mcpr/certs:443",
                                      "TLS:certs": "sni:certs", "tls:certs:port=443": "sni:certs:port=443",
                                      "tls:C\\:\\\\certs": "sni:C\\:\\\\certs"}.items():
            self.assertEqual(listen_description(description), expected, description)
        for description in ("tcp:443", "ssl:443:privateKey=k.pem", "systemd:domain=INET6:index=0",
                            "tlsx:certs", "sni:certs", ""):
            self.assertEqual(listen_description(description), description)
        directory = certificate_directory(self)
        endpoint = serverFromString(reactor, listen_description(f"tls:{escape(directory)}:0"))
        self.assertEqual(endpoint.store.names(), [WILDCARD, OTHER])


class WatcherTests(SynchronousTestCase):
    """The watcher on a Clock, with the thread work run inline."""

    def setUp(self) -> None:
        self.directory = certificate_directory(self)
        self.store = CertificateStore(self.directory, InlineThreads())
        self.clock = Clock()
        self.watcher = CertificateWatcher(self.store, clock=self.clock)
        self.watcher.startService()
        self.addCleanup(lambda: self.successResultOf(self.watcher.stopService()))

    def test_reloads_when_a_file_is_added_or_replaced(self) -> None:
        wildcard = self.store.lookup(WILDCARD)
        write(self.directory, "new.pem", full_chain(leaf("new.example.test")))
        self.clock.advance(9.9)
        self.assertNotIn("new.example.test", self.store.names())
        self.clock.advance(0.1)
        self.assertIn("new.example.test", self.store.names())

        renewed = leaf(WILDCARD, days=90)
        write(self.directory, "tunnel.pem", full_chain(renewed))
        self.clock.advance(10)
        self.assertEqual(served_serial(self.store, "abc.tunnel.example.test"), renewed[1].serial_number)
        self.assertIsNot(self.store.lookup(WILDCARD), wildcard)

    def test_no_change_no_reload(self) -> None:
        wildcard = self.store.lookup(WILDCARD)
        self.clock.advance(30)
        self.assertIs(self.store.lookup(WILDCARD), wildcard)

    def test_a_broken_directory_is_reported_once_and_recovers(self) -> None:
        events = logged(self)
        hidden = self.directory.with_name("hidden")
        self.directory.rename(hidden)
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn, LogLevel.error])
        self.assertEqual(self.store.names(), [WILDCARD, OTHER])
        hidden.rename(self.directory)
        write(self.directory, "new.pem", full_chain(leaf("new.example.test")))
        self.clock.advance(10)
        self.assertIn("new.example.test", self.store.names())

    def test_expiry_is_checked_again_every_day(self) -> None:
        """A certificate that nears its end while the relay runs is warned about, once a day."""
        write(self.directory, "tunnel.pem", full_chain(leaf(WILDCARD, days=10)))
        self.clock.advance(10)
        events = logged(self)
        self.clock.advance(86400 - 10)
        self.assertEqual(len(about(events, "tunnel.pem")), 0)
        self.clock.advance(10)
        self.assertEqual(len(about(events, "tunnel.pem")), 1)
        self.assertIn("expires on", about(events, "tunnel.pem")[0])
        self.assertEqual(about(events, "other.crt"), [])

    def test_keeps_watching_after_a_failure(self) -> None:
        events = logged(self)
        self.store.reload_if_changed = lambda: fail(RuntimeError("boom"))  # type: ignore[method-assign]
        self.clock.advance(10)
        self.assertEqual([e["log_failure"].value.args for e in events if "log_failure" in e], [("boom",)])
        self.flushLoggedErrors(RuntimeError)
        del self.store.reload_if_changed
        write(self.directory, "new.pem", full_chain(leaf("new.example.test")))
        self.clock.advance(10)
        self.assertIn("new.example.test", self.store.names())
