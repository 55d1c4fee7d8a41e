"""Three relay processes on one real Redis: a tunnel held by one node is served through the others.

Every part is a real process on loopback: redis-server, three `twist
mcpr-relay --cluster` nodes (each with its own public port, internal listener
and metrics), `twist mcpr` gateways or the test's legacy-protocol gateways,
the example MCP server or the bulk upstream, and the official SDK client.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone, readBody
from twisted.web.http_headers import Headers

from mcpr.common.protocol import CloseCode
from mcpr.relay.cluster.directory import Directory, redis_connection
from mcpr.relay.cluster.node import LOCATION_TTL
from tests.e2e.test_tunnel import Drain, sse_status
from tests.support.legacy_gateway import LegacyGateway, refused
from tests.support.loopback import client_agent, sleep
from tests.support.processes import ROOT, PeakRSS, Process, free_port, python, run_session, start_upstream, twist
from tests.support.redis import RedisServer

DOMAIN = "localhost"
SECRET = "cluster-secret-for-tests-0123456789"


class Node:
    """One relay node: its process and ports."""

    def __init__(self, testcase: TestCase, name: str, redis: str, *extra: str, public: int | None = None,
                 listen: str | None = None) -> None:
        self.name = name
        self.port = public or free_port()
        self.internal = free_port()
        self.metrics = free_port()
        self.args = ["mcpr-relay", "--domain", DOMAIN,
                     "--listen", listen or f"tcp:{self.port}:interface=127.0.0.1",
                     "--public-url", f"http://*.{DOMAIN}",
                     "--metrics", f"tcp:{self.metrics}:interface=127.0.0.1",
                     "--cluster", redis, "--node-url", f"http://127.0.0.1:{self.internal}",
                     "--cluster-ttl", "3", "--max-request-body", "200MiB", *extra]
        self.testcase = testcase
        self.process = self.start()

    def start(self) -> Process:
        process = Process(self.testcase, twist(*self.args), name=f"relay-{self.name}",
                          env={"MCPR_CLUSTER_SECRET": SECRET})
        process.wait_for("internal listener on")
        self.process = process
        return process

    async def counter(self, name: str, **labels: str) -> float:
        """A metric's value on this node (0 when it has no sample yet)."""
        response = await client_agent(self.testcase).request(b"GET", f"http://127.0.0.1:{self.metrics}/metrics".encode())
        text = (await readBody(response)).decode()
        selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = rf"^{re.escape(name)}{re.escape('{' + selector + '}') if selector else ''} (\S+)$"
        match = re.search(pattern, text, re.M)
        return float(match.group(1)) if match else 0.0


class ClusterTestBase(TestCase):
    timeout = 120

    def mktemp_dir(self) -> str:
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return str(path)

    def cluster(self, n: int = 3, *extra: str) -> tuple[RedisServer, list[Node]]:
        redis = RedisServer(self)
        return redis, [Node(self, "ABC"[i], redis.url, *extra) for i in range(n)]

    async def public(self, node: Node, host: str, path: str, method: bytes = b"GET", body=None,
                     headers: dict | None = None):
        h = Headers({b"host": [host.encode()]})
        for k, v in (headers or {}).items():
            h.setRawHeaders(k.encode(), [v.encode()])
        return await client_agent(self).request(method, f"http://127.0.0.1:{node.port}{path}".encode(), h, body)

    async def register(self, node: Node, token: str, subdomain: str) -> LegacyGateway:
        gateway = LegacyGateway(node.port, token, subdomain)
        self.addCleanup(gateway.close)
        await gateway.connect()
        return gateway

    async def answered_by(self, node: Node, gateway: LegacyGateway, host: str, text: bytes) -> None:
        """A public request through `node` reaches `gateway`'s socket and its answer comes back."""
        pending = Deferred.fromCoroutine(self.public(node, host, "/who"))
        request = await gateway.requests.get()
        gateway.respond(request, 200, text)
        response = await pending
        self.assertEqual((response.code, await readBody(response)), (200, text))


