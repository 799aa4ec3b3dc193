"""The host's wait for a warming sandbox's agent (`readiness.wait_until_answering`) against a
tiny loopback HTTP server that plays the agent's /ready."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coppice.errors import SandboxNotReady
from coppice.substrates import readiness

REASON = "the start command 'serve' ended (exit status 1) before the ready command passed"


@contextmanager
def fake_agent(answers: list[int], then: int) -> Iterator[tuple[int, list[str]]]:
    """Answers /ready with `answers` in turn, then `then` for good; yields its port and the
    paths it was asked for."""
    asked: list[str] = []
    pending = list(answers)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            status = pending.pop(0) if pending else then
            message = REASON if status == readiness.READY_FAILED_STATUS else "not yet"
            body = json.dumps({"code": status, "message": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the test's output is for the test

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def wait(port: int, timeout_s: float) -> None:
    readiness.wait_until_answering(
        "e-1",
        "127.0.0.1",
        port,
        ssh_port=1,  # never reached: the agent is asked first
        timeout_s=timeout_s,
        is_alive=lambda: True,
        diagnostics=lambda: "console: nothing",
    )


def test_a_failed_start_ends_the_wait_at_once_with_the_agents_reason() -> None:
    with fake_agent([503, 503], then=readiness.READY_FAILED_STATUS) as (port, asked):
        started = time.monotonic()
        with pytest.raises(SandboxNotReady) as raised:
            wait(port, timeout_s=30)
    assert time.monotonic() - started < 10, "it waited on after the agent said it failed"
    assert asked == ["/ready"] * 3
    assert REASON in str(raised.value)
    assert "e-1" in str(raised.value)


def test_not_yet_is_retried_until_the_timeout() -> None:
    with fake_agent([], then=503) as (port, asked), pytest.raises(SandboxNotReady) as raised:
        wait(port, timeout_s=0.3)
    assert len(asked) > 1
    assert "did not answer within" in str(raised.value)
    assert "503" in str(raised.value)
