"""End to end through relay -> tunnel -> gateway -> upstream, every part a real process on loopback."""

from __future__ import annotations

import hashlib
import io
import json
import re
import signal
import ssl
import stat
import time
import urllib.request
from pathlib import Path

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, ResponseDone, readBody
from twisted.web.http_headers import Headers

from tests.support.certificates import escape, localhost_certificates
from tests.support.legacy_gateway import LegacyGateway
from tests.support.loopback import client_agent, sleep
from tests.support.processes import ROOT, PeakRSS, Process, free_port, python, run_session, start_upstream, twist

DOMAIN = "localhost"


class Drain(Protocol):
    """Reads a body without keeping it: size and digest only."""

    def __init__(self) -> None:
        self.size = 0
        self.digest = hashlib.sha256()
        self.done: Deferred = Deferred()
        self.first: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        self.digest.update(data)
        if not self.first.called:
            self.first.callback(data)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback(None)


class _Zeros(io.RawIOBase):
    """A large request body that exists only as it is read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: offset, 1: self.position + offset, 2: self.size + offset}[whence]
        return self.position

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.position))
        buffer[:n] = b"\0" * n
        self.position += n
        return n


async def sse_status(testcase: TestCase, port: int, closed: int = 0) -> dict:
    """The bulk upstream's SSE counts, once at least `closed` of its streams have closed."""
    response = await client_agent(testcase).request(b"GET", f"http://127.0.0.1:{port}/status?closed={closed}".encode())
    return json.loads(await readBody(response))


class TunnelTestBase(TestCase):
    """Starts the relay, gateway and upstream processes of a tunnel test, and makes public requests."""

    timeout = 120
    relay_args: tuple[str, ...] = ()

    def start_relay(self, port: int | None = None, *extra: str) -> tuple[Process, int]:
        port = port or free_port()
        relay = Process(self, twist("mcpr-relay", "--domain", DOMAIN, "--listen", f"tcp:{port}:interface=127.0.0.1",
                                    "--public-url", f"http://*.{DOMAIN}:{port}", *self.relay_args, *extra),
                        name="relay")
        relay.wait_for("listening on")
        return relay, port

    def start_gateway(self, mcp: str, relay_port: int, *extra: str, env: dict | None = None,
                      cwd: Path | None = None, relay_url: str = "http://127.0.0.1:{port}") -> tuple[Process, str, Path]:
        if cwd is None:
            cwd = Path(self.mktemp()).resolve()
            cwd.mkdir(parents=True)
        gateway = Process(self, twist("mcpr", "--mcp", mcp, "--listen", "tcp:0:interface=127.0.0.1",
                                      "--relay-url", relay_url.format(port=relay_port), *extra),
                          name="gateway", cwd=str(cwd), env=env)
        url = re.search(r"Tunnel: (\S+)", gateway.wait_for("Tunnel: ")).group(1)
        return gateway, url, cwd

    def start_bulk(self) -> int:
        bulk = Process(self, python(str(ROOT / "tests" / "support" / "bulk_server.py")), name="bulk")
        return int(bulk.wait_for("LISTENING").split()[-1])

    def host(self, url: str) -> str:
        return url.split("://", 1)[1]

    async def public(self, relay_port: int, url: str, path: str, method: bytes = b"GET", body=None,
                     headers: dict | None = None, agent=None):
        h = Headers({b"host": [self.host(url).encode()]})
        for k, v in (headers or {}).items():
            h.setRawHeaders(k.encode(), [v.encode()])
        agent = agent or client_agent(self)
        return await agent.request(method, f"http://127.0.0.1:{relay_port}{path}".encode(), h, body)