class ClusterServingTests(ClusterTestBase):
    async def test_a_tunnel_on_one_node_is_served_through_the_others(self) -> None:
        """An SDK session (with SSE) and a 100 MiB download through nodes B and C of a tunnel on A;
        unknown names are still 502; the forwarded requests are counted on both sides."""
        _, (a, b, c) = self.cluster()
        _, upstream = start_upstream(self)
        gateway = Process(self, twist("mcpr", "--mcp", upstream, "--listen", "tcp:0:interface=127.0.0.1",
                                      "--relay-url", f"http://127.0.0.1:{a.port}", "--subdomain", "shared"),
                          name="gateway", cwd=self.mktemp_dir(), env={"MCPR_TUNNEL_TOKEN": "sdk-owner"})
        gateway.wait_for("Tunnel: ")
        host = f"shared.{DOMAIN}"
        for node in (b, c):
            result = await run_session(f"http://127.0.0.1:{node.port}/mcp", "--header", f"Host: {host}")
            self.assertEqual(result["add_result"], 5, node.name)
            self.assertTrue(result["progress_streamed"], node.name)
            self.assertEqual(result["get_stream_notification"], "notifications/resources/list_changed")
        self.assertGreater(await b.counter("mcpr_relay_cluster_forwarded_total", direction="out"), 0)
        self.assertGreater(await c.counter("mcpr_relay_cluster_forwarded_total", direction="out"), 0)
        self.assertGreater(await a.counter("mcpr_relay_cluster_forwarded_total", direction="in"), 0)
        self.assertEqual(await a.counter("mcpr_relay_cluster_forwarded_total", direction="out"), 0)

        missing = await self.public(b, f"nobody.{DOMAIN}", "/")
        self.assertEqual((missing.code, await readBody(missing)), (502, b"tunnel not found\n"))

    async def test_a_100_mib_download_and_a_cancelled_stream_through_another_node(self) -> None:
        """Bounded memory on both nodes; a client that leaves is gone at the upstream too."""
        _, (a, b) = self.cluster(2)
        bulk = Process(self, python(str(ROOT / "tests" / "support" / "bulk_server.py")), name="bulk")
        bulk_port = int(bulk.wait_for("LISTENING").split()[-1])
        gateway = Process(self, twist("mcpr", "--mcp", f"http://127.0.0.1:{bulk_port}/mcp", "--listen",
                                      "tcp:0:interface=127.0.0.1", "--relay-url", f"http://127.0.0.1:{a.port}",
                                      "--subdomain", "bulk", "--no-store"),
                          name="gateway", cwd=self.mktemp_dir(), env={"MCPR_TUNNEL_TOKEN": "bulk-owner"})
        gateway.wait_for("Tunnel: ")
        size = 100 << 20
        rss = {"owner": PeakRSS(a.process.popen.pid), "forwarder": PeakRSS(b.process.popen.pid)}
        started = time.monotonic()
        response = await self.public(b, f"bulk.{DOMAIN}", f"/bulk?size={size}")
        drain = Drain()
        response.deliverBody(drain)
        await drain.done
        elapsed = time.monotonic() - started
        self.assertTrue(drain.reason.check(ResponseDone), drain.reason)
        self.assertEqual(drain.size, size)
        self.assertEqual(drain.digest.hexdigest(), hashlib.sha256(b"x" * size).hexdigest())
        grew = {name: sampler.stop() for name, sampler in rss.items()}
        print(f"\n100 MiB through a second node: {size / elapsed / 1e6:.0f} MB/s; RSS growth MiB {grew}")
        for name, mib in grew.items():
            self.assertLess(mib, 40, f"the {name} node's RSS grew by {mib} MiB moving 100 MiB")

        # A public client that leaves an SSE stream on node B ends it at the upstream behind node A.
        response = await self.public(b, f"bulk.{DOMAIN}", "/mcp", headers={"accept": "text/event-stream"})
        stream = Drain()
        response.deliverBody(stream)
        await stream.first
        self.assertEqual(await sse_status(self, bulk_port), {"sse_open": 1, "sse_closed": 0})
        stream.transport.stopProducing()
        self.assertEqual(await sse_status(self, bulk_port, closed=1), {"sse_open": 0, "sse_closed": 1})



