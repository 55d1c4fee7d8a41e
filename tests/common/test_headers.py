"""Which headers cross the proxy, in each direction."""

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from mcpr.proxy.headers import downstream_response_headers, upstream_request_headers


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    h = Headers()
    for name, value in pairs:
        h.addRawHeader(name, value)
    return h


class RequestHeaderTests(SynchronousTestCase):
    """Request headers towards the upstream: end-to-end ones kept, hop-by-hop ones dropped, forwarding added."""

    def test_end_to_end_headers_pass_hop_by_hop_do_not(self) -> None:
        source = headers((b"Authorization", b"Bearer t"), (b"Mcp-Session-Id", b"s"), (b"Cookie", b"a=1"),
                         (b"Cookie", b"b=2"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"1"),
                         (b"Keep-Alive", b"300"), (b"TE", b"trailers"), (b"Upgrade", b"h2c"),
                         (b"Proxy-Authorization", b"x"), (b"Host", b"public.example"),
                         (b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked"))
        out = upstream_request_headers(source, client_ip="10.1.2.3", host=b"public.example", proto=b"https")
        self.assertEqual(out, [(b"authorization", b"Bearer t"), (b"mcp-session-id", b"s"), (b"cookie", b"a=1"),
                               (b"cookie", b"b=2"), (b"x-forwarded-for", b"10.1.2.3"),
                               (b"x-forwarded-host", b"public.example"), (b"x-forwarded-proto", b"https")])

    def test_forwarded_headers_from_a_hop_in_front_are_kept_and_extended(self) -> None:
        source = headers((b"X-Forwarded-For", b"203.0.113.9"), (b"X-Forwarded-Host", b"abc.tunnel.example"),
                         (b"X-Forwarded-Proto", b"https"))
        out = upstream_request_headers(source, client_ip="127.0.0.1", host=b"127.0.0.1:3000", proto=b"http")
        self.assertEqual(sorted(out), [(b"x-forwarded-for", b"203.0.113.9, 127.0.0.1"),
                                       (b"x-forwarded-host", b"abc.tunnel.example"), (b"x-forwarded-proto", b"https")])

    def test_several_forwarded_for_lines_become_one(self) -> None:
        source = headers((b"X-Forwarded-For", b"203.0.113.9"), (b"Accept", b"*/*"), (b"X-Forwarded-For", b"10.0.0.1"))
        out = upstream_request_headers(source, client_ip="127.0.0.1", host=None, proto=b"http")
        self.assertEqual(out, [(b"accept", b"*/*"), (b"x-forwarded-for", b"203.0.113.9, 10.0.0.1, 127.0.0.1"),
                               (b"x-forwarded-proto", b"http")])


class ResponseHeaderTests(SynchronousTestCase):
    """Response headers back to the client: repeated ones kept whole, hop-by-hop ones dropped."""

    def test_repeated_headers_survive_hop_by_hop_dropped(self) -> None:
        source = headers((b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
                         (b"WWW-Authenticate", b'Bearer resource_metadata="x"'), (b"Transfer-Encoding", b"chunked"),
                         (b"Content-Length", b"10"), (b"Connection", b"close"), (b"Mcp-Session-Id", b"s"))
        out = downstream_response_headers(source)
        self.assertEqual(out.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(out.getRawHeaders(b"www-authenticate"), [b'Bearer resource_metadata="x"'])
        self.assertEqual(out.getRawHeaders(b"mcp-session-id"), [b"s"])
        for gone in (b"transfer-encoding", b"content-length", b"connection"):
            self.assertFalse(out.hasHeader(gone), gone)