class TunnelSessionTests(TunnelTestBase):
    """MCP sessions through a tunnel: the SDK client, the token file, legacy beside h2, concurrency."""

    async def test_full_sdk_session_and_token_file(self) -> None:
        relay, relay_port = self.start_relay()
        _, upstream = start_upstream(self)
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir(parents=True)
        (cwd / "mcpr.toml").write_text("# my settings\n[csp]  # kept\nmode = \"extend\"\n")
        events = cwd / "events.jsonl"
        gateway, url, _ = self.start_gateway(upstream, relay_port, "--events", str(events), cwd=cwd)
        self.assertRegex(url, rf"^http://[0-9a-f]{{12}}\.{DOMAIN}:{relay_port}$")

        saved = (cwd / "mcpr.toml").read_text()
        self.assertTrue(saved.startswith("# my settings\n[csp]  # kept\nmode = \"extend\"\n"), saved)
        token = re.search(r'token = "(mcpr_[0-9a-f]{64})"', saved).group(1)
        self.assertEqual(stat.S_IMODE((cwd / "mcpr.toml").stat().st_mode), 0o600)
        self.assertNotIn(token, gateway.output() + relay.output())

        result = await run_session(f"http://127.0.0.1:{relay_port}/mcp", "--header", f"Host: {self.host(url)}")
        self.assertEqual(result["add_result"], 5)
        self.assertTrue(result["progress_before_result"])
        self.assertTrue(result["progress_streamed"])
        self.assertEqual(result["get_stream_notification"], "notifications/resources/list_changed")
        self.assertTrue(result["deleted"])
        self.assertIn("Hello", result["resource_text"])
        self.assertTrue(result["prompt_messages"])

        lines = [json.loads(line) for line in events.read_text().splitlines()]
        requests = [e for e in lines if e["type"] == "request"]
        self.assertTrue(requests)
        self.assertEqual({e["via"] for e in requests}, {"tunnel"})
        self.assertEqual({e["session_id"] for e in requests}, {result["session_id"]})
        states = [e["state"] for e in lines if e["type"] == "tunnel"]
        self.assertIn("connected", states)

        # The same token gets the same URL after a restart of the gateway.
        gateway.stop()
        _, again, _ = self.start_gateway(upstream, relay_port, cwd=cwd)
        self.assertEqual(again, url)

    async def test_relay_url_forms(self) -> None:
        """ws://, the status page's ws://.../_tunnel/register and a bare HOST:PORT (ws for an IP)
        reach the same plain-HTTP relay as http://."""
        _, relay_port = self.start_relay()
        _, upstream = start_upstream(self)
        page = await self.public(relay_port, f"http://localhost:{relay_port}", "/")
        self.assertIn(f"<code>ws://localhost:{relay_port}/_tunnel/register</code>", (await readBody(page)).decode())
        for form, shown in (("ws://127.0.0.1:{port}", "ws://127.0.0.1:{port}"),
                            ("ws://localhost:{port}/_tunnel/register", "ws://localhost:{port}/_tunnel/register"),
                            ("127.0.0.1:{port}", "ws://127.0.0.1:{port}")):
            gateway, url, _ = self.start_gateway(upstream, relay_port, relay_url=form,
                                                 env={"MCPR_TUNNEL_TOKEN": "forms"})
            self.assertIn(f"connecting to {shown.format(port=relay_port)} ", gateway.output())
            result = await run_session(f"http://127.0.0.1:{relay_port}/mcp", "--header", f"Host: {self.host(url)}")
            self.assertEqual(result["add_result"], 5, form)
            gateway.stop()

    async def test_legacy_and_h2_gateways_side_by_side(self) -> None:
        _, relay_port = self.start_relay()
        bulk = self.start_bulk()
        _, url, _ = self.start_gateway(f"http://127.0.0.1:{bulk}/mcp", relay_port, "--subdomain", "modern")
        legacy = LegacyGateway(relay_port, "legacy-token", "old")
        self.addCleanup(lambda: Deferred.fromCoroutine(legacy.close()))
        await legacy.connect()
        old = Deferred.fromCoroutine(self.public(relay_port, f"http://old.{DOMAIN}:{relay_port}", "/x"))
        legacy.respond(await legacy.requests.get(), 200, b"from the legacy protocol")
        self.assertEqual(await readBody(await old), b"from the legacy protocol")
        response = await self.public(relay_port, url, "/status")
        self.assertEqual(response.code, 200)
        self.assertIn(b"sse_open", await readBody(response))

    async def test_env_token_leaves_the_file_alone(self) -> None:
        _, relay_port = self.start_relay()
        bulk = self.start_bulk()
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir(parents=True)
        _, url, _ = self.start_gateway(f"http://127.0.0.1:{bulk}/mcp", relay_port, cwd=cwd,
                                       env={"MCPR_TUNNEL_TOKEN": "from-the-environment"})
        self.assertFalse((cwd / "mcpr.toml").exists())
        self.assertIn(hashlib.sha256(b"from-the-environment").hexdigest()[:12], url)

    async def test_concurrent_tool_calls_on_one_tunnel(self) -> None:
        _, relay_port = self.start_relay()
        _, upstream = start_upstream(self)
        _, url, _ = self.start_gateway(upstream, relay_port, "--subdomain", "many")
        agent = client_agent(self)
        base = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "load", "version": "1"}}}
        response = await self.public(relay_port, url, "/mcp", b"POST", _body(init), base, agent)
        session = response.headers.getRawHeaders(b"mcp-session-id")[0].decode()
        await readBody(response)
        headers = {**base, "mcp-session-id": session, "mcp-protocol-version": "2025-11-25"}
        response = await self.public(relay_port, url, "/mcp", b"POST",
                                     _body({"jsonrpc": "2.0", "method": "notifications/initialized"}),
                                     headers, agent)
        await readBody(response)

        async def call(i: int) -> dict:
            message = {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                       "params": {"name": "add", "arguments": {"a": i, "b": 1}}}
            response = await self.public(relay_port, url, "/mcp", b"POST", _body(message), headers, agent)
            body = (await readBody(response)).decode()
            data = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
            if not data:
                raise AssertionError(f"call {i}: HTTP {response.code}: {body[:300]!r}")
            return json.loads(data[-1])

        results = await DeferredList([Deferred.fromCoroutine(call(i)) for i in range(1, 201)],
                                     consumeErrors=True)
        failures = [r.getErrorMessage() for ok, r in results if not ok]
        self.assertEqual(failures, [])
        answers = {r["id"]: r["result"]["structuredContent"]["result"] for _, r in results}
        self.assertEqual(answers, {i: i + 1 for i in range(1, 201)})


