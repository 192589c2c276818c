"""libtarpit.relay's message framing: the body passes byte for byte, however it is cut into reads."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from libtarpit.actions import SendBackend
from libtarpit.relay import Relay

# bodies built from the pieces that matter for the end of DATA: dots, CR, LF, text
PIECES = st.sampled_from([b"\r\n", b".", b"\r", b"\n", b"x", b"..\r\n", b"\r\n.\r", b"abc"])


def feed_in_reads(body: bytes, cuts: list[int]) -> tuple[bytes, bytes, bool]:
    """Feed `body` to a relay in DATA in reads cut at `cuts`; return (what went to the backend,
    what stayed in the client buffer, whether the end was seen)."""
    out: list = []
    relay = Relay(out)
    relay.start_body()
    ended = False
    start = 0
    for cut in sorted(set(cuts)) + [len(body)]:
        relay.inbuf.feed(body[start:cut])
        start = max(start, cut)
        if relay.body():
            ended = True
            break
    relay.inbuf.feed(body[start:])
    sent = b"".join(a.data for a in out if isinstance(a, SendBackend))
    return sent, relay.inbuf.take(), ended


@settings(max_examples=400)
@given(st.lists(PIECES, max_size=40), st.lists(st.integers(0, 200), max_size=8), st.binary(max_size=20))
def test_the_body_up_to_its_end_goes_through_whole_and_the_rest_stays(pieces, cuts, after):
    body = b"".join(pieces)
    wire = body + b"\r\n.\r\n" + after
    sent, rest, ended = feed_in_reads(wire, cuts)
    # the end is the first CRLF.CRLF, counting the CRLF that ended the DATA command line
    end = (b"\r\n" + wire).find(b"\r\n.\r\n") + 5 - 2
    assert ended
    assert sent == wire[:end], "every byte up to and including the end, nothing after it"
    assert rest == wire[end:], "what follows the end stays for the next command"


def test_an_empty_message_ends_at_once():
    sent, rest, ended = feed_in_reads(b".\r\nQUIT\r\n", [])
    assert (sent, rest, ended) == (b".\r\n", b"QUIT\r\n", True)


def test_an_end_split_over_single_byte_reads():
    wire = b"hello\r\n.\r\nNOOP\r\n"
    sent, rest, ended = feed_in_reads(wire, list(range(len(wire))))
    assert (sent, rest, ended) == (b"hello\r\n.\r\n", b"NOOP\r\n", True)
