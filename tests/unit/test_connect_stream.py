"""Envelope boundaries of a Connect stream followed chunk by chunk, and the end-of-stream
error envelope the relay closes a dead sandbox's stream with."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from coppice.gateway.connect_stream import EnvelopeReader, end_stream_error, is_connect_stream


def _envelope(body: bytes, flags: int = 0) -> bytes:
    return bytes([flags]) + len(body).to_bytes(4, "big") + body


def test_the_error_envelope_is_connects_end_of_stream() -> None:
    frame = end_stream_error("sandbox x was not found: it died")
    assert frame[0] == 0x02 and int.from_bytes(frame[1:5], "big") == len(frame) - 5
    assert json.loads(frame[5:]) == {
        "error": {"code": "unavailable", "message": "sandbox x was not found: it died"}
    }


def test_only_connect_streams_are_framed() -> None:
    assert is_connect_stream("application/connect+json")
    assert is_connect_stream("application/connect+proto; charset=utf-8")
    assert not is_connect_stream("application/json")
    assert not is_connect_stream("application/x-ndjson")


def test_a_stream_that_already_ended_takes_no_second_end() -> None:
    reader = EnvelopeReader()
    reader.feed(_envelope(b"{}") + _envelope(b"{}", flags=0x02))
    assert reader.at_boundary and reader.ended and not reader.can_end_with_error


@given(
    st.lists(st.binary(max_size=40), min_size=1, max_size=6),
    st.data(),
)
def test_boundaries_are_found_however_the_bytes_are_cut(
    bodies: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(_envelope(b) for b in bodies)
    ends = set()
    at = 0
    for b in bodies:
        at += 5 + len(b)
        ends.add(at)
    cut = data.draw(st.integers(min_value=0, max_value=len(stream)))
    pieces = sorted(data.draw(st.sets(st.integers(min_value=0, max_value=cut), max_size=5)))
    reader = EnvelopeReader()
    last = 0
    for p in [*pieces, cut]:
        reader.feed(stream[last:p])
        last = max(last, p)
    assert reader.at_boundary == (cut == 0 or cut in ends)
    assert reader.can_end_with_error == reader.at_boundary