class TunnelStreamingTests(TunnelTestBase):
    """Bodies through a tunnel: bulk transfers in bounded memory, stalls, aborts, caps, SSE disconnects."""

    relay_args = ("--max-request-body", "200MiB")

    async def test_bulk_download_and_upload_keep_memory_bounded(self) -> None:
        relay, relay_port = self.start_relay()
        bulk = self.start_bulk()
        gateway, url, _ = self.start_gateway(f"http://127.0.0.1:{bulk}/mcp", relay_port,
                                             "--max-request-body", "200MiB", "--subdomain", "bulk")
        size = 100 << 20
        relay_rss, gateway_rss = PeakRSS(relay.popen.pid), PeakRSS(gateway.popen.pid)
        started = time.monotonic()
        response = await self.public(relay_port, url, f"/bulk?size={size}")
        drain = Drain()
        response.deliverBody(drain)
        await drain.done
        download_s = time.monotonic() - started
        self.assertTrue(drain.reason.check(ResponseDone), drain.reason)
        self.assertEqual(drain.size, size)
        self.assertEqual(drain.digest.hexdigest(), hashlib.sha256(b"x" * size).hexdigest())

        started = time.monotonic()
        response = await self.public(relay_port, url, "/sink", b"PUT", FileBodyProducer(_Zeros(size)))
        answer = json.loads(await readBody(response))
        upload_s = time.monotonic() - started
        self.assertEqual(answer["size"], size)
        self.assertEqual(answer["sha256"], hashlib.sha256(b"\0" * size).hexdigest())
        grew = {"relay": relay_rss.stop(), "gateway": gateway_rss.stop()}
        peaks = {"relay": relay_rss.peak // 1024, "gateway": gateway_rss.peak // 1024}
        print(f"\n100 MiB down {size / download_s / 1e6:.0f} MB/s, up {size / upload_s / 1e6:.0f} MB/s; "
              f"RSS growth MiB {grew}, peak MiB {peaks}")
        for name, mib in grew.items():
            self.assertLess(mib, 40, f"{name} RSS grew by {mib} MiB moving 2 x 100 MiB")

    async def test_stalled_stream_does_not_block_others(self) -> None:
        relay, relay_port = self.start_relay()
        bulk = self.start_bulk()
        _, url, _ = self.start_gateway(f"http://127.0.0.1:{bulk}/mcp", relay_port, "--subdomain", "stall")
        relay_rss = PeakRSS(relay.popen.pid)
        response = await self.public(relay_port, url, f"/bulk?size={200 << 20}")
        stalled = Drain()
        response.deliverBody(stalled)
        await stalled.first
        stalled.transport.pauseProducing()  # this public client stops reading
        await sleep(0.5)  # part of what is tested: the stall lasts, the relay must not buffer meanwhile
        started = time.monotonic()
        for _ in range(20):
            response = await self.public(relay_port, url, "/status")
            self.assertEqual(response.code, 200)
            await readBody(response)
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 2.0, "requests beside a stalled stream were held up")
        self.assertLess(relay_rss.stop(), 30, "a stalled reader made the relay buffer its stream")
        stalled.transport.stopProducing()

    async def test_upstream_failure_mid_response_is_an_abort_and_headers_cross_correctly(self) -> None:
        _, relay_port = self.start_relay()
        bulk = self.start_bulk()
        _, url, _ = self.start_gateway(f"http://127.0.0.1:{bulk}/mcp", relay_port, "--subdomain", "hdr")
        response = await self.public(relay_port, url, "/broken")
        drain = Drain()
        response.deliverBody(drain)
        await drain.done
        self.assertFalse(drain.reason.check(ResponseDone), "a broken upstream looked like a clean end")
        response = await self.public(relay_port, url, "/cookies", headers={
            "connection": "x-custom", "x-custom": "hop", "te": "trailers"})
        await readBody(response)
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1; Path=/", b"b=2; Path=/"])
        self.assertEqual(response.headers.getRawHeaders(b"x-echo-custom"), [b""])
        self.assertEqual(response.headers.getRawHeaders(b"x-echo-te"), [b""])

    async def test_gateway_body_cap_applies_to_tunnel_streams(self) -> None:
        _, relay_port = self.start_relay()
        bulk = self.start_bulk()
        gateway, url, _ = self.start_gateway(f"http://127.0.0.1:{bulk}/mcp", relay_port, "--subdomain", "cap",
                                             "--max-request-body", "1MiB")
        response = await self.public(relay_port, url, "/sink", b"PUT", FileBodyProducer(_Zeros(2 << 20)))
        self.assertEqual(response.code, 413)
        self.assertIn(b"larger than 1048576 bytes", await readBody(response))
        response = await self.public(relay_port, url, "/sink", b"PUT", FileBodyProducer(_Zeros(1 << 20)))
        self.assertEqual(json.loads(await readBody(response))["size"], 1 << 20)

    async def test_public_client_leaving_an_sse_stream_reaches_the_upstream(self) -> None:
        _, relay_port = self.start_relay()
        bulk = self.start_bulk()
        _, url, _ = self.start_gateway(f"http://127.0.0.1:{bulk}/mcp", relay_port, "--subdomain", "sse")
        response = await self.public(relay_port, url, "/mcp", headers={"accept": "text/event-stream"})
        drain = Drain()
        response.deliverBody(drain)
        await drain.first
        status = await sse_status(self, bulk)
        self.assertEqual(status, {"sse_open": 1, "sse_closed": 0})
        drain.transport.stopProducing()
        status = await sse_status(self, bulk, closed=1)
        self.assertEqual(status, {"sse_open": 0, "sse_closed": 1})



