"""The cluster directory against a real redis-server: the owner rules across nodes, atomic claims,
fencing, expiry and refresh, a Redis that restarts empty, one that is down or hangs, and the
heartbeat's few log lines.

Each test runs its own redis-server on a free loopback port; the ttls are
short (a fraction of a second) so that expiry is real time yet quick.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mcpr.common.protocol import CloseCode, Refused
from mcpr.relay.cluster.directory import (
    REFRESH_BATCH,
    Claimed,
    Directory,
    DirectoryUnavailable,
    Heartbeat,
    Placement,
    RedisClient,
    parse_redis_url,
    redis_connection,
)
from mcpr.relay.registry import IN_USE
from tests.support.loopback import sleep
from tests.support.redis import RedisServer

TTL = 0.6
GRACE = 30.0
TIMEOUT = 0.5
NODE_A = "http://10.0.0.1:7000"
NODE_B = "http://10.0.0.2:7000"
OWNER = "a" * 64
STRANGER = "b" * 64
NAMESPACE = "mcpr.relay.cluster.directory"
T = TypeVar("T")


def capture_logs(testcase: SynchronousTestCase) -> list[dict]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def ours(events: list[dict], level: LogLevel) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == NAMESPACE and e.get("log_level") == level]


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {timeout} s")
        await sleep(0.05)


class Cluster(TestCase):
    """A redis-server, and directories of nodes on it, each over a connection of its own."""

    def setUp(self) -> None:
        self.redis = RedisServer(self)

    def connect(self, url: str | None = None) -> RedisClient:
        client = redis_connection(url or self.redis.url, reactor, timeout=TIMEOUT)
        self.addCleanup(client.disconnect)
        return client

    def directory(self, node: str = NODE_A, *, grace: float = GRACE, prefix: str = "mcpr:",
                  url: str | None = None) -> Directory:
        return Directory(self.connect(url), node, ttl=TTL, grace=grace, prefix=prefix, timeout=TIMEOUT,
                         clock=reactor)

    async def refused(self, directory: Directory, name: str, owner: str, *, assigned: bool = False) -> str:
        with self.assertRaises(Refused) as caught:
            await directory.claim(name, owner, assigned=assigned)
        self.assertEqual(caught.exception.code, CloseCode.IN_USE)
        return caught.exception.reason

    async def once_back(self, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """`call()` as soon as Redis answers again (txredisapi reconnects after about 1 s)."""
        deadline = reactor.seconds() + 10
        while True:
            try:
                return await call()
            except DirectoryUnavailable:
                if reactor.seconds() > deadline:
                    raise
                await sleep(0.1)


class ClaimTests(Cluster):
    async def test_owner_takes_over_and_learns_the_previous_node(self) -> None:
        """The same owner takes a live name over, here or from another node (whose node is
        reported, for the eviction there); every claim gets a greater epoch."""
        a, b = self.directory(NODE_A), self.directory(NODE_B)
        first = await a.claim("x", OWNER, assigned=False)
        self.assertEqual(first, Claimed(Placement("x", NODE_A, OWNER, first.placement.epoch,
                                                  f"{first.placement.epoch} {NODE_A} {OWNER}"), None))
        again = await a.claim("x", OWNER, assigned=False)
        self.assertIsNone(again.previous)  # the same node: its registry evicts the old socket
        moved = await b.claim("x", OWNER, assigned=False)
        self.assertEqual(moved.previous, NODE_A)
        self.assertEqual(moved.placement.node, NODE_B)
        self.assertLess(first.placement.epoch, again.placement.epoch)
        self.assertLess(again.placement.epoch, moved.placement.epoch)
        self.assertEqual(await a.locate("x"), moved.placement)

    async def test_stranger_is_refused_a_live_name_even_when_assigned(self) -> None:
        a, b = self.directory(NODE_A), self.directory(NODE_B)
        await a.claim("x", OWNER, assigned=False)
        self.assertEqual(await self.refused(b, "x", STRANGER), IN_USE)
        self.assertEqual(await self.refused(a, "x", STRANGER, assigned=True), IN_USE)

    async def test_reservation_after_release(self) -> None:
        """A released name is kept for its owner for `grace`, cluster-wide; an assignment beats it."""
        a, b = self.directory(NODE_A), self.directory(NODE_B)
        claimed = await a.claim("x", OWNER, assigned=False)
        await a.release(claimed.placement)
        self.assertIsNone(await b.locate("x"))
        self.assertEqual(await self.refused(b, "x", STRANGER), "subdomain reserved for another token for 30 s")
        back = await b.claim("x", OWNER, assigned=False)
        self.assertIsNone(back.previous)  # nobody to evict: the name was free
        await b.release(back.placement)
        assigned = await b.claim("x", STRANGER, assigned=True)
        self.assertEqual(await a.locate("x"), assigned.placement)

    async def test_reservation_outlives_a_dead_holder(self) -> None:
        """A node that dies releases nothing: its live key expires after ttl, and the owner key
        still keeps the name for its owner."""
        a, b = self.directory(NODE_A), self.directory(NODE_B)
        await a.claim("x", OWNER, assigned=False)
        await sleep(TTL + 0.3)
        self.assertIsNone(await b.locate("x"))
        reason = await self.refused(b, "x", STRANGER)
        self.assertRegex(reason, r"^subdomain reserved for another token for (29|30) s$")
        self.assertEqual((await b.claim("x", OWNER, assigned=False)).placement.node, NODE_B)

    async def test_no_grace_frees_a_released_name(self) -> None:
        a = self.directory(grace=0)
        claimed = await a.claim("x", OWNER, assigned=False)
        await a.release(claimed.placement)
        self.assertEqual((await a.claim("x", STRANGER, assigned=False)).placement.owner, STRANGER)

    async def test_concurrent_claims_one_winner(self) -> None:
        """Two nodes claiming the same names at the same moment, for different owners: each
        name has exactly one winner, and the directory names it."""
        a, b = self.directory(NODE_A), self.directory(NODE_B)
        await DeferredList([Deferred.fromCoroutine(a.locate("warm-up")),
                            Deferred.fromCoroutine(b.locate("warm-up"))])  # both connected
        names = [f"n{i}" for i in range(50)]
        attempts = [Deferred.fromCoroutine(d.claim(name, owner, assigned=True))
                    for name in names for d, owner in ((a, OWNER), (b, STRANGER))]
        results = await DeferredList(attempts, consumeErrors=True)
        for i, name in enumerate(names):
            pair = results[2 * i:2 * i + 2]
            winners = [result for ok, result in pair if ok]
            self.assertEqual(len(winners), 1, name)
            loser = next(result for ok, result in pair if not ok)
            loser.trap(Refused)
            self.assertEqual(await a.locate(name), winners[0].placement)

    async def test_locate(self) -> None:
        """Owners of any characters survive the value's format (provider mode's owners are the
        provider's strings)."""
        a = self.directory()
        self.assertIsNone(await a.locate("x"))
        owner = "user 42  of\tthe provider: ünïcødé"
        claimed = await a.claim("x", owner, assigned=False)
        self.assertEqual(await a.locate("x"), claimed.placement)
        self.assertEqual(claimed.placement.owner, owner)
        self.assertEqual(await self.refused(a, "x", "user 42"), IN_USE)
        self.assertEqual((await a.claim("x", owner, assigned=False)).placement.owner, owner)

    async def test_prefixes_keep_clusters_apart(self) -> None:
        a = self.directory()
        other = self.directory(NODE_B, prefix="other:")
        await a.claim("x", OWNER, assigned=False)
        self.assertIsNone(await other.locate("x"))
        await other.claim("x", STRANGER, assigned=False)


