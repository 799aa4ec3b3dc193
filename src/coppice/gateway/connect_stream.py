"""Connect's streaming framing, as far as the relay needs it: where one envelope ends as a
stream's bytes pass through, and the end-of-stream envelope that closes a stream with an
error. With it, a command whose sandbox died mid-stream ends with the reason the SDK shows,
instead of a dropped connection (no I/O here).

An envelope is a flags byte, a 4-byte big-endian length and that many bytes; flag 0x02
marks the end-of-stream envelope, whose body is always JSON (connectrpc.com/docs/protocol).
"""

from __future__ import annotations

import json

HEADER_BYTES = 5
END_STREAM = 0x02
CONTENT_TYPE_PREFIX = "application/connect+"


def is_connect_stream(content_type: str) -> bool:
    return content_type.lower().startswith(CONTENT_TYPE_PREFIX)


class EnvelopeReader:
    """Follows the envelope boundaries of a stream fed to it in chunks of any size."""

    def __init__(self) -> None:
        self._header = b""
        self._remaining = 0
        self.ended = False  # the stream's own end-of-stream envelope has begun

    def feed(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            if self._remaining:
                taken = min(self._remaining, len(data) - at)
                self._remaining -= taken
                at += taken
                continue
            wanted = HEADER_BYTES - len(self._header)
            self._header += data[at : at + wanted]
            at += wanted
            if len(self._header) == HEADER_BYTES:
                self.ended = self.ended or bool(self._header[0] & END_STREAM)
                self._remaining = int.from_bytes(self._header[1:], "big")
                self._header = b""

    @property
    def at_boundary(self) -> bool:
        """Between two envelopes: another one may follow without corrupting the stream."""
        return not self._header and not self._remaining

    @property
    def can_end_with_error(self) -> bool:
        return self.at_boundary and not self.ended


def end_stream_error(message: str, code: str = "unavailable") -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return bytes([END_STREAM]) + len(body).to_bytes(4, "big") + body