class TunnelResilienceTests(TunnelTestBase):
    """A tunnel whose relay or gateway dies, freezes or is replaced."""

    relay_args = ("--ping-interval", "1", "--ping-timeout", "1")

    async def test_relay_restart_same_url_within_5_seconds(self) -> None:
        relay, relay_port = self.start_relay()
        bulk = self.start_bulk()
        gateway, url, _ = self.start_gateway(f"http://127.0.0.1:{bulk}/mcp", relay_port)
        response = await self.public(relay_port, url, "/status")
        self.assertEqual(response.code, 200)
        await readBody(response)
        relay.popen.send_signal(signal.SIGKILL)
        await deferToThread(relay.popen.wait)
        relay, _ = self.start_relay(relay_port)
        restarted = time.monotonic()
        await relay.line(" registered (token ", 10)
        response = await self.public(relay_port, url, "/status")
        await readBody(response)
        self.assertEqual(response.code, 200)
        self.assertLess(time.monotonic() - restarted, 5.0, "the URL did not come back within 5 s")
        print(f"\nURL back {time.monotonic() - restarted:.2f} s after the relay restarted")
        self.assertIn("reconnecting", gateway.output())

    async def test_frozen_relay_is_detected_by_pings(self) -> None:
        relay, relay_port = self.start_relay()
        bulk = self.start_bulk()
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir(parents=True)
        (cwd / "mcpr.toml").write_text("[tunnel]\nping_interval = 1\nping_timeout = 1\n")
        gateway, _, _ = self.start_gateway(f"http://127.0.0.1:{bulk}/mcp", relay_port, cwd=cwd,
                                           env={"MCPR_TUNNEL_TOKEN": "frozen"})
        relay.popen.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: relay.popen.poll() is None and relay.popen.send_signal(signal.SIGCONT))
        frozen = time.monotonic()
        await gateway.line("connection to the relay lost", 10)
        # interval + timeout, plus Autobahn's 1-second timer granularity
        self.assertLess(time.monotonic() - frozen, 3.5, "the dead relay was not noticed in time")
        print(f"\ndead relay noticed after {time.monotonic() - frozen:.2f} s (ping 1 s + timeout 1 s)")
        relay.popen.send_signal(signal.SIGCONT)

    async def test_frozen_gateway_is_dropped_by_the_relay(self) -> None:
        relay, relay_port = self.start_relay()
        bulk = self.start_bulk()
        gateway, url, _ = self.start_gateway(f"http://127.0.0.1:{bulk}/mcp", relay_port, "--subdomain", "ice")
        gateway.popen.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: gateway.popen.poll() is None and gateway.popen.send_signal(signal.SIGCONT))
        frozen = time.monotonic()
        await relay.line("tunnel ice disconnected", 10)
        self.assertLess(time.monotonic() - frozen, 3.5, "the relay kept a dead tunnel")
        response = await self.public(relay_port, url, "/status")
        self.assertEqual((response.code, await readBody(response)), (502, b"tunnel not found\n"))
        gateway.popen.send_signal(signal.SIGCONT)

    async def test_eviction_and_subdomain_owned_by_another_token(self) -> None:
        _, relay_port = self.start_relay()
        bulk = self.start_bulk()
        mcp = f"http://127.0.0.1:{bulk}/mcp"
        first, url, _ = self.start_gateway(mcp, relay_port, "--subdomain", "shared", env={"MCPR_TUNNEL_TOKEN": "t1"})
        second, url2, _ = self.start_gateway(mcp, relay_port, "--subdomain", "shared",
                                             env={"MCPR_TUNNEL_TOKEN": "t1"})
        self.assertEqual(url, url2)
        await first.line("tunnel stopped", 10)
        self.assertIn("another gateway registered with the same token", first.output())
        third = Process(self, twist("mcpr", "--mcp", mcp, "--listen", "tcp:0:interface=127.0.0.1",
                                    "--relay-url", f"http://127.0.0.1:{relay_port}", "--subdomain", "shared"),
                        name="third", env={"MCPR_TUNNEL_TOKEN": "t2"})
        # Not final (S4): the name may come free, so the gateway says so once and keeps trying.
        await third.line("is taken on this relay", 10)
        self.assertIn("subdomain in use by another token", third.output())
        self.assertNotIn("tunnel stopped", third.output())
        self.assertIsNone(third.popen.poll(), "the gateway keeps serving locally")
        response = await self.public(relay_port, url, "/status")
        self.assertEqual(response.code, 200)
        await readBody(response)
        self.assertNotIn("tunnel stopped", second.output())


