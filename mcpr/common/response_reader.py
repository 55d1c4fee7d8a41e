"""HTTP/1.1 responses read off a socket, incrementally: the head parsed, the body's bytes passed on.

twisted.web's client spends most of a small exchange in its line-at-a-time
parser, its `Headers` and the `Response`/`Failure` plumbing around the body
(docs/PERFORMANCE.md, "Pooled sockets").  A hop that only passes a response on
needs less: the status, the header lines as they came, and the body's
framing (RFC 9112 §6.3), so the body's bytes go on as slices of what was
read.  The reader is sans-I/O: its owner feeds it what a socket read and
hears of the response through a `ResponseReceiver`.

What it reads may come from a hostile peer, so every part is bounded: the
head (interim 1xx heads included) by `head_budget` bytes, a chunk-size line
by `CHUNK_LINE` bytes, the trailers by `head_budget` again; anything it cannot
frame is an error, never a guess.  Header values are passed on as sent: the
caller checks them (the relay's `PublicResponse`).

httptools (llhttp) was considered: it cannot be told that a response answers
a HEAD, so a HEAD's `Content-Length` would have it wait for a body that never
comes.
"""

from __future__ import annotations

from typing import Protocol

from mcpr.common.headers import content_length

HEAD_BUDGET = 128 << 10
"""Bytes a response head may take: well above any head a server sends (twisted.web's own lines are
capped at 16 KiB), and more than one read (64 KiB), so that a head and the start of its body read
together never come near it."""

CHUNK_LINE = 4096
"""Bytes a chunk-size line may take, its extensions included."""

_HEX = frozenset(b"0123456789abcdefABCDEF")
_NO_BODY = frozenset({204, 304})


class ResponseReceiver(Protocol):
    """Hears of one response, in this order: head, body*, then complete or error (or neither, if
    the reader was stopped)."""

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The final head.  `headers` lower-cased names and values as sent, without the framing
        fields the reader consumed (`Transfer-Encoding`, and `Content-Length` when chunked)."""

    def body(self, data: bytes) -> None: ...

    def complete(self, reusable: bool, rest: bytes) -> None:
        """The response is over; `reusable`: the connection may carry another exchange; `rest`:
        bytes read past the response's end."""

    def error(self, reason: str) -> None:
        """What was read is not a response this reader can frame: the connection is unusable."""


class ProtocolError(Exception):
    pass


