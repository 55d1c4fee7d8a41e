"""Rewriting JSON and SSE bodies in flight: exact bytes kept where nothing changes, chunking immaterial."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from mcpr.proxy.rewrite.streaming import EventStreamRewriter, JsonRewriter, replace_data, rewrite_json


def mark(value) -> bool:
    """A transform that tags every JSON-RPC result object."""
    if isinstance(value, dict) and isinstance(value.get("result"), dict):
        value["result"]["seen"] = True
        return True
    return False


def answer(id, **result) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": id, "result": result}).encode()


class JsonRewriterTests(SynchronousTestCase):
    """The buffered JSON body rewriter: written once with its new length, else the bytes untouched."""

    def run_body(self, chunks, cap=1 << 20):
        out: list[bytes] = []
        headers = Headers()
        rewriter = JsonRewriter(mark, out.append, headers, cap)
        for chunk in chunks:
            rewriter.feed(chunk)
        rewriter.finish()
        return b"".join(out), headers.getRawHeaders(b"content-length"), len(out)

    def test_rewritten_body_is_written_once_with_its_length(self) -> None:
        body = answer(1, tools=[])
        out, length, writes = self.run_body([body[:5], body[5:]])
        self.assertEqual(json.loads(out)["result"], {"tools": [], "seen": True})
        self.assertEqual((length, writes), ([str(len(out)).encode()], 1))

    def test_unchanged_or_non_json_bodies_keep_their_bytes(self) -> None:
        for body in (b'{"jsonrpc": "2.0", "id": 1, "error": {"code": 1}}', b"not json", b"\xff\xfe", b""):
            out, length, _ = self.run_body([body])
            self.assertEqual(out, body)
            self.assertEqual(length, [str(len(body)).encode()])

    def test_over_the_cap_passes_through_chunked(self) -> None:
        body = answer(1, text="x" * 100)
        chunks = [body[i:i + 10] for i in range(0, len(body), 10)]
        out, length, writes = self.run_body(chunks, cap=50)
        self.assertEqual(out, body)
        self.assertIsNone(length)
        self.assertGreater(writes, 1)

    @given(st.binary(max_size=200))
    def test_rewrite_json_never_raises(self, body: bytes) -> None:
        out = rewrite_json(body, mark)
        if out is not None:
            json.loads(out)

    def test_transform_failure_passes_the_body_unchanged(self) -> None:
        def broken(value) -> bool:
            raise KeyError("bug")

        self.assertIsNone(rewrite_json(answer(1), broken))
        self.flushLoggedErrors(KeyError)


def event(data: bytes, *, id: str | None = None, name: str | None = "message", eol: bytes = b"\r\n") -> bytes:
    lines = []
    if name:
        lines.append(b"event: " + name.encode())
    if id is not None:
        lines.append(b"id: " + id.encode())
    lines.append(b"data: " + data)
    return eol.join(lines) + eol + eol


class EventStreamRewriterTests(SynchronousTestCase):
    """The SSE rewriter: each event rewritten as it completes, everything else passed on."""

    def feed_all(self, chunks, cap=1 << 20) -> list[bytes]:
        out: list[bytes] = []
        rewriter = EventStreamRewriter(mark, out.append, cap)
        for chunk in chunks:
            rewriter.feed(chunk)
        rewriter.finish()
        return out

    def test_each_answer_rewritten_other_bytes_kept(self) -> None:
        progress = event(b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}', id="7")
        ping = b": ping\r\n\r\n"
        result = event(answer(3, tools=[]), id="8")
        out = b"".join(self.feed_all([progress + ping + result]))
        first, rest = out[:len(progress + ping)], out[len(progress + ping):]
        self.assertEqual(first, progress + ping)
        self.assertTrue(rest.startswith(b"event: message\r\nid: 8\r\ndata: "))
        self.assertTrue(rest.endswith(b"\r\n\r\n"))
        data = rest.split(b"data: ", 1)[1].rstrip(b"\r\n")
        self.assertEqual(json.loads(data)["result"], {"tools": [], "seen": True})

    def test_an_event_goes_out_as_soon_as_it_is_complete(self) -> None:
        out: list[bytes] = []
        rewriter = EventStreamRewriter(mark, out.append)
        stream = event(answer(1), eol=b"\n")
        rewriter.feed(stream[:-1])
        self.assertEqual(out, [])
        rewriter.feed(stream[-1:])
        self.assertEqual(len(out), 1)
        self.assertIn(b'"seen":true', out[0])

    def test_multi_line_data_and_no_space(self) -> None:
        raw = b"id: 1\ndata:{\"jsonrpc\":\"2.0\",\ndata: \"id\":1,\"result\":{}}\nretry: 5\n\n"
        (out,) = self.feed_all([raw])
        self.assertEqual(out.split(b"\n")[0], b"id: 1")
        self.assertTrue(out.endswith(b"\nretry: 5\n\n"))
        self.assertEqual(out.count(b"data:"), 1)
        self.assertEqual(replace_data(b"data\n\n", b"{}"), b"data: {}\n\n")

    def test_incomplete_tail_is_flushed_unchanged(self) -> None:
        tail = b"data: " + answer(2)
        self.assertEqual(b"".join(self.feed_all([event(answer(1)), tail])).endswith(tail), True)

    def test_event_over_the_cap_turns_the_rest_into_a_pass_through(self) -> None:
        small = event(answer(1))
        big = event(answer(2, text="y" * 500))
        after = event(answer(3))
        stream = small + big + after
        out = b"".join(self.feed_all([stream[i:i + 64] for i in range(0, len(stream), 64)], cap=300))
        self.assertIn(b'"seen":true', out[:len(out) - len(big + after)])
        self.assertTrue(out.endswith(big + after))

    @given(st.lists(st.sampled_from(["answer", "note", "comment", "junk"]), min_size=1, max_size=6),
           st.sampled_from([b"\n", b"\r\n", b"\r"]), st.data())
    def test_chunking_does_not_matter(self, kinds, eol, data) -> None:
        parts = []
        for i, kind in enumerate(kinds):
            if kind == "answer":
                parts.append(event(answer(i, n=i), id=str(i), eol=eol))
            elif kind == "note":
                parts.append(event(b'{"jsonrpc":"2.0","method":"x"}', eol=eol))
            elif kind == "comment":
                parts.append(b": keepalive" + eol + eol)
            else:
                parts.append(event(b"not json {", eol=eol))
        stream = b"".join(parts)
        whole = b"".join(self.feed_all([stream]))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        self.assertEqual(b"".join(self.feed_all(chunks)), whole)
        for part, kind in zip(parts, kinds):
            if kind != "answer":
                self.assertIn(part, whole)
        self.assertEqual(whole.count(b'"seen":true'), kinds.count("answer"))