def _body(message: dict) -> FileBodyProducer:
    return FileBodyProducer(io.BytesIO(json.dumps(message).encode()))


class SecureRelayTests(TunnelTestBase):
    """`--relay-url https://...`: the tunnel runs over wss and the gateway verifies the relay's name."""

    def start_tls_relay(self) -> tuple[int, Path]:
        certs, trust = localhost_certificates(Path(self.mktemp()).resolve())
        port = free_port()
        relay = Process(self, twist("mcpr-relay", "--domain", DOMAIN, "--public-url", f"https://*.{DOMAIN}:{port}",
                                    "--listen", f"tls:{escape(certs)}:port={port}:interface=127.0.0.1"),
                        name="relay")
        relay.wait_for("listening on")
        return port, trust

    def gateway(self, port: int, env: dict, relay_url: str = "https://localhost:{port}") -> Process:
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir(parents=True)
        return Process(self, twist("mcpr", "--mcp", "http://127.0.0.1:1/mcp", "--listen", "tcp:0:interface=127.0.0.1",
                                   "--relay-url", relay_url.format(port=port), "--subdomain", "secure"),
                       name="gateway", cwd=str(cwd), env={"MCPR_TUNNEL_TOKEN": "wss-token", **env})

    def test_wss_with_a_trusted_certificate(self):
        port, trust = self.start_tls_relay()
        gateway = self.gateway(port, {"SSL_CERT_FILE": str(trust)})
        line = gateway.wait_for("Tunnel: ")
        self.assertIn(f"Tunnel: https://secure.{DOMAIN}:{port}", line)

    def test_wss_url_as_the_status_page_shows_it(self):
        """The status page over TLS names the wss:// URL (with the port), which a gateway takes as it is."""
        port, trust = self.start_tls_relay()
        context = ssl.create_default_context(cafile=str(trust))
        with urllib.request.urlopen(f"https://localhost:{port}/", context=context, timeout=10) as page:
            shown = re.search(r"Gateways connect to <code>(\S+)</code>", page.read().decode()).group(1)
        self.assertEqual(shown, f"wss://localhost:{port}/_tunnel/register")
        gateway = self.gateway(port, {"SSL_CERT_FILE": str(trust)}, relay_url=shown)
        self.assertIn(f"Tunnel: https://secure.{DOMAIN}:{port}", gateway.wait_for("Tunnel: "))

    def test_wss_refuses_an_untrusted_certificate(self):
        port, _ = self.start_tls_relay()
        gateway = self.gateway(port, {"SSL_CERT_FILE": "/nonexistent"})
        gateway.wait_for("reconnecting in")
        self.assertNotIn("Tunnel: ", gateway.output())
        self.assertIn("certificate verify failed", gateway.output())

    async def test_https_upstream_is_verified(self) -> None:
        """The gateway's forwarder to an https MCP server (here the TLS relay's own pages) checks its name."""
        port, trust = self.start_tls_relay()
        results = {}
        for name, env in (("trusted", {"SSL_CERT_FILE": str(trust)}), ("untrusted", {"SSL_CERT_FILE": "/nonexistent"})):
            gateway = Process(self, twist("mcpr", "--mcp", f"https://localhost:{port}/mcp", "--listen",
                                          "tcp:0:interface=127.0.0.1"), name=f"gateway-{name}", env=env)
            line = gateway.wait_for(f" -> https://localhost:{port}/mcp")
            address = re.search(r"http://(127\.0\.0\.1:\d+)", line).group(1)
            response = await client_agent(self).request(b"GET", f"http://{address}/".encode())
            results[name] = (response.code, await readBody(response))
        self.assertEqual(results["trusted"][0], 200)
        self.assertIn(b"mcpr relay", results["trusted"][1])
        self.assertEqual(results["untrusted"][0], 502)
        self.assertIn(b"certificate verify failed", results["untrusted"][1])
