"""Pooled sockets end to end: the real relay and gateway processes, the official SDK as client and
server, and the relay's metrics to tell which carrier each request took."""

from __future__ import annotations

import io
import re
from pathlib import Path

from twisted.internet.defer import Deferred, gatherResults
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from tests.e2e.test_relay_ops import port_after
from tests.e2e.test_tunnel import DOMAIN, TunnelTestBase
from tests.support.certificates import escape, localhost_certificates
from tests.support.loopback import client_agent, sleep
from tests.support.processes import Process, free_port, run_session, start_upstream, twist


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"{name} not in the relay's metrics")
    return float(match.group(1))


class MetricsBase(TunnelTestBase):
    relay_args = ("--metrics", "tcp:0:interface=127.0.0.1")

    async def metrics(self, port: int) -> str:
        response = await client_agent(self).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        return (await readBody(response)).decode()

    async def sockets_open(self, port: int, expected: float) -> str:
        for _ in range(100):
            text = await self.metrics(port)
            if metric(text, "mcpr_relay_pooled_sockets") == expected:
                return text
            await sleep(0.05)
        raise AssertionError(f"pooled sockets never reached {expected}: {text}")


class PooledSocketTests(MetricsBase):

    async def test_a_session_takes_the_pooled_sockets(self) -> None:
        relay, relay_port = self.start_relay(None, "--tunnel-pool", "2")
        metrics_port = port_after(relay, "metrics on")
        _, upstream = start_upstream(self)
        _, url, _ = self.start_gateway(upstream, relay_port)  # asks for 8; the relay allows 2
        await self.sockets_open(metrics_port, 2.0)
        result = await run_session(f"http://127.0.0.1:{relay_port}/mcp", "--header", f"Host: {self.host(url)}")
        self.assertEqual(result["add_result"], 5)
        self.assertTrue(result["progress_streamed"], "an SSE response streams through a pooled socket")
        self.assertTrue(result["deleted"])
        text = await self.metrics(metrics_port)
        # The session's GET stream holds one socket while it is open, and a tool call with progress
        # another: requests beside them took a stream.  None failed.
        pooled = metric(text, "mcpr_relay_pooled_requests_total")
        total = metric(text, 'mcpr_relay_requests_total{status_class="2xx"}')
        self.assertGreaterEqual(pooled, 3)
        self.assertLessEqual(pooled, total)
        self.assertEqual(metric(text, 'mcpr_relay_requests_total{status_class="5xx"}'), 0.0)

    async def test_without_a_pool_the_tunnel_carries_everything(self) -> None:
        relay, relay_port = self.start_relay()
        metrics_port = port_after(relay, "metrics on")
        _, upstream = start_upstream(self)
        _, url, _ = self.start_gateway(upstream, relay_port, "--tunnel-pool", "0")
        result = await run_session(f"http://127.0.0.1:{relay_port}/mcp", "--header", f"Host: {self.host(url)}")
        self.assertEqual(result["add_result"], 5)
        text = await self.metrics(metrics_port)
        self.assertEqual(metric(text, "mcpr_relay_pooled_sockets"), 0.0)
        self.assertEqual(metric(text, "mcpr_relay_pooled_requests_total"), 0.0)

    async def test_the_pool_reopens_after_the_relay_restarts(self) -> None:
        relay, relay_port = self.start_relay(None, "--tunnel-pool", "3")
        _, upstream = start_upstream(self)
        gateway, url, _ = self.start_gateway(upstream, relay_port)
        await self.sockets_open(port_after(relay, "metrics on"), 3.0)
        relay.stop()
        relay, _ = self.start_relay(relay_port, "--tunnel-pool", "3")
        metrics_port = port_after(relay, "metrics on")
        await self.sockets_open(metrics_port, 3.0)
        response = await self.public(relay_port, url, "/mcp", headers={"accept": "text/event-stream"})
        await readBody(response)
        self.assertEqual(metric(await self.metrics(metrics_port), "mcpr_relay_pooled_requests_total"), 1.0)


class PoolGrowthTests(MetricsBase):
    async def test_a_busy_tunnel_gets_more_pooled_sockets(self) -> None:
        relay, relay_port = self.start_relay()
        metrics_port = port_after(relay, "metrics on")
        _, url, _ = self.start_gateway(f"http://127.0.0.1:{self.start_bulk()}/mcp", relay_port)
        await self.sockets_open(metrics_port, 4.0)
        agent = client_agent(self)
        for _ in range(3):  # waves of 24 requests that each hold their carrier for 300 ms
            responses = await gatherResults([Deferred.fromCoroutine(self.public(relay_port, url, "/slow?ms=300", agent=agent))
                                             for _ in range(24)])
            self.assertEqual([r.code for r in responses], [200] * 24)
            await gatherResults([readBody(r) for r in responses])
        text = await self.metrics(metrics_port)
        self.assertGreaterEqual(metric(text, "mcpr_relay_pooled_sockets"), 16, "4, asked for 8, 16, 32")
        self.assertLessEqual(metric(text, "mcpr_relay_pooled_sockets"), 64)
        self.assertGreater(metric(text, "mcpr_relay_pooled_requests_total"), 24)


class SecurePooledSocketTests(MetricsBase):
    """Over TLS the pooled sockets are TLS too, to the name the gateway verified."""

    async def test_pooled_sockets_over_tls(self) -> None:
        certs, trust = localhost_certificates(Path(self.mktemp()).resolve())
        tls_port = free_port()
        relay, plain_port = self.start_relay(None, "--listen", f"tls:{escape(certs)}:port={tls_port}:interface=127.0.0.1")
        metrics_port = port_after(relay, "metrics on")
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir(parents=True)
        gateway = Process(self, twist("mcpr", "--mcp", "http://127.0.0.1:1/mcp", "--listen", "tcp:0:interface=127.0.0.1",
                                      "--relay-url", f"https://localhost:{tls_port}", "--subdomain", "secure"),
                          name="gateway", cwd=str(cwd), env={"MCPR_TUNNEL_TOKEN": "wss-token", "SSL_CERT_FILE": str(trust)})
        gateway.wait_for("Tunnel: ")
        await self.sockets_open(metrics_port, 4.0)  # the first 4; more come when needed
        # The gateway's upstream (port 1) is down: the 502 is the gateway's own JSON-RPC error.
        response = await client_agent(self).request(
            b"POST", f"http://127.0.0.1:{plain_port}/mcp".encode(),
            Headers({b"host": [f"secure.{DOMAIN}".encode()], b"content-type": [b"application/json"]}),
            FileBodyProducer(io.BytesIO(b'{"jsonrpc":"2.0","id":7,"method":"tools/list"}')))
        body = await readBody(response)
        self.assertEqual(response.code, 502)
        self.assertIn(b'"id": 7', body.replace(b'"id":7', b'"id": 7'))
        self.assertEqual(metric(await self.metrics(metrics_port), "mcpr_relay_pooled_requests_total"), 1.0)
