"""Listeners that announce their port, and the SIGHUP service, in this process."""

from __future__ import annotations

import errno
import os
import signal
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mcpr.common.service import DEFAULT_BACKLOG, SighupService, address_of, listener, with_backlog
from mcpr.common.settings import ConfigError


class ListenerTests(TestCase):
    """listener(): a real port that announces where it is bound, or fails at start."""

    async def test_announces_the_bound_port(self) -> None:
        announced: Deferred = Deferred()
        service = listener("tcp:0:interface=127.0.0.1", Factory.forProtocol(Protocol), announced.callback, reactor,
                           where="option --listen")
        service.startService()
        self.addCleanup(service.stopService)
        port = await announced
        self.assertRegex(address_of(port), r"^127\.0\.0\.1:\d+$")
        self.assertNotEqual(port.getHost().port, 0)

    def test_a_port_that_cannot_be_bound_fails_at_start(self) -> None:
        """`twist` starts the tree before its reactor runs: raising there stops it at start, with
        one line naming where the endpoint came from, the endpoint, why and what to do."""
        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        announced: list = []
        description = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        service = listener(description, Factory.forProtocol(Protocol), announced.append, reactor,
                           where="mcpr.toml: key 'listen'")
        e = self.assertRaises(ConfigError, service.privilegedStartService)
        self.assertEqual(str(e), f"mcpr.toml: key 'listen': cannot listen on {description}: Address already in "
                                 "use: another process listens there (another gateway or relay?): stop it, or "
                                 "choose another port")
        self.assertEqual(announced, [])

    def test_with_unbound_a_port_that_cannot_be_bound_is_reported_and_the_service_runs_without(self) -> None:
        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        announced: list = []
        reported: list[str] = []
        description = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        service = listener(description, Factory.forProtocol(Protocol), announced.append, reactor,
                           where="--inspector (the default)", unbound=reported.append)
        service.startService()
        self.assertEqual(reported, [f"--inspector (the default): cannot listen on {description}: Address already in "
                                    "use: another process listens there (another gateway or relay?): stop it, or "
                                    "choose another port"])
        self.assertEqual((announced, service.running), ([], True))
        self.assertIsNone(self.successResultOf(service.stopService()))

    def test_a_privileged_port_without_the_capability(self) -> None:
        """bind() refused with EACCES, as for :443 without CAP_NET_BIND_SERVICE (this test may run as
        root, so the refusal comes from an endpoint double)."""
        refusal = CannotListenError("", 443, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
        service = listener("tcp:443", Factory.forProtocol(Protocol), lambda port: None, reactor,
                           where="option --port")
        service.endpoint.wrapped = _Refusing(refusal)
        e = self.assertRaises(ConfigError, service.privilegedStartService)
        self.assertEqual(str(e), "option --port: cannot listen on tcp:443: Permission denied: ports below 1024 "
                                 "need root or CAP_NET_BIND_SERVICE: use a port from 1024 up, or start the relay "
                                 "with its systemd unit, which grants the capability")

    def test_a_string_that_is_no_endpoint(self) -> None:
        for description, why in [("bogus:1", "Unknown endpoint type: 'bogus'"),
                                 ("tcp:http", "invalid literal for int() with base 10: 'http'"),
                                 ("tcp:80:colour=blue", "unexpected keyword argument 'colour'")]:
            e = self.assertRaises(ConfigError, listener, description, Factory(), lambda port: None, reactor,
                                  where="option --listen")
            self.assertTrue(str(e).startswith(f'option --listen: cannot use endpoint "{description}": '), str(e))
            self.assertIn(why, str(e))
            self.assertTrue(str(e).endswith("; expected an endpoint such as tcp:8080 or tcp:8080:interface=127.0.0.1"))

    def test_the_users_string_is_shown_not_the_translated_one(self) -> None:
        e = self.assertRaises(ConfigError, listener, "tls:x", Factory(), lambda port: None, reactor,
                              where="option --listen", translate=lambda d: "bogus:" + d)
        self.assertIn('cannot use endpoint "tls:x"', str(e))


@implementer(IStreamServerEndpoint)
class _Refusing:
    def __init__(self, error: CannotListenError) -> None:
        self._error = error

    def listen(self, factory: object) -> Deferred:
        return fail(self._error)


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
        self.assertEqual(with_backlog("reuseport:8080"), f"reuseport:8080:backlog={DEFAULT_BACKLOG}")
        self.assertEqual(with_backlog("tcp:8080:backlog=10"), "tcp:8080:backlog=10")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")

    def test_the_listening_socket_gets_it(self) -> None:
        reactor = MemoryReactor()
        service = listener("tcp:0:interface=127.0.0.1", Factory(), lambda port: None, reactor, where="--port")
        service.startService()
        self.addCleanup(service.stopService)
        [(_, _, backlog, _)] = reactor.tcpServers
        self.assertEqual(backlog, DEFAULT_BACKLOG)