class RefreshTests(Cluster):
    async def test_refresh_keeps_names_alive(self) -> None:
        a = self.directory()
        kept = (await a.claim("kept", OWNER, assigned=False)).placement
        await a.claim("dropped", OWNER, assigned=False)
        for _ in range(6):  # 1.2 s: twice the ttl
            await sleep(TTL / 3)
            self.assertEqual(await a.refresh([kept]), [])
        self.assertEqual(await a.locate("kept"), kept)
        self.assertIsNone(await a.locate("dropped"))

    async def test_refresh_in_batches(self) -> None:
        a, b = self.directory(NODE_A), self.directory(NODE_B)
        held = [(await a.claim(f"n{i}", OWNER, assigned=False)).placement for i in range(REFRESH_BATCH + 20)]
        taken = [held[3].name, held[REFRESH_BATCH + 5].name]
        for name in taken:
            await b.claim(name, OWNER, assigned=False)
        self.assertEqual(await a.refresh(held), taken)

    async def test_refresh_recreates_keys_after_a_redis_restart(self) -> None:
        """A Redis that comes back empty gets the names back at the next refresh, with their
        reservations: a stranger is refused."""
        a, b = self.directory(NODE_A), self.directory(NODE_B)
        held = (await a.claim("x", OWNER, assigned=False)).placement
        self.redis.stop()
        self.redis.start()
        # b reconnects first: its reconnection takes about a second, longer than the name's TTL, so
        # b asks right after a's refresh re-created the name, not a TTL later.
        self.assertEqual(await self.once_back(lambda: b.refresh([])), [])
        self.assertEqual(await self.once_back(lambda: a.refresh([held])), [])
        self.assertEqual(await b.locate("x"), held)
        self.assertEqual(await self.refused(b, "x", STRANGER), IN_USE)
        claimed = await b.claim("y", OWNER, assigned=False)  # the epoch restarted, the value differs
        self.assertNotEqual(claimed.placement.value, held.value)

    async def test_refresh_reports_a_name_another_node_took(self) -> None:
        a, b = self.directory(NODE_A), self.directory(NODE_B)
        x = (await a.claim("x", OWNER, assigned=False)).placement
        y = (await a.claim("y", OWNER, assigned=False)).placement
        moved = await b.claim("x", OWNER, assigned=False)
        self.assertEqual(await a.refresh([x, y]), ["x"])
        self.assertEqual(await a.locate("x"), moved.placement)
        self.assertEqual(await a.locate("y"), y)

    async def test_refresh_does_not_take_back_a_name_reserved_for_another(self) -> None:
        """Cut off for longer than ttl, a node may find its name claimed and released by another
        owner meanwhile: the name is lost, not re-created over that owner's reservation."""
        a, b = self.directory(NODE_A), self.directory(NODE_B)
        x = (await a.claim("x", OWNER, assigned=False)).placement
        await sleep(TTL + 0.3)
        theirs = await b.claim("x", STRANGER, assigned=True)
        await b.release(theirs.placement)
        self.assertEqual(await a.refresh([x]), ["x"])
        self.assertIsNone(await a.locate("x"))

    async def test_stale_release_keeps_the_new_holder(self) -> None:
        a, b = self.directory(NODE_A), self.directory(NODE_B)
        old = (await a.claim("x", OWNER, assigned=False)).placement
        new = (await b.claim("x", OWNER, assigned=False)).placement
        await a.release(old)
        self.assertEqual(await a.locate("x"), new)


