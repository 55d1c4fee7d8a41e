"""JSON-RPC parsing and MCP classification."""

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcpr.proxy import jsonrpc


class ParseTests(SynchronousTestCase):
    """jsonrpc.parse and error_body: message kinds, targets, batches, and bodies that are not JSON-RPC."""

    def test_request_with_targets(self) -> None:
        cases = {
            "tools/call": ({"name": "add"}, "add"),
            "resources/read": ({"uri": "ui://widget/a.html"}, "ui://widget/a.html"),
            "prompts/get": ({"name": "review"}, "review"),
            "tools/list": ({}, None),
        }
        for method, (params, target) in cases.items():
            body = json.dumps({"jsonrpc": "2.0", "id": 3, "method": method, "params": params}).encode()
            batch = jsonrpc.parse(body)
            self.assertEqual((batch.first.kind, batch.first.method, batch.first.target, batch.batch),
                             (jsonrpc.REQUEST, method, target, False))

    def test_notification_response_error(self) -> None:
        n = jsonrpc.parse(b'{"jsonrpc":"2.0","method":"notifications/initialized"}').first
        self.assertEqual((n.kind, n.id), (jsonrpc.NOTIFICATION, None))
        r = jsonrpc.parse(b'{"jsonrpc":"2.0","id":"a","result":{}}').first
        self.assertEqual((r.kind, r.id), (jsonrpc.RESPONSE, "a"))
        e = jsonrpc.parse(b'{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"nope"}}').first
        self.assertEqual((e.kind, e.error_code, e.error_message), (jsonrpc.ERROR, -32601, "nope"))

    def test_batch(self) -> None:
        body = b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","method":"n"}]'
        batch = jsonrpc.parse(body)
        self.assertTrue(batch.batch)
        self.assertEqual([m.id for m in batch.requests], [1])
        self.assertEqual(batch.method_summary(), "tools/list,n")

    def test_not_jsonrpc(self) -> None:
        for body in (b"", b"{", b"[]", b'{"a":1}', b'{"jsonrpc":"1.0","id":1,"method":"x"}',
                     b"client_id=x&grant_type=y", b'[{"jsonrpc":"2.0","id":1,"method":"x"}, 3]',
                     b"[" * 100000):
            self.assertIsNone(jsonrpc.parse(body), body[:40])

    @given(st.binary(max_size=200))
    def test_never_raises_on_bytes(self, body: bytes) -> None:
        jsonrpc.parse(body)

    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=20))
    def test_never_raises_on_json(self, value) -> None:
        for v in (value, {"jsonrpc": "2.0", "id": value, "method": "m", "params": value},
                  {"jsonrpc": "2.0", "id": 1, "error": value}):
            batch = jsonrpc.parse(json.dumps(v).encode())
            if batch is not None:
                batch.method_summary()
                batch.first.target

    def test_error_body(self) -> None:
        single = jsonrpc.parse(b'{"jsonrpc":"2.0","id":9,"method":"x"}')
        self.assertEqual(json.loads(jsonrpc.error_body(single, -1, "m")),
                         {"jsonrpc": "2.0", "id": 9, "error": {"code": -1, "message": "m"}})
        batch = jsonrpc.parse(b'[{"jsonrpc":"2.0","id":1,"method":"x"},{"jsonrpc":"2.0","id":2,"method":"y"}]')
        self.assertEqual([e["id"] for e in json.loads(jsonrpc.error_body(batch, -1, "m"))], [1, 2])
        self.assertIsNone(json.loads(jsonrpc.error_body(None, -1, "m"))["id"])
