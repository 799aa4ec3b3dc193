from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from coppice.errors import InvalidRequest, NotSupportedYet
from coppice.gateway.wire import (
    ConnectRequest,
    PauseRequest,
    decode_token,
    encode_token,
    iso,
    parse_connect,
    parse_create,
    parse_list_query,
    parse_pause,
    timeout_value,
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


def test_list_defaults_to_newest_first_as_e2b() -> None:
    assert parse_list_query({}).newest_first
    assert not parse_list_query({"order": "asc"}).newest_first


def test_list_filters_started_after_and_template() -> None:
    q = parse_list_query({"startedAfter": "2026-01-01T00:00:00Z", "template": "base"})
    assert q.started_after == datetime.fromisoformat("2026-01-01T00:00:00+00:00").timestamp()
    assert q.template == "base"
    # The SDK sends a local time with its offset.
    q = parse_list_query({"startedAfter": "2026-01-01T01:00:00+01:00"})
    assert q.started_after == datetime.fromisoformat("2026-01-01T00:00:00+00:00").timestamp()


def test_list_refuses_a_filter_it_does_not_know() -> None:
    with pytest.raises(InvalidRequest, match=r"unknown query parameter.*'owner'"):
        parse_list_query({"owner": "alice"})
    with pytest.raises(InvalidRequest, match="startedAfter"):
        parse_list_query({"startedAfter": "yesterday"})
    with pytest.raises(InvalidRequest, match="limit"):
        parse_list_query({"limit": "101"})  # E2B's page is at most 100


def test_total_running_only_when_running_is_asked_for() -> None:
    assert parse_list_query({}).counts_running
    assert parse_list_query({"state": "running,paused"}).counts_running
    assert not parse_list_query({"state": "paused"}).counts_running


@pytest.mark.parametrize(
    ("body", "feature"),
    [
        ({"network": {"dnsServers": ["198.51.100.53"]}}, "network.dnsServers"),
        ({"network": {"rules": {"x.example": [{"transform": {}}]}}}, "network.rules"),
        ({"network": {"maskRequestHost": "${PORT}-x.example"}}, "maskRequestHost"),
        ({"mcp": {"github": {}}}, "MCP"),
        ({"volumeMounts": [{"name": "v", "path": "/data"}]}, "volumeMounts"),
        ({"iam": {"tokens": {"a": {}}}}, "iam"),
        ({"secure": False}, "secure=false"),
    ],
)
def test_fields_coppice_cannot_honour_are_refused_by_name(
    body: dict[str, Any], feature: str
) -> None:
    with pytest.raises(NotSupportedYet, match=feature) as info:
        parse_create({"templateID": "base", **body}, 300, 3600)
    assert "not supported by Coppice yet" in str(info.value)


def test_defaults_the_sdk_sends_are_accepted() -> None:
    req = parse_create(
        {
            "templateID": "base",
            "allow_internet_access": True,
            "network": {"allowPublicTraffic": False, "allowOut": [], "denyOut": []},
            "autoPauseMemory": True,
            "secure": True,
            "mcp": None,
            "volumeMounts": [],
        },
        300,
        3600,
    )
    assert req.public_traffic is False
    assert parse_create({"templateID": "base"}, 300, 3600).public_traffic is True


def test_pause_and_connect_bodies() -> None:
    assert parse_pause({}) == PauseRequest(strict=False, keep_memory=True)
    assert parse_pause({"requireHealthyGuest": True}) == PauseRequest(True, True)
    assert parse_pause({"memory": False}) == PauseRequest(False, keep_memory=False)
    with pytest.raises(InvalidRequest, match="memory"):
        parse_pause({"memory": "no"})
    assert parse_connect({}, 3600) == ConnectRequest(None)
    assert parse_connect({"timeout": 0}, 3600) == ConnectRequest(0)
    assert parse_connect({"memory": False}, 3600) == ConnectRequest(None, reboot=True)


def test_a_files_only_auto_pause_is_its_own_timeout_action() -> None:
    files = {"templateID": "base", "autoPause": True, "autoPauseMemory": False}
    assert parse_create(files, 300, 3600).on_timeout == "pause_files"
    assert parse_create({**files, "autoPauseMemory": True}, 300, 3600).on_timeout == "pause"
    assert parse_create({**files, "autoPause": False}, 300, 3600).on_timeout == "kill"


def test_set_timeout_accepts_zero_only_when_asked() -> None:
    assert timeout_value(0, "timeout", 3600, minimum=0) == 0
    with pytest.raises(InvalidRequest):
        timeout_value(0, "timeout", 3600)