class UnavailableTests(Cluster):
    async def test_redis_down(self) -> None:
        """Every call fails within the timeout; a release is only logged."""
        logs = capture_logs(self)
        a = self.directory()
        claimed = await a.claim("x", OWNER, assigned=False)
        self.redis.stop()
        for call in (lambda: a.claim("y", OWNER, assigned=False), lambda: a.locate("x"),
                     lambda: a.refresh([claimed.placement]), lambda: a.refresh([])):
            started = reactor.seconds()
            with self.assertRaises(DirectoryUnavailable):
                await call()
            self.assertLess(reactor.seconds() - started, TIMEOUT + 0.3)
        await a.release(claimed.placement)
        [warning] = ours(logs, LogLevel.warn)
        self.assertIn("Could not release x in the cluster directory (Redis", warning)

    async def test_redis_hangs(self) -> None:
        """A Redis that accepts but never answers is a timeout, not a registration held open."""
        a = self.directory()
        await a.locate("x")
        self.redis.freeze()
        started = reactor.seconds()
        with self.assertRaises(DirectoryUnavailable) as caught:
            await a.claim("x", OWNER, assigned=False)
        self.assertLess(reactor.seconds() - started, TIMEOUT + 0.3)
        self.assertEqual(str(caught.exception), "Redis connection failed: Not received Redis response in 0.5 seconds")

    async def test_password(self) -> None:
        """The password goes to Redis and nowhere else: not to the logs, nor to the errors."""
        logs = capture_logs(self)
        server = RedisServer(self, "--requirepass", "Xq7 s3cret/1")
        url = f"redis://:Xq7%20s3cret%2F1@127.0.0.1:{server.port}/0"
        a = self.directory(url=url)
        self.assertEqual((await a.claim("x", OWNER, assigned=False)).placement.node, NODE_A)
        wrong = self.directory(url=url.replace("s3cret", "s3cr3t"))
        with self.assertRaises(DirectoryUnavailable) as caught:
            await wrong.locate("x")
        await eventually(lambda: any("could not auth" in formatEvent(e) for e in logs))
        for text in [str(caught.exception), *(formatEvent(e) for e in logs)]:
            self.assertNotIn("Xq7", text)

    async def test_connection_made_again_after_txredisapi_gives_up(self) -> None:
        """txredisapi stops for good when the AUTH of a new connection times out (Redis hung at
        that moment): the connection is made anew, and the directory works once Redis does."""
        logs = capture_logs(self)
        server = RedisServer(self, "--requirepass", "pw")
        a = self.directory(url=f"redis://:pw@127.0.0.1:{server.port}")
        await a.locate("x")
        server.freeze()
        with self.assertRaises(DirectoryUnavailable):
            await a.locate("x")  # the reply times out: the connection is dropped and made again
        await eventually(lambda: any("could not auth" in formatEvent(e) for e in logs))
        server.thaw()
        self.assertIsNone(await self.once_back(lambda: a.locate("x")))


