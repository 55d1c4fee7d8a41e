"""One node's claims kept in step with its registry, and the front's way to other nodes, against a
real redis-server: what the registry refuses never reaches Redis, takeovers evict across nodes,
superseded claims are evicted, a stopping node gives its names back, and a request for a name
held elsewhere is located (or answered 502/503 without a tunnel)."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mcpr.common.protocol import CloseCode, Refused
from mcpr.relay.cluster.directory import Directory, redis_connection
from mcpr.relay.cluster.node import LOCATION_TTL, ClusterNode, Locations
from mcpr.relay.forwarding import NOT_HELD
from mcpr.relay.registry import Registry
from mcpr.relay.tunnels.contract import TunnelRequest
from tests.support.loopback import sleep
from tests.support.memory_relay import DOMAIN, Client, FakeTunnel, MemoryRelay, relay_settings
from tests.support.redis import RedisServer

NODE_A = "http://10.0.0.1:7000"
NODE_B = "http://10.0.0.2:7000"
NODE_C = "http://10.0.0.3:7000"
OWNER = "a" * 64
STRANGER = "b" * 64


class RecordingPeers:
    """The other nodes as the node under test sees them: what it asked of them."""

    def __init__(self) -> None:
        self.evictions: list[tuple[str, str, str]] = []
        self.streams: list[tuple[str, str, TunnelRequest]] = []
        self.sinks: list[Any] = []

    def evict(self, node: str, subdomain: str, value: str) -> Deferred[None]:
        self.evictions.append((node, subdomain, value))
        return Deferred()

    def open_stream(self, node: str, subdomain: str, request: TunnelRequest, sink: Any) -> Any:
        self.streams.append((node, subdomain, request))
        self.sinks.append(sink)
        return None

    async def close(self) -> None:
        pass


class ClusterNodeTests(TestCase):
    def setUp(self) -> None:
        self.redis = RedisServer(self)

    def node(self, url: str, *, max_per_owner: int = 8) -> tuple[ClusterNode, Registry, RecordingPeers]:
        connection = redis_connection(self.redis.url, reactor, timeout=0.5)
        self.addCleanup(connection.disconnect)
        directory = Directory(connection, url, ttl=5, grace=30, timeout=0.5, clock=reactor)
        registry = Registry(reactor, max_per_owner=max_per_owner, max_per_peer=32, max_tunnels=100, grace=30,
                            max_reservations=100)
        peers = RecordingPeers()
        return ClusterNode(url, registry, directory, peers, reactor), registry, peers  # type: ignore[arg-type]

    async def test_a_claim_the_registry_refuses_never_reaches_redis(self) -> None:
        a, registry, _ = self.node(NODE_A, max_per_owner=1)
        await a.claim(FakeTunnel("first", OWNER), peer="p", assigned=False)
        with self.assertRaises(Refused) as refused:
            await a.claim(FakeTunnel("second", OWNER), peer="p", assigned=False)
        self.assertEqual(refused.exception.code, CloseCode.TOO_MANY)
        self.assertIsNone(await a.directory.locate("second"))
        self.assertEqual((await a.directory.locate("first")).node, NODE_A)
        self.assertEqual(len(registry), 1)

    async def test_the_same_owner_elsewhere_evicts_here_and_strangers_are_refused(self) -> None:
        a, _, _ = self.node(NODE_A)
        b, b_registry, b_peers = self.node(NODE_B)
        old = FakeTunnel("name", OWNER)
        await a.claim(old, peer="p", assigned=False)
        with self.assertRaises(Refused) as refused:
            await b.claim(FakeTunnel("name", STRANGER), peer="p", assigned=False)
        self.assertEqual(refused.exception.code, CloseCode.IN_USE)

        new = FakeTunnel("name", OWNER)
        await b.claim(new, peer="p", assigned=False)
        placement = await b.directory.locate("name")
        self.assertEqual(b_peers.evictions, [(NODE_A, "name", placement.value)])
        self.assertIs(b_registry.get("name"), new)

        # Node A is told (here directly: the internal listener's job): its tunnel goes with 4002;
        # told its own claim, it keeps it.
        a.evict("name", "a claim of A's own is not this one")
        self.assertEqual(old.closes, [(4002, "evicted")])
        b.evict("name", placement.value)
        self.assertEqual(new.closes, [])

    async def test_a_superseded_claim_is_evicted_by_the_heartbeat(self) -> None:
        a, _, _ = self.node(NODE_A)
        b, _, _ = self.node(NODE_B)
        old = FakeTunnel("name", OWNER)
        await a.claim(old, peer="p", assigned=False)
        await b.claim(FakeTunnel("name", OWNER), peer="p", assigned=False)
        lost = await a.directory.refresh(a.placements())
        self.assertEqual(lost, ["name"])
        a.lost("name")
        self.assertEqual(old.closes, [(4002, "evicted")])
        self.assertEqual(list(a.placements()), [])

    async def test_released_names_stay_their_owners_cluster_wide(self) -> None:
        a, registry, _ = self.node(NODE_A)
        b, _, _ = self.node(NODE_B)
        tunnel = FakeTunnel("name", OWNER)
        await a.claim(tunnel, peer="p", assigned=False)
        registry.release(tunnel)
        a.released(tunnel)
        await a.leave()  # nothing left to give back; the release above must have gone out already
        for _ in range(50):
            if await a.directory.locate("name") is None:
                break
        self.assertIsNone(await a.directory.locate("name"))
        with self.assertRaises(Refused) as refused:
            await b.claim(FakeTunnel("name", STRANGER), peer="p", assigned=False)
        self.assertIn("reserved", refused.exception.reason)
        await b.claim(FakeTunnel("name", OWNER), peer="p", assigned=False)

    async def test_leave_gives_every_name_back(self) -> None:
        a, _, _ = self.node(NODE_A)
        for name in ("one", "two"):
            await a.claim(FakeTunnel(name, OWNER), peer="p", assigned=False)
        await a.leave()
        self.assertEqual([await a.directory.locate(name) for name in ("one", "two")], [None, None])
        self.assertEqual(list(a.placements()), [])

    async def test_located_elsewhere_or_not_at_all(self) -> None:
        a, _, _ = self.node(NODE_A)
        b, _, _ = self.node(NODE_B)
        await b.claim(FakeTunnel("there", OWNER), peer="p", assigned=False)
        self.assertEqual(await a.locate("there"), NODE_B)
        self.assertIsNone(await a.locate("nowhere"))
        # A claim naming this node while the registry has no tunnel for it is stale: not found.
        self.assertIsNone(await b.locate("there"))


class LocationsTests(SynchronousTestCase):
    def test_names_are_remembered_for_a_while_and_a_bounded_few(self) -> None:
        clock = Clock()
        locations = Locations(clock, ttl=1.0, limit=2)
        locations.put("a", NODE_A)
        clock.advance(0.5)
        locations.put("b", NODE_B)
        self.assertEqual((locations.get("a"), locations.get("b")), (NODE_A, NODE_B))
        clock.advance(0.5)
        self.assertEqual((locations.get("a"), locations.get("b")), (None, NODE_B))
        locations.put("c", NODE_A)
        locations.put("d", NODE_A)  # over the limit: the oldest ("b") goes
        self.assertEqual([locations.get(name) for name in "bcd"], [None, NODE_A, NODE_A])
        locations.forget("c")
        self.assertIsNone(locations.get("c"))


class FrontInClusterTests(TestCase):
    """The public front's answers for names this node does not hold."""

    def node_a(self) -> tuple[RedisServer, MemoryRelay, RecordingPeers]:
        """A real redis-server, and node A's front in memory, whose other nodes are recorded."""
        redis = RedisServer(self)
        connection = redis_connection(redis.url, reactor, timeout=0.5)
        self.addCleanup(connection.disconnect)
        peers = RecordingPeers()

        def node(registry: Registry) -> ClusterNode:
            directory = Directory(connection, NODE_A, ttl=5, grace=30, timeout=0.5, clock=reactor)
            return ClusterNode(NODE_A, registry, directory, peers, reactor)  # type: ignore[arg-type]

        return redis, MemoryRelay(relay_settings(self), cluster=node), peers

    async def test_not_found_unavailable_and_forwarded(self) -> None:
        redis, relay, peers = self.node_a()
        other = Directory(redis_connection(redis.url, reactor, timeout=0.5), NODE_B, ttl=5, grace=30,
                          timeout=0.5, clock=reactor)
        self.addCleanup(other.close)
        await other.claim("held", OWNER, assigned=False)

        async def answered(client: Client) -> bytes:
            for _ in range(100):
                if client.value() or peers.streams:
                    break
                await other.locate("-")  # a round trip to Redis: the front's look-up is answered by now
            return client.value()

        self.assertIn(b"502 Bad Gateway", await answered(relay.request(f"nobody.{DOMAIN}")))
        self.assertIn(b"tunnel not found", await answered(relay.request(f"nobody.{DOMAIN}")))
        forged = (f"GET /x HTTP/1.1\r\nHost: held.{DOMAIN}\r\nX-Mcpr-Cluster-Secret: forged\r\n"
                  "X-Mcpr-Subdomain: other\r\n\r\n").encode()
        self.assertEqual(await answered(relay.request_bytes(forged)), b"")
        self.assertEqual([(n, s, r.path) for n, s, r in peers.streams], [(NODE_B, "held", b"/x")])
        forwarded = dict(peers.streams[0][2].headers)
        self.assertEqual(forwarded[b"host"], f"held.{DOMAIN}".encode())
        self.assertNotIn(b"x-mcpr-cluster-secret", forwarded)  # a public client's claims stop at the edge
        self.assertNotIn(b"x-mcpr-subdomain", forwarded)

        redis.stop()
        await sleep(LOCATION_TTL)  # the front no longer remembers where "held" is
        client = relay.request(f"held.{DOMAIN}")
        for _ in range(100):
            if client.value():
                break
            await sleep(0.02)
        self.assertIn(b"503 Service Unavailable", client.value())
        self.assertIn(b"cluster registry unavailable", client.value())

    async def test_a_moved_tunnel_is_found_again_at_once(self) -> None:
        """The node a forwarded request was sent to says it does not hold the tunnel (its gateway
        moved since the name was looked up): the request goes once more, to the node the directory
        names now, and the public client sees only that answer."""
        redis, relay, peers = self.node_a()
        b = Directory(redis_connection(redis.url, reactor, timeout=0.5), NODE_B, ttl=5, grace=30, timeout=0.5,
                      clock=reactor)
        self.addCleanup(b.close)
        c = Directory(redis_connection(redis.url, reactor, timeout=0.5), NODE_C, ttl=5, grace=30, timeout=0.5,
                      clock=reactor)
        self.addCleanup(c.close)
        await b.claim("moving", OWNER, assigned=False)

        async def forwarded(count: int) -> None:
            for _ in range(100):
                if len(peers.streams) >= count:
                    return
                await b.locate("-")  # a round trip to Redis
            self.fail(f"{count} forwarded stream(s) expected, got {len(peers.streams)}")

        first = relay.request(f"moving.{DOMAIN}")
        await forwarded(1)
        peers.sinks[0].head(200, [])
        peers.sinks[0].end()
        self.assertIn(b"200 OK", first.value())

        await c.claim("moving", OWNER, assigned=False)  # the gateway moved to C; A still remembers B
        client = relay.request(f"moving.{DOMAIN}")
        await forwarded(2)
        self.assertEqual(peers.streams[1][0], NODE_B)
        peers.sinks[1].head(502, [(NOT_HELD, b"1"), (b"content-type", b"text/plain")])
        peers.sinks[1].data(b"tunnel not found\n")
        peers.sinks[1].end()
        await forwarded(3)
        self.assertEqual(peers.streams[2][0], NODE_C)
        self.assertEqual(client.value(), b"")  # the first answer was not passed on
        peers.sinks[2].head(200, [(b"content-type", b"text/plain")])
        peers.sinks[2].data(b"from C")
        peers.sinks[2].end()
        self.assertIn(b"200 OK", client.value())
        self.assertIn(b"from C", client.value())

        # C turns it away too (moved again, and the directory is behind): asked once more only,
        # and the 502 reaches the client without the internal mark.
        client = relay.request(f"moving.{DOMAIN}")
        await forwarded(4)
        peers.sinks[3].head(502, [(NOT_HELD, b"1")])
        peers.sinks[3].end()
        await forwarded(5)
        peers.sinks[4].head(502, [(NOT_HELD, b"1")])
        peers.sinks[4].end()
        self.assertIn(b"502 Bad Gateway", client.value())
        self.assertNotIn(NOT_HELD, client.value().lower())
        self.assertEqual(len(peers.streams), 5)
