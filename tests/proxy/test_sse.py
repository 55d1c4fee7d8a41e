"""The SSE parser gives the same events however the stream is cut."""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcpr.proxy.sse import EventTooLarge, SSEParser, event_end

payload = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                  max_size=30)


def frame(data: str, event_id: int, newline: bytes) -> bytes:
    return b"id: %d%sdata: %s%s%s" % (event_id, newline, data.encode(), newline, newline)


class SSEParserTests(SynchronousTestCase):
    """SSEParser: fields, comments, the size cap and event boundaries, however the stream is cut."""

    @given(st.lists(payload, min_size=1, max_size=8), st.sampled_from([b"\n", b"\r\n"]), st.data())
    def test_chunking_does_not_matter(self, payloads, newline, data) -> None:
        stream = b"".join(frame(p, i, newline) for i, p in enumerate(payloads))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        parser, events, last = SSEParser(), [], 0
        for cut in [*cuts, len(stream)]:
            events += parser.feed(stream[last:cut])
            last = cut
        self.assertEqual([e.data for e in events], payloads)
        self.assertEqual([e.id for e in events], [str(i) for i in range(len(payloads))])
        self.assertEqual(b"".join(e.raw for e in events), stream)

    def test_fields(self) -> None:
        """event, multi-line data and id are read; comments are skipped."""
        (event,) = SSEParser().feed(b": comment\nevent: message\ndata: a\ndata: b\nid: 7\n\n")
        self.assertEqual((event.event, event.data, event.id), ("message", "a\nb", "7"))

    def test_comment_only_block_is_not_an_event(self) -> None:
        self.assertEqual(SSEParser().feed(b": ping\n\n"), [])

    def test_cap(self) -> None:
        """An event over max_event raises, and is dropped whole."""
        parser = SSEParser(max_event=10)
        self.assertRaises(EventTooLarge, parser.feed, b"data: " + b"x" * 20)
        # The oversized event is dropped whole: the next one parses alone, with its own bytes.
        (event,) = parser.feed(b"data: y\n\n")
        self.assertEqual((event.data, event.raw), ("y", b"data: y\n\n"))

    def test_event_end_finds_the_first_blank_line_of_any_style(self) -> None:
        self.assertEqual(event_end(b"data: a\r\rdata: b\n\n"), (7, 2))
        self.assertEqual(event_end(b"data: a\r\n\r\ndata: b\n\n"), (7, 4))
        self.assertEqual(event_end(b"data: a\n\ndata: b\r\r", 8), (16, 2))
        self.assertEqual(event_end(b"data: a\r\n"), (-1, 0))