class HeartbeatTests(Cluster):
    def heartbeat(self, directory: Directory, held: Callable[[], list[Placement]],
                  lost: Callable[[str], None]) -> Heartbeat:
        beat = Heartbeat(directory, held, lost, reactor)
        beat.startService()
        self.addCleanup(beat.stopService)
        return beat

    async def test_lost_names_are_reported(self) -> None:
        a, b = self.directory(NODE_A), self.directory(NODE_B)
        held = [(await a.claim("x", OWNER, assigned=False)).placement]
        lost: Deferred[str] = Deferred()
        self.heartbeat(a, lambda: held, lost.callback)
        await sleep(TTL)  # a few beats: nothing lost
        self.assertFalse(lost.called)
        await b.claim("x", OWNER, assigned=False)
        self.assertEqual(await lost.addTimeout(2, reactor), "x")

    async def test_a_name_claimed_again_during_the_refresh_is_not_lost(self) -> None:
        """The refresh saw the name taken, but by the time it answered this node had taken it
        back (its owner reconnected here): that registration is not evicted."""
        a, b = self.directory(NODE_A), self.directory(NODE_B)
        first = (await a.claim("x", OWNER, assigned=False)).placement
        await b.claim("x", OWNER, assigned=False)
        again = (await a.claim("x", OWNER, assigned=False)).placement
        snapshots = iter([[first], [again]])

        def held() -> list[Placement]:
            return next(snapshots, [again])

        lost: list[str] = []
        self.heartbeat(a, held, lost.append)
        await sleep(TTL)
        self.assertEqual(lost, [])
        self.assertEqual(await b.locate("x"), again)

    async def test_outage_is_one_line_and_recovery_another(self) -> None:
        """While Redis is down, `available` is False and one warning says so; once it is back
        (empty), one line says so and the names are there again."""
        logs = capture_logs(self)
        a = self.directory()
        held = [(await a.claim("x", OWNER, assigned=False)).placement]
        beat = self.heartbeat(a, lambda: held, self.fail)
        await sleep(TTL)
        self.assertTrue(beat.available)
        self.redis.stop()
        await eventually(lambda: not beat.available, TIMEOUT + 1)
        await sleep(TTL)  # more failed beats: no more lines
        [warning] = ours(logs, LogLevel.warn)
        self.assertIn("Cluster directory unavailable (Redis", warning)
        self.redis.start()
        await eventually(lambda: beat.available)
        self.assertEqual(ours(logs, LogLevel.info), ["Cluster directory available again"])
        self.assertEqual(len(ours(logs, LogLevel.warn)), 1)
        self.assertEqual(await a.locate("x"), held[0])

    async def test_stop_waits_for_the_beat_under_way(self) -> None:
        a = self.directory()
        await a.locate("x")
        self.redis.freeze()
        beat = Heartbeat(a, list, self.fail, reactor)
        beat.startService()
        started = reactor.seconds()
        await beat.stopService()
        self.assertGreaterEqual(reactor.seconds() - started, TIMEOUT - 0.05)
        self.assertFalse(beat.available)


class RedisUrlTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for url in ("redis://127.0.0.1", "redis://127.0.0.1:6380/2", "redis://:secret@redis.internal:6379/0",
                    "redis://mcpr:secret@[::1]:6379", " redis://h/ "):
            self.assertEqual(parse_redis_url(url), url.strip())

    def test_invalid_never_repeats_the_value(self) -> None:
        cases = {
            "http://:topsecret@h": "expected a Redis URL",
            "redis://:topsecret@": "expected a Redis URL",
            "redis://:topsecret@h:99999": "port 1-65535",
            "redis://:topsecret@h/zero": "database number",
            "redis://:topsecret@h/1/2": "database number",
            "redis://:topsecret@h/1?db=2": "nothing after the database number",
            "redis://topsecret@h": "needs its password",
        }
        for url, message in cases.items():
            with self.assertRaises(ValueError, msg=url) as caught:
                parse_redis_url(url)
            self.assertIn(message, str(caught.exception))
            self.assertNotIn("topsecret", str(caught.exception))
        for value in ("", 42, None):
            self.assertRaises(ValueError, parse_redis_url, value)

    def test_node_urls_have_no_spaces(self) -> None:
        """The node is the value's middle field: a space in it would shift the owner."""
        with self.assertRaises(ValueError):
            Directory(None, "http://a b", grace=1, clock=reactor)  # type: ignore[arg-type]
