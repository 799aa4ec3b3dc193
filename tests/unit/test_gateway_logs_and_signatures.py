from __future__ import annotations

from datetime import datetime
from urllib.parse import quote, urlencode

import pytest
from e2b.sandbox.signature import get_signature

from coppice.errors import InvalidRequest
from coppice.gateway.sandbox_logs import parse_console, parse_log_query, select
from coppice.gateway.signed_urls import is_presigned_files_request, signed_for

CONSOLE = """\
coppice-agent 2026-12-02T10:00:00.250Z INFO coppice_agent: envd listening on 49983
Server listening on 0.0.0.0 port 22.
WARNING:  Invalid HTTP request received.
coppice-agent 2026-12-02T10:00:05.000Z ERROR coppice_agent: the default kernel did not start
Traceback (most recent call last):

coppice-agent 2026-12-02T10:00:09.000Z WARNING coppice_agent.kernels: kernel restarted
"""


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def test_console_lines_carry_time_and_level() -> None:
    lines = parse_console(CONSOLE, started_at=1.0)
    assert [(line.level, line.message[:20]) for line in lines] == [
        ("info", "envd listening on 49"),
        ("info", "Server listening on "),
        ("warn", "Invalid HTTP request"),
        ("error", "the default kernel d"),
        ("info", "Traceback (most rece"),
        ("warn", "kernel restarted"),
    ]
    # A bare line takes the time of the agent line before it.
    assert lines[1].timestamp == lines[0].timestamp
    assert lines[0].fields == {"logger": "coppice_agent", "source": "agent"}


def test_lines_before_any_timestamp_take_the_sandbox_start() -> None:
    assert parse_console("booting\n", started_at=42.0)[0].timestamp == 42.0


def test_level_cursor_direction_search_and_limit() -> None:
    lines = parse_console(CONSOLE, started_at=1.0)
    warn_up = select(lines, parse_log_query({"level": "warn"}))
    assert [line.level for line in warn_up] == ["warn", "error", "warn"]
    later = select(lines, parse_log_query({"cursor": str(_ms("2026-12-02T10:00:05+00:00"))}))
    assert [line.message[:7] for line in later] == ["the def", "Traceba", "kernel "]
    backward = select(
        lines,
        parse_log_query({"cursor": str(_ms("2026-12-02T10:00:05+00:00")), "direction": "backward"}),
    )
    assert backward[0].message.startswith("Traceback") and backward[-1].message.startswith("envd")
    assert len(select(lines, parse_log_query({"limit": "2"}))) == 2
    assert [line.message for line in select(lines, parse_log_query({"search": "kernel"}))] == [
        "the default kernel did not start",
        "kernel restarted",
    ]


@pytest.mark.parametrize(
    "params",
    [{"level": "loud"}, {"direction": "up"}, {"cursor": "soon"}, {"limit": "5000"}, {"x": "1"}],
)
def test_bad_log_queries(params: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest):
        parse_log_query(params)


def _query(url: str) -> str:
    return url.partition("?")[2]


def test_a_presigned_url_is_matched_to_the_token_that_signed_it() -> None:
    tokens = [("sbx-a", "token-a"), ("sbx-b", "token-b"), ("sbx-c", "token-c")]
    read = get_signature("/home/user/a.txt", "read", None, "token-b")
    query = urlencode({"path": "/home/user/a.txt", "signature": read["signature"]}, quote_via=quote)
    assert is_presigned_files_request("/files", query)
    assert signed_for("GET", query, tokens) == "sbx-b"
    # The same signature does not authorise a write, nor another path.
    assert signed_for("POST", query, tokens) is None
    assert signed_for("GET", query.replace("a.txt", "b.txt"), tokens) is None


def test_user_and_expiry_are_part_of_what_is_signed() -> None:
    tokens = [("sbx-a", "token-a")]
    signed = get_signature("x.txt", "write", "root", "token-a", 60)
    query = urlencode(
        {
            "path": "x.txt",
            "username": "root",
            "signature": signed["signature"],
            "signature_expiration": signed["expiration"],
        },
        quote_via=quote,
    )
    assert signed_for("POST", query, tokens) == "sbx-a"
    assert signed_for("POST", query.replace("username=root", "username=user"), tokens) is None
    tampered = query.replace(
        f"signature_expiration={signed['expiration']}",
        f"signature_expiration={int(signed['expiration'] or 0) + 3600}",
    )
    assert signed_for("POST", tampered, tokens) is None
    assert signed_for("GET", "path=x&signature=bogus", tokens) is None