# States
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ResponseReader:
    """One response at a time on one connection: `expect` it, `feed` what is read, `closed` at EOF."""

    def __init__(self, receiver: ResponseReceiver, head_budget: int) -> None:
        self._receiver = receiver
        self._budget = head_budget
        self._state = _DONE
        self._buffer: bytes | bytearray = b""
        self._left = 0  # body bytes of the current chunk or Content-Length still to come
        self._head_bytes = 0  # interim heads and trailers count against the budget as well
        self._bodiless = False
        self._reusable = False
        self._turn = 0  # bumped by expect and stop: a callback that did either ends the feed it ran in

    def expect(self, bodiless: bool = False) -> None:
        """A request was sent: read its response; `bodiless` for the answer to a HEAD."""
        self._state = _HEAD
        self._buffer = b""
        self._head_bytes = 0
        self._bodiless = bodiless
        self._turn += 1

    def stop(self) -> None:
        """Hear nothing more (the exchange was cancelled)."""
        self._state = _DONE
        self._buffer = b""
        self._turn += 1

    def feed(self, data: bytes) -> None:
        try:
            self._feed(data)
        except ProtocolError as e:
            self._state = _DONE
            self._buffer = b""
            self._receiver.error(str(e))

    def closed(self) -> bool:
        """The connection's EOF: True if that ended a response read until close (and told the
        receiver), False if a response was cut off or none was expected."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            self._receiver.complete(False, b"")
            return True
        self._state = _DONE
        return False

    def _feed(self, data: bytes) -> None:
        turn = self._turn
        while data and turn == self._turn:
            state = self._state
            if state == _LENGTH or state == _CHUNK_DATA:
                left = self._left
                if len(data) < left:
                    self._left = left - len(data)
                    self._receiver.body(data)
                    return
                chunk, data = data[:left], data[left:]
                self._left = 0
                if state == _LENGTH:
                    self._state = _DONE
                    self._receiver.body(chunk)
                    if turn == self._turn:
                        self._receiver.complete(self._reusable, data)
                    return
                self._state = _CHUNK_END
                self._receiver.body(chunk)
            elif state == _UNTIL_CLOSE:
                self._receiver.body(data)
                return
            elif state == _HEAD:
                data = self._head(data, turn)
            elif state == _CHUNK_SIZE:
                data = self._chunk_size(data)
            elif state == _CHUNK_END:
                buffer = bytes(self._buffer) + data
                if len(buffer) < 2:
                    self._buffer = buffer
                    return
                if buffer[:2] != b"\r\n":
                    raise ProtocolError("a chunk did not end with CRLF")
                self._buffer = b""
                self._state = _CHUNK_SIZE
                data = buffer[2:]
            elif state == _TRAILERS:
                found = self._lines(data, "trailers")  # trailer fields are read and dropped
                if found is None:
                    return
                self._state = _DONE
                self._receiver.complete(self._reusable, found[1])
                return
            else:
                return  # done: the owner hears what follows a response in `complete`

    def _lines(self, data: bytes, what: str) -> tuple[bytes, bytes] | None:
        """The block up to and without its blank line, and what follows; None while it is incomplete.

        A block that comes in pieces grows in a bytearray, searched from where the last piece
        ended: a peer that sends its head a byte at a time costs linear time, not quadratic."""
        old = self._buffer
        if old:
            start = max(0, len(old) - 3)
            if isinstance(old, bytes):
                old = self._buffer = bytearray(old)
            old += data
            buffer: bytes | bytearray = old
        else:
            start, buffer = 0, data
        end = buffer.find(b"\r\n\r\n", start)
        if end < 0:
            if self._head_bytes + len(buffer) > self._budget:
                raise ProtocolError(f"{what} over {self._budget >> 10} KiB")
            self._buffer = buffer
            return None
        self._buffer = b""
        self._head_bytes += end + 4
        if self._head_bytes > self._budget:
            raise ProtocolError(f"{what} over {self._budget >> 10} KiB")
        return bytes(buffer[:end]), bytes(buffer[end + 4:])

    def _head(self, data: bytes, turn: int) -> bytes:
        found = self._lines(data, "a response head")
        if found is None:
            return b""
        block, rest = found
        lines = block.split(b"\r\n")
        status_line = lines[0]
        version, code = status_line[:8], status_line[9:12]
        if (version not in (b"HTTP/1.1", b"HTTP/1.0") or status_line[8:9] != b" " or len(code) != 3
                or not code.isdigit() or status_line[12:13] not in (b"", b" ")):
            raise ProtocolError(f"not an HTTP/1.1 status line: {status_line[:40]!r}")
        status = int(code)
        if status < 200:
            if status == 101:
                raise ProtocolError("101 Switching Protocols")
            return rest  # an interim response (100 Continue, 103 Early Hints): the final one follows
        headers = []
        lengths: list[bytes] = []
        codings: list[bytes] = []
        close = version != b"HTTP/1.1"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
                raise ProtocolError("a malformed header line")
            name = name.lower()
            value = value.strip(b" \t")
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.extend(part.strip().lower() for part in value.split(b","))
                continue
            elif name == b"connection":
                close = close or b"close" in {part.strip() for part in value.lower().split(b",")}
            headers.append((name, value))
        self._reusable = not close
        if self._bodiless or status in _NO_BODY:
            self._state = _DONE
            self._receiver.head(status, headers)
            if turn == self._turn:
                self._receiver.complete(self._reusable, rest)
            return b""
        empty = False
        if codings:
            if lengths:  # RFC 9112 §6.3: Transfer-Encoding overrides, and the connection is not reused
                headers = [(name, value) for name, value in headers if name != b"content-length"]
                self._reusable = False
            if codings[-1] == b"chunked":
                self._state = _CHUNK_SIZE
            else:
                self._state = _UNTIL_CLOSE
                self._reusable = False
        elif lengths:
            self._left = _length(lengths)
            empty = not self._left
            self._state = _DONE if empty else _LENGTH
        else:
            self._state = _UNTIL_CLOSE
            self._reusable = False
        self._receiver.head(status, headers)
        if empty and turn == self._turn:
            self._receiver.complete(self._reusable, rest)
            return b""
        return rest

    def _chunk_size(self, data: bytes) -> bytes:
        old = self._buffer
        buffer = bytes(old) + data if old else data
        end = buffer.find(b"\r\n", max(0, len(old) - 1))
        if end < 0:
            if len(buffer) > CHUNK_LINE:
                raise ProtocolError("a chunk-size line over 4 KiB")
            self._buffer = buffer
            return b""
        if end > CHUNK_LINE:
            raise ProtocolError("a chunk-size line over 4 KiB")
        self._buffer = b""
        size = buffer[:end].partition(b";")[0].strip(b" \t")
        if not size or len(size) > 15 or not _HEX.issuperset(size):
            raise ProtocolError("an invalid chunk size")
        self._left = int(size, 16)
        if self._left:
            self._state = _CHUNK_DATA
        else:
            # The last chunk: a blank line, or trailer lines and then one.  Read as a block behind
            # a CRLF, both end at the first CRLFCRLF.
            self._state = _TRAILERS
            self._buffer = b"\r\n"
            self._head_bytes = 0
        return buffer[end + 2:]


def _length(values: list[bytes]) -> int:
    try:
        return content_length(values)
    except ValueError as e:
        raise ProtocolError(str(e)) from None
