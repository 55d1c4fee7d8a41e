"""Credentials never reach the store: headers, queries, forms and JSON bodies (whole or cut off)."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from mcpr.gateway.store import redact


class RedactTests(SynchronousTestCase):
    def test_secret_names(self) -> None:
        for name in ("Authorization", "X-Api-Key", "api_key", "access_token", "refreshToken", "client_secret",
                     "password", "Set-Cookie", "code_verifier", "X-Amz-Security-Token", "privateKey"):
            self.assertTrue(redact.secret_name(name), name)
        for name in ("max_tokens", "tokens", "content-type", "mcp-session-id", "name", "code", "www-authenticate"):
            self.assertFalse(redact.secret_name(name), name)

    def test_headers_keep_their_shape(self) -> None:
        text, content_type = redact.headers_json([
            (b"Authorization", [b"Bearer eyJhbGciOi.secret"]),
            (b"Proxy-Authorization", [b"opaque"]),
            (b"Cookie", [b"sid=abc; theme=dark"]),
            (b"Set-Cookie", [b"sid=abc; Path=/; HttpOnly", b"csrf=xyz"]),
            (b"X-Api-Key", [b"k-123"]),
            (b"Content-Type", [b"application/json"]),
            (b"X-Note", [b'say "h\xe9" \\ \x01']),
        ])
        self.assertEqual(content_type, "application/json")
        got = json.loads(text)
        self.assertEqual(got, [
            ["authorization", "Bearer [redacted]"],
            ["proxy-authorization", "[redacted]"],
            ["cookie", "sid=[redacted]; theme=[redacted]"],
            ["set-cookie", "sid=[redacted]; Path=/; HttpOnly"],
            ["set-cookie", "csrf=[redacted]"],
            ["x-api-key", "[redacted]"],
            ["content-type", "application/json"],
            ["x-note", 'say "h\xe9" \\ \x01'],
        ])
        self.assertEqual(text, json.dumps(got, ensure_ascii=False, separators=(",", ":")))
        self.assertNotIn("secret", text.replace("[redacted]", ""))

    def test_kept_headers_are_encoded_once_secret_ones_never_cached(self) -> None:
        redact._header_pair.cache_clear()
        raw = [(b"Authorization", [b"Bearer tok-1"]), (b"Accept", [b"application/json"])]
        first, _ = redact.headers_json(raw)
        again, _ = redact.headers_json([(b"Authorization", [b"Bearer tok-2"]), (b"Accept", [b"application/json"])])
        self.assertEqual(first, again)
        self.assertEqual(first, '[["authorization","Bearer [redacted]"],["accept","application/json"]]')
        info = redact._header_pair.cache_info()
        self.assertEqual((info.currsize, info.hits), (1, 1), "only Accept's pair is kept, and used again")

    def test_query_and_form(self) -> None:
        self.assertEqual(redact.form(b"access_token=abc&page=2&api%5Fkey=k"),
                         b"access_token=[redacted]&page=2&api%5Fkey=[redacted]")
        body = b"grant_type=authorization_code&code=c1&code_verifier=v1&client_secret=s1"
        self.assertEqual(redact.body(body, "application/x-www-form-urlencoded; charset=utf-8"),
                         b"grant_type=authorization_code&code=c1&code_verifier=[redacted]&client_secret=[redacted]")
        self.assertEqual(redact.form(b"page=2"), b"page=2")

    def test_json_at_any_depth(self) -> None:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "deploy", "arguments": {"api_key": "k-1", "region": "eu", "max_tokens": 5,
                                            "nested": [{"password": "p\"w"}], "token": "t-1"}}}).encode()
        got = json.loads(redact.body(body, "application/json"))
        arguments = got["params"]["arguments"]
        self.assertEqual(arguments, {"api_key": "[redacted]", "region": "eu", "max_tokens": 5,
                                     "nested": [{"password": "[redacted]"}], "token": "[redacted]"})

    def test_sse_and_a_body_cut_by_the_cap(self) -> None:
        sse = b'event: message\ndata: {"result":{"access_token":"eyJ1","expires_in":3600}}\n\n'
        self.assertEqual(redact.body(sse, "text/event-stream"),
                         b'event: message\ndata: {"result":{"access_token":"[redacted]","expires_in":3600}}\n\n')
        for cut in (b'{"refresh_token": "abc', b'{"refresh_token": "ab\\'):
            self.assertEqual(redact.body(cut, "application/json"), b'{"refresh_token": "[redacted]"')

    def test_bodies_without_secrets_keep_their_bytes(self) -> None:
        body = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"5"}]}}'
        self.assertIs(redact.body(body, "application/json"), body)
        self.assertEqual(redact.body(b"", None), b"")
