"""Reading JSON-RPC answers out of a response body."""

import json

from twisted.trial.unittest import SynchronousTestCase

from mcpr.proxy import jsonrpc
from mcpr.proxy.answers import AnswerWatcher

RESULT = b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"ok"}]}}'


def watch(body: bytes, keep=(), content_type=b"application/json", pieces=3) -> AnswerWatcher:
    watcher = AnswerWatcher(content_type, keep)
    step = max(1, len(body) // pieces)
    for i in range(0, len(body), step):
        watcher.feed(body[i:i + step])
    watcher.finish()
    return watcher


class JsonBodyTests(SynchronousTestCase):
    def test_an_error_is_read(self) -> None:
        body = b'{"jsonrpc":"2.0","id":7,"error":{"code":-32601,"message":"no such method"}}'
        (answer,) = watch(body).answers
        self.assertEqual((answer.kind, answer.id, answer.error_code), (jsonrpc.ERROR, 7, -32601))

    def test_an_error_spelled_with_escapes_or_in_utf16_is_read_too(self) -> None:
        escaped = b'{"jsonrpc":"2.0","id":7,"\\u0065rror":{"code":-32000,"message":"x"}}'
        utf16 = json.dumps({"jsonrpc": "2.0", "id": 7, "error": {"code": -32001, "message": "y"}}).encode("utf-16")
        self.assertEqual([a.error_code for a in watch(escaped).answers], [-32000])
        self.assertEqual([a.error_code for a in watch(utf16).answers], [-32001])

    def test_a_result_nobody_keeps_is_not_parsed_until_its_id_is_asked_for(self) -> None:
        watcher = watch(RESULT)
        self.assertEqual(watcher.answers, [])  # nothing to report: no error, no kept result
        self.assertTrue(watcher.answered({7}))
        self.assertFalse(watcher.answered({7, 8}))
        self.assertEqual([(a.kind, a.id, a.result) for a in watcher.answers], [(jsonrpc.RESPONSE, 7, None)])

    def test_a_kept_result_is_read_whole(self) -> None:
        (answer,) = watch(RESULT, keep=[7]).answers
        self.assertEqual(answer.result, {"content": [{"type": "text", "text": "ok"}]})

    def test_a_body_that_is_not_json_gives_no_answer(self) -> None:
        watcher = watch(b"<html>error</html>")
        self.assertEqual(watcher.answers, [])
        self.assertFalse(watcher.answered({7}))


class EventStreamTests(SynchronousTestCase):
    def test_each_event_is_read(self) -> None:
        body = (b"event: message\ndata: " + RESULT + b"\n\n"
                b'data: {"jsonrpc":"2.0","id":8,"error":{"code":-1,"message":"m"}}\n\n')
        watcher = watch(body, content_type=b"text/event-stream", pieces=7)
        self.assertEqual([(a.kind, a.id) for a in watcher.answers], [(jsonrpc.RESPONSE, 7), (jsonrpc.ERROR, 8)])
        self.assertTrue(watcher.answered({7, 8}))
