"""The reservations file: what survives a restart, writes coalesced and retried, failures never fatal.

SQLite runs for real (in memory or in a temporary file); the store's thread is
replaced by runners that the test controls, and time by a Clock.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mcpr.relay.identity import owner_id
from mcpr.relay.registry import Registry
from mcpr.relay.reservations import FILE_NAME, RETRY_DELAY, ReservationStore
from mcpr.relay.service import CLOSE_GRACE, RelayService
from tests.support.memory_relay import FakeTunnel, MemoryRelay, relay_settings

GRACE = 600.0
NOW = 1_000_000.0


def sync(f: Callable[[], Any]) -> Deferred:
    """Run a store's call at once, on this thread."""
    try:
        return succeed(f())
    except Exception:
        return fail()


class Manual:
    """Runs a store's calls only when the test says so, and can make them fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[[], Any], Deferred]] = []
        self.failing = False

    def __call__(self, f: Callable[[], Any]) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((f, d))
        return d

    def run_next(self) -> None:
        f, d = self.calls.pop(0)
        if self.failing:
            d.errback(sqlite3.OperationalError("disk I/O error"))
            return
        d.callback(f())


def capture_logs(testcase: SynchronousTestCase) -> list[dict]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT subdomain, owner, expires FROM reservations ORDER BY subdomain").fetchall()


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.path = Path(self.mktemp()) / "state" / FILE_NAME

    def store(self, run: Callable[[Callable[[], Any]], Deferred] = sync) -> ReservationStore:
        store = ReservationStore(str(self.path), self.clock, run)
        store.startService()
        self.addCleanup(store.stopService)
        return store

    def test_what_survives_a_restart(self) -> None:
        first = self.store()
        self.assertEqual(self.successResultOf(first.load(NOW, GRACE)), [])
        self.assertEqual(self.path.parent.stat().st_mode & 0o777, 0o700)
        first.held("live", "alice")
        first.reserved("dropped", "bob", NOW + 100)
        first.reserved("expiring", "carol", NOW + 5)
        first.held("gone", "dave")
        first.forgotten("gone")
        self.successResultOf(first.stopService())
        # The relay comes back 10 s later: the live tunnel's name gets the whole grace period from now.
        second = self.store()
        self.assertEqual(self.successResultOf(second.load(NOW + 10, GRACE)),
                         [("dropped", "bob", NOW + 100), ("live", "alice", NOW + 10 + GRACE)])
        self.assertEqual(rows(self.path), [("dropped", "bob", NOW + 100), ("live", "alice", NOW + 10 + GRACE)])

    def test_changes_are_coalesced_while_a_write_is_under_way(self) -> None:
        run = Manual()
        store = self.store(run)
        loading = store.load(NOW, GRACE)
        run.run_next()
        self.successResultOf(loading)
        store.held("a", "alice")
        self.assertEqual(len(run.calls), 1, "the first change is written at once")
        for i in range(100):
            store.held(f"n{i}", "bob")
            store.forgotten(f"n{i}")
        store.reserved("a", "alice", NOW + GRACE)
        self.assertEqual(len(run.calls), 1, "later changes wait for the write under way")
        run.run_next()
        self.assertEqual(len(run.calls), 1, "and then go in one transaction")
        run.run_next()
        self.assertEqual(run.calls, [])
        self.assertEqual(rows(self.path), [("a", "alice", NOW + GRACE)])

    def test_a_failed_write_is_logged_once_and_retried_later(self) -> None:
        logs = capture_logs(self)
        run = Manual()
        store = self.store(run)
        loading = store.load(NOW, GRACE)
        run.run_next()
        self.successResultOf(loading)
        run.failing = True
        store.held("a", "alice")
        run.run_next()
        store.held("b", "bob")
        self.assertEqual(run.calls, [], "no busy retry")
        self.clock.advance(RETRY_DELAY)
        run.run_next()
        self.clock.advance(RETRY_DELAY)
        errors = [formatEvent(e) for e in logs if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("cannot write", errors[0])
        self.assertIn("disk I/O error", errors[0])
        run.failing = False
        run.run_next()
        self.assertEqual(rows(self.path), [("a", "alice", None), ("b", "bob", None)])
        self.assertIn("again", formatEvent(logs[-1]))

    def test_stopping_writes_what_is_pending(self) -> None:
        run = Manual()
        store = self.store(run)
        loading = store.load(NOW, GRACE)
        run.run_next()
        self.successResultOf(loading)
        store.held("a", "alice")
        store.held("b", "bob")
        stopped = store.stopService()
        while run.calls:
            run.run_next()
        self.successResultOf(stopped)
        self.assertEqual(rows(self.path), [("a", "alice", None), ("b", "bob", None)])
        store.held("c", "late")  # after the stop: dropped, not an error

    def test_an_unusable_file_fails_the_load(self) -> None:
        self.path.parent.parent.mkdir(parents=True)
        self.path.parent.write_text("a file where the directory should be")
        store = self.store()
        self.failureResultOf(store.load(NOW, GRACE), OSError)
        store.held("a", "alice")  # disabled: changes are dropped

    def test_a_file_of_another_schema_is_refused(self) -> None:
        self.path.parent.mkdir(parents=True)
        with sqlite3.connect(self.path) as db:
            db.execute("PRAGMA user_version=99")
        self.failureResultOf(self.store().load(NOW, GRACE), sqlite3.DatabaseError)


class RelayStartTests(SynchronousTestCase):
    """The relay's service loads the reservations at start and lets registrations go on."""

    def start(self, store: ReservationStore, *tokens: str) -> Registry:
        relay = MemoryRelay(relay_settings(self, *tokens))
        relay.clock.advance(NOW)
        registry = Registry.for_settings(relay.clock, relay.settings, store)
        service = RelayService(relay.clock, relay.settings, auth=relay.auth, registry=registry,
                               forwarder=relay.forwarder, stats=relay.stats, store=store)
        service.startService()
        return registry

    def test_reservations_come_back_and_unlisted_tokens_lose_theirs(self) -> None:
        path = Path(self.mktemp()) / FILE_NAME
        before = ReservationStore(str(path), Clock(), sync)
        self.successResultOf(before.load(NOW, GRACE))
        before.held("alice", owner_id("tok-alice"))
        before.held("bob", owner_id("tok-bob"))
        self.successResultOf(before.stopService())
        # The relay starts again, and its static tokens no longer list tok-bob.
        registry = self.start(ReservationStore(str(path), Clock(), sync), "tok-alice:*")
        self.assertTrue(registry.restored)
        self.assertEqual(registry.reservation("alice"), (owner_id("tok-alice"), NOW + GRACE))
        self.assertIsNone(registry.reservation("bob"))
        self.assertEqual(rows(path), [("alice", owner_id("tok-alice"), NOW + GRACE)])

    def test_a_drain_leaves_the_names_held_for_the_next_start(self) -> None:
        """The relay closes every tunnel when it stops: that is not their owners leaving, so the
        names stay "held" and get the whole grace period from the next start."""
        path = Path(self.mktemp()) / FILE_NAME
        relay = MemoryRelay(relay_settings(self))
        relay.clock.advance(NOW)
        store = ReservationStore(str(path), relay.clock, sync)
        registry = Registry.for_settings(relay.clock, relay.settings, store)
        service = RelayService(relay.clock, relay.settings, auth=relay.auth, registry=registry,
                               forwarder=relay.forwarder, stats=relay.stats, store=store)
        service.startService()
        tunnel = FakeTunnel("mine", "alice")
        tunnel.close = lambda code, reason: registry.release(tunnel)
        registry.claim(tunnel, peer="192.0.2.1")
        stopping = service.stopService()
        relay.clock.advance(CLOSE_GRACE)
        self.successResultOf(stopping)
        self.assertIsNone(registry.get("mine"))
        self.assertEqual(rows(path), [("mine", "alice", None)])

    def test_an_unusable_file_is_logged_and_the_relay_runs_on(self) -> None:
        logs = capture_logs(self)
        path = Path(self.mktemp())
        path.write_text("not a directory")
        registry = self.start(ReservationStore(str(path / FILE_NAME), Clock(), sync))
        self.assertTrue(registry.restored)
        [error] = [formatEvent(e) for e in logs if e["log_level"] == LogLevel.error]
        self.assertIn("reservations: cannot use", error)
        self.assertIn("in memory only", error)