class ClusterOwnershipTests(ClusterTestBase):
    async def test_owner_takes_over_across_nodes_and_strangers_are_refused(self) -> None:
        _, (a, b, c) = self.cluster()
        host = f"owned.{DOMAIN}"
        first = await self.register(a, "owner-token", "owned")
        await self.answered_by(c, first, host, b"first")

        stranger = await refused(c.port, "stranger-token", "owned")
        self.assertEqual(stranger.code, CloseCode.IN_USE)

        second = await self.register(b, "owner-token", "owned")
        code, _ = await first.closed
        self.assertEqual(code, CloseCode.EVICTED)
        for node in (a, b, c):
            await self.answered_by(node, second, host, b"second via " + node.name.encode())

        # A's internal listener serves only A's own tunnels: a request for one held by B is not sent
        # on (no loops, whatever the directory says); one without the secret is refused.
        async def internal(node: Node, secret: str) -> tuple[int, bytes]:
            headers = Headers({b"host": [host.encode()], b"x-mcpr-cluster-secret": [secret.encode()],
                               b"x-mcpr-subdomain": [b"owned"]})
            response = await client_agent(self).request(b"GET", f"http://127.0.0.1:{node.internal}/who".encode(),
                                                        headers)
            return response.code, await readBody(response)

        self.assertEqual(await internal(a, SECRET), (502, b"tunnel not found\n"))
        self.assertEqual((await internal(b, "not-the-secret-0123456789"))[0], 403)

        # Dropped: the name stays reserved for its owner on every node.
        await second.close()
        stranger = await refused(a.port, "stranger-token", "owned")
        self.assertEqual(stranger.code, CloseCode.IN_USE)
        self.assertIn("reserved", stranger.reason)
        back = await self.register(c, "owner-token", "owned")
        await self.answered_by(a, back, host, b"back")


