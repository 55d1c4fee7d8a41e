"""Listeners that announce their port, and the SIGHUP service, in this process."""

from __future__ import annotations

import os
import signal
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mcpr.common.service import DEFAULT_BACKLOG, SighupService, address_of, listener, with_backlog


class ListenerTests(TestCase):
    """listener(): a real port that announces where it is bound, or fails at start."""

    async def test_announces_the_bound_port(self) -> None:
        announced: Deferred = Deferred()
        service = listener("tcp:0:interface=127.0.0.1", Factory.forProtocol(Protocol), announced.callback, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = await announced
        self.assertRegex(address_of(port), r"^127\.0\.0\.1:\d+$")
        self.assertNotEqual(port.getHost().port, 0)

    def test_a_port_that_cannot_be_bound_fails_at_start(self) -> None:
        """`twist` runs privilegedStartService first: raising there stops it at start."""
        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        announced: list = []
        service = listener(f"tcp:{taken.getHost().port}:interface=127.0.0.1", Factory.forProtocol(Protocol),
                           announced.append, reactor)
        self.assertRaises(CannotListenError, service.privilegedStartService)
        self.assertEqual(announced, [])


class SighupTests(SynchronousTestCase):
    """SighupService: the handler it installs, runs and restores, and its failures."""

    def setUp(self) -> None:
        self.calls: list[str] = []
        self.before = signal.getsignal(signal.SIGHUP)
        self.service = SighupService(_Inline(), lambda: self.calls.append("reload"))

    def test_signal_runs_the_callback_and_stop_restores_the_handler(self) -> None:
        self.service.startService()
        try:
            self.assertNotEqual(signal.getsignal(signal.SIGHUP), self.before)
            os.kill(os.getpid(), signal.SIGHUP)  # Python runs the handler before the next bytecode here
            self.assertEqual(self.calls, ["reload"])
        finally:
            self.service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.before)

    def test_off_the_main_thread_nothing_is_installed(self) -> None:
        errors: list[BaseException] = []

        def start_and_stop() -> None:
            try:
                self.service.startService()
                self.assertEqual(signal.getsignal(signal.SIGHUP), self.before)
                self.service.stopService()
            except BaseException as e:
                errors.append(e)

        worker = threading.Thread(target=start_and_stop)
        worker.start()
        worker.join(5)
        self.assertEqual(errors, [])
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.before)

    def test_a_failing_callback_is_logged(self) -> None:
        def broken() -> Deferred:
            raise RuntimeError("boom")

        service = SighupService(_Inline(), broken)
        service.startService()
        self.addCleanup(service.stopService)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class _Inline:
    """callFromThread that runs at once: the test runs on the main thread already."""

    def callFromThread(self, f, *args, **kwargs) -> None:
        f(*args, **kwargs)


class BacklogTests(SynchronousTestCase):
    """Listeners ask for a deep accept queue unless the endpoint string names one."""

    def test_added_where_the_endpoint_takes_one(self) -> None:
        self.assertEqual(with_backlog("tcp:8080"), f"tcp:8080:backlog={DEFAULT_BACKLOG}")
        self.assertEqual(with_backlog("sni:/etc/certs:port=443"), f"sni:/etc/certs:port=443:backlog={DEFAULT_BACKLOG}")
        self.assertEqual(with_backlog("tcp:8080:backlog=10"), "tcp:8080:backlog=10")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")

    def test_the_listening_socket_gets_it(self) -> None:
        reactor = MemoryReactor()
        service = listener("tcp:0:interface=127.0.0.1", Factory(), lambda port: None, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        [(_, _, backlog, _)] = reactor.tcpServers
        self.assertEqual(backlog, DEFAULT_BACKLOG)
