"""The HTTP/1.1 response reader: framing (RFC 9112 §6.3), reads split anywhere, and what a hostile
peer's bytes cost it."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.response_reader import CHUNK_LINE, ResponseReader

BUDGET = 4096


class Receiver:
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.received = bytearray()
        self.completed: tuple[bool, bytes] | None = None
        self.failed: str | None = None
        self.on_head = lambda: None
        self.on_complete = lambda: None

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        assert self.status is None, "second head"
        self.status, self.headers = status, headers
        self.on_head()

    def body(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.received += data

    def complete(self, reusable: bool, rest: bytes) -> None:
        assert self.completed is None, "completed twice"
        self.completed = (reusable, rest)
        self.on_complete()

    def error(self, reason: str) -> None:
        self.failed = reason


def read(response: bytes, *, split: int | None = None, bodiless: bool = False) -> Receiver:
    receiver = Receiver()
    reader = ResponseReader(receiver, BUDGET)
    reader.expect(bodiless=bodiless)
    if split is None:
        reader.feed(response)
    else:
        for i in range(0, len(response), split):
            reader.feed(response[i:i + split])
    return receiver


def every_split(test: SynchronousTestCase, response: bytes, **kwargs: bool) -> Receiver:
    """The same outcome whether the response comes in one read, a byte at a time, or anything between."""
    whole = read(response, **kwargs)
    for split in (1, 2, 3, 5, 7, 64):
        parts = read(response, split=split, **kwargs)
        test.assertEqual((parts.status, parts.headers, bytes(parts.received), parts.completed, parts.failed),
                         (whole.status, whole.headers, bytes(whole.received), whole.completed, whole.failed),
                         f"read {split} bytes at a time")
    return whole


class FramingTests(SynchronousTestCase):
    def test_a_content_length_body(self) -> None:
        r = every_split(self, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
                              b'{"ok":true}')
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers, [(b"content-type", b"application/json"), (b"content-length", b"11")])
        self.assertEqual(bytes(r.received), b'{"ok":true}')
        self.assertEqual(r.completed, (True, b""))

    def test_an_empty_body_completes_with_its_head(self) -> None:
        r = every_split(self, b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual((r.status, r.completed), (202, (True, b"")))

    def test_a_chunked_body_with_extensions_and_trailers(self) -> None:
        r = every_split(self, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
                              b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
        self.assertEqual(r.headers, [(b"x-a", b"1")], "the framing field is the reader's")
        self.assertEqual(bytes(r.received), b"hello world")
        self.assertEqual(r.completed, (True, b""))

    def test_a_chunked_body_without_trailers(self) -> None:
        r = every_split(self, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n")
        self.assertEqual((bytes(r.received), r.completed), (b"0123456789", (True, b"")))

    def test_transfer_encoding_overrides_a_content_length_and_the_connection_is_not_reused(self) -> None:
        r = every_split(self, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"2\r\nhi\r\n0\r\n\r\n")
        self.assertEqual((r.headers, bytes(r.received), r.completed), ([], b"hi", (False, b"")))

    def test_no_body_for_head_204_and_304(self) -> None:
        r = every_split(self, b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", bodiless=True)
        self.assertEqual((r.headers, r.completed), ([(b"content-length", b"5000")], (True, b"")),
                         "a HEAD's length describes the GET: kept, and no body awaited")
        for status in (204, 304):
            r = every_split(self, b"HTTP/1.1 %d X\r\nETag: e\r\n\r\n" % status)
            self.assertEqual((r.status, r.completed), (status, (True, b"")))

    def test_interim_responses_are_skipped(self) -> None:
        r = every_split(self, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                              b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual((r.status, r.headers, bytes(r.received)), (200, [(b"content-length", b"2")], b"ok"))

    def test_a_body_read_until_close(self) -> None:
        receiver = Receiver()
        reader = ResponseReader(receiver, BUDGET)
        reader.expect()
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome")
        reader.feed(b" more")
        self.assertIsNone(receiver.completed)
        self.assertTrue(reader.closed())
        self.assertEqual((bytes(receiver.received), receiver.completed), (b"some more", (False, b"")))

    def test_a_response_cut_off_is_not_complete(self) -> None:
        receiver = Receiver()
        reader = ResponseReader(receiver, BUDGET)
        reader.expect()
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        self.assertFalse(reader.closed())
        self.assertIsNone(receiver.completed)

    def test_closing_ones(self) -> None:
        for head in (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
                     b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n"):
            self.assertEqual(read(head).completed, (False, b""), head)
        kept = read(b"HTTP/1.1 200 OK\r\nConnection: closer\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(kept.completed, (True, b""), "a token, not a substring")

    def test_bytes_past_the_end_are_handed_back(self) -> None:
        r = read(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
        self.assertEqual(r.completed, (True, b"HTTP/1.1 200 OK\r\n"))
        r = read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nextra")
        self.assertEqual(r.completed, (True, b"extra"))

    def test_the_reader_carries_one_response_after_another(self) -> None:
        receiver = Receiver()
        reader = ResponseReader(receiver, BUDGET)
        for n in range(3):
            receiver.status, receiver.completed, receiver.received = None, None, bytearray()
            reader.expect()
            reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % n)
            self.assertEqual((bytes(receiver.received), receiver.completed), (b"%d" % n, (True, b"")))


class CallbackTests(SynchronousTestCase):
    """What a receiver does from within a callback ends the feed that called it."""

    def test_stopped_while_it_had_the_head(self) -> None:
        receiver = Receiver()
        reader = ResponseReader(receiver, BUDGET)
        receiver.on_head = reader.stop
        reader.expect()
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertIsNone(receiver.completed)
        reader.expect()
        receiver.status = None
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
        self.assertEqual(receiver.received, b"", "nothing after the stop")

    def test_a_new_exchange_expected_within_complete(self) -> None:
        receiver = Receiver()
        reader = ResponseReader(receiver, BUDGET)
        receiver.on_complete = reader.expect
        reader.expect()
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(receiver.completed, (True, b""))
        receiver.status, receiver.completed, receiver.on_complete = None, None, lambda: None
        reader.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual((receiver.status, receiver.completed), (204, (True, b"")),
                         "the next response's head was awaited")


class HostileTests(SynchronousTestCase):
    def assertRefused(self, response: bytes, reason: str, **kwargs: bool) -> None:
        for split in (None, 1):
            r = read(response, split=split, **kwargs)
            self.assertEqual(r.failed, reason, response[:60])
            self.assertIsNone(r.completed)

    def test_malformed_heads(self) -> None:
        self.assertRefused(b"HTTP/2 200 OK\r\n\r\n", "not an HTTP/1.1 status line: b'HTTP/2 200 OK'")
        self.assertRefused(b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.1 status line: b'HTTP/1.1 2000 OK'")
        self.assertRefused(b"ICY 200 OK\r\n\r\n", "not an HTTP/1.1 status line: b'ICY 200 OK'")
        self.assertRefused(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "a malformed header line")
        self.assertRefused(b"HTTP/1.1 200 OK\r\nA: 1\r\n folded\r\n\r\n", "a malformed header line")
        self.assertRefused(b"HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\n", "a malformed header line")
        self.assertRefused(b"HTTP/1.1 200 OK\r\n: v\r\n\r\n", "a malformed header line")
        self.assertRefused(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101 Switching Protocols")

    def test_lengths_that_do_not_agree_or_parse(self) -> None:
        self.assertRefused(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                           "contradictory content-length")
        self.assertRefused(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid content-length")
        self.assertRefused(b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n", "invalid content-length")
        same = read(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok")
        self.assertEqual((bytes(same.received), same.completed), (b"ok", (True, b"")), "a list of equal values is one")

    def test_bad_chunks(self) -> None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.assertRefused(head + b"zz\r\n", "an invalid chunk size")
        self.assertRefused(head + b"-1\r\n", "an invalid chunk size")
        self.assertRefused(head + b"1000000000000000\r\n", "an invalid chunk size")
        self.assertRefused(head + b"2\r\nokXX", "a chunk did not end with CRLF")
        self.assertRefused(head + b"1;" + b"e" * CHUNK_LINE + b"\r\n", "a chunk-size line over 4 KiB")

    def test_a_head_past_its_budget(self) -> None:
        line = b"x-filler: " + b"a" * 100 + b"\r\n"
        self.assertRefused(b"HTTP/1.1 200 OK\r\n" + line * (BUDGET // len(line) + 1), "a response head over 4 KiB")

    def test_interim_heads_count_against_the_budget(self) -> None:
        self.assertRefused(b"HTTP/1.1 100 Continue\r\n\r\n" * (BUDGET // 25 + 1), "a response head over 4 KiB")

    def test_trailers_past_the_budget(self) -> None:
        line = b"x-t: " + b"a" * 100 + b"\r\n"
        self.assertRefused(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
                           + line * (BUDGET // len(line) + 1), "trailers over 4 KiB")

    def test_a_head_trickled_a_byte_at_a_time_is_held_in_one_buffer(self) -> None:
        """Searched from where the last piece ended: each byte costs the same, however long the head."""
        receiver = Receiver()
        reader = ResponseReader(receiver, 1 << 20)
        reader.expect()
        head = b"HTTP/1.1 200 OK\r\n" + b"x-filler: a\r\n" * 20000 + b"Content-Length: 0\r\n\r\n"
        for i in range(len(head)):
            reader.feed(head[i:i + 1])
        self.assertEqual((receiver.status, len(receiver.headers), receiver.completed), (200, 20001, (True, b"")))