class ClusterFailureTests(ClusterTestBase):
    async def test_a_killed_node_loses_only_its_tunnels_and_its_gateway_gets_its_url_back(self) -> None:
        """Nodes A and B share one public port (SO_REUSEPORT, as behind a load balancer); the
        gateway's node is killed, and within 5 s it is registered on the other with the same URL."""
        redis = RedisServer(self)
        shared = free_port()
        listen = f"reuseport:{shared}:interface=127.0.0.1"
        a = Node(self, "A", redis.url, public=shared, listen=listen)
        b = Node(self, "B", redis.url, public=shared, listen=listen)
        c = Node(self, "C", redis.url)
        bystander = await self.register(c, "bystander-token", "bystander")
        _, upstream = start_upstream(self)
        gateway = Process(self, twist("mcpr", "--mcp", upstream, "--listen", "tcp:0:interface=127.0.0.1",
                                      "--relay-url", f"http://127.0.0.1:{shared}", "--subdomain", "moving"),
                          name="gateway", cwd=self.mktemp_dir(), env={"MCPR_TUNNEL_TOKEN": "moving-owner"})
        url = re.search(r"Tunnel: (\S+)", gateway.wait_for("Tunnel: ")).group(1)
        holder, other = (a, b) if await a.counter("mcpr_relay_tunnels_connected") == 1 else (b, a)
        self.assertEqual(await holder.counter("mcpr_relay_tunnels_connected"), 1)
        result = await run_session(f"http://127.0.0.1:{c.port}/mcp", "--header", f"Host: moving.{DOMAIN}")
        self.assertEqual(result["add_result"], 5)

        holder.process.popen.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while await other.counter("mcpr_relay_tunnels_connected") < 1:
            self.assertLess(time.monotonic() - killed, 5, "the gateway did not get its name back within 5 s")
            await sleep(0.1)
        print(f"\nre-registered on the other node {time.monotonic() - killed:.2f} s after the kill")
        result = await run_session(f"http://127.0.0.1:{c.port}/mcp", "--header", f"Host: moving.{DOMAIN}")
        self.assertEqual(result["add_result"], 5)
        self.assertIn(f"Tunnel: {url}", gateway.output())
        await self.answered_by(other, bystander, f"bystander.{DOMAIN}", b"unaffected")

    async def test_a_draining_node_gives_its_names_back_first(self) -> None:
        """SIGTERM: the node releases its names in Redis before it stops listening, so the other
        nodes answer "not found" (not "unreachable") at once, and the names stay their owners'."""
        _, (a, b) = self.cluster(2)
        held = await self.register(a, "draining-token", "draining")
        await self.answered_by(b, held, f"draining.{DOMAIN}", b"before")
        a.process.popen.send_signal(signal.SIGTERM)
        code, _ = await held.closed
        self.assertEqual(code, CloseCode.GOING_AWAY)
        response = await self.public(b, f"draining.{DOMAIN}", "/who")
        self.assertEqual((response.code, await readBody(response)), (502, b"tunnel not found\n"))
        stranger = await refused(b.port, "stranger-token", "draining")
        self.assertIn("reserved", stranger.reason)
        back = await self.register(b, "draining-token", "draining")
        await self.answered_by(b, back, f"draining.{DOMAIN}", b"back on B")

    async def test_a_gateway_gone_while_its_claim_waits_on_redis_leaves_nothing_behind(self) -> None:
        """Redis hangs while a registration's claim waits on it; the gateway hangs up; Redis comes
        back: the claim that then succeeds is given back (no tunnel, no live claim), the name is
        its owner's again at once, and no stranger's."""
        redis, (a, b) = self.cluster(2)
        redis.freeze()
        gateway = LegacyGateway(a.port, "impatient-token", "impatient")
        connecting = Deferred.fromCoroutine(gateway.connect())
        connecting.addErrback(lambda _: None)  # closed by the test, unregistered
        await sleep(0.3)  # the hello is in, the claim waits on Redis
        gateway.proto.dropConnection(abort=True)
        await gateway.closed
        redis.thaw()
        await sleep(0.5)
        self.assertEqual(await a.counter("mcpr_relay_tunnels_connected"), 0)
        connection = redis_connection(redis.url, reactor)
        self.addCleanup(connection.disconnect)
        directory = Directory(connection, "http://127.0.0.1:1", grace=600, clock=reactor)
        self.assertIsNone(await directory.locate("impatient"))  # released, not left to expire
        stranger = await refused(b.port, "stranger-token", "impatient")
        self.assertEqual(stranger.code, CloseCode.IN_USE)
        back = await self.register(b, "impatient-token", "impatient")
        await self.answered_by(a, back, f"impatient.{DOMAIN}", b"registered once, cleanly")

    async def test_redis_restart(self) -> None:
        """Redis down: the nodes serve what they hold, refuse new registrations with 1013 and
        answer 503 for tunnels held elsewhere; back (empty), everything works again."""
        redis, (a, b) = self.cluster(2)
        held = await self.register(a, "held-token", "held")
        await self.answered_by(b, held, f"held.{DOMAIN}", b"before")

        redis.stop()
        await self.answered_by(a, held, f"held.{DOMAIN}", b"local, redis down")
        refusal = await refused(b.port, "new-token", "newcomer")
        self.assertEqual(refusal.code, CloseCode.TRY_AGAIN_LATER)
        await sleep(LOCATION_TTL)  # B no longer remembers where the tunnel was
        response = await self.public(b, f"held.{DOMAIN}", "/who")
        self.assertEqual((response.code, await readBody(response)), (503, b"cluster registry unavailable\n"))
        while await b.counter("mcpr_relay_cluster_registry_up") != 0:
            await sleep(0.2)
        health = await self.public(b, "127.0.0.1", "/healthz")
        self.assertEqual(health.code, 200)  # degraded, not out of service: B still serves what it holds
        self.assertEqual(json.loads(await readBody(health))["cluster"],
                         {"node": f"http://127.0.0.1:{b.internal}", "registry": "down"})

        redis.start()  # empty: the heartbeat writes the held names again
        deadline = time.monotonic() + 10
        while await a.counter("mcpr_relay_cluster_registry_up") != 1:
            self.assertLess(time.monotonic(), deadline, "node A did not see Redis back within 10 s")
            await sleep(0.2)
        await self.answered_by(b, held, f"held.{DOMAIN}", b"after")
        health = json.loads(await readBody(await self.public(a, "127.0.0.1", "/healthz")))
        self.assertEqual((health["status"], health["cluster"]["registry"], health["tunnels"]), ("ok", "up", 1))
        newcomer = await self.register(b, "new-token", "newcomer")
        await self.answered_by(a, newcomer, f"newcomer.{DOMAIN}", b"new after the restart")
