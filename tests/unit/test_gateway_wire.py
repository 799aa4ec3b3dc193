from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from coppice.errors import InvalidRequest
from coppice.gateway.wire import (
    decode_token,
    encode_token,
    iso,
    parse_create,
    parse_list_query,
)


def test_create_body_as_the_sdk_sends_it() -> None:
    req = parse_create(
        {"templateID": "base", "timeout": 120, "metadata": {"k": "v"}, "envVars": {"A": "1"}},
        300,
        3600,
    )
    assert (req.template_id, req.timeout_s, req.metadata, req.env_vars) == (
        "base",
        120,
        {"k": "v"},
        {"A": "1"},
    )
    assert req.on_timeout == "kill" and not req.auto_resume


def test_defaults_and_lifecycle() -> None:
    req = parse_create(
        {"templateID": "x", "autoPause": {"enabled": True}, "autoResume": {"enabled": True}},
        300,
        3600,
    )
    assert req.timeout_s == 300 and req.on_timeout == "pause" and req.auto_resume


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ([], "JSON object"),
        ({}, "templateID"),
        ({"templateID": 3}, "templateID"),
        ({"templateID": "b", "timeout": "soon"}, "timeout"),
        ({"templateID": "b", "timeout": 0}, "between"),
        ({"templateID": "b", "timeout": 99999}, "between"),
        ({"templateID": "b", "metadata": {"a": 1}}, "metadata"),
        ({"templateID": "b", "envVars": ["A=1"]}, "envVars"),
        ({"templateID": "b", "autoPause": {"enabled": "yes"}}, "autoPause"),
    ],
)
def test_bad_create_bodies_name_the_field(body: Any, complaint: str) -> None:
    with pytest.raises(InvalidRequest, match=complaint):
        parse_create(body, 300, 3600)


def test_list_query_metadata_is_a_form_string() -> None:
    q = parse_list_query({"metadata": "user=alice&job=a%26b", "state": "running,paused"})
    assert q.metadata == {"user": "alice", "job": "a&b"}
    assert q.states == {"running", "paused"}
    assert q.limit == 100 and q.after is None


@pytest.mark.parametrize(
    "params", [{"state": "dead"}, {"limit": "0"}, {"limit": "x"}, {"nextToken": "%%%"}]
)
def test_bad_list_queries(params: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest):
        parse_list_query(params)


def test_page_token_round_trip() -> None:
    assert decode_token(encode_token(1700000000.123456, "abc123")) == (1700000000.123456, "abc123")


def test_timestamps_parse_as_the_sdk_parses_them() -> None:
    assert datetime.fromisoformat(iso(1700000000.5)).timestamp() == 1700000000.5
