from __future__ import annotations

from pathlib import Path

import pytest

from coppice.errors import Forbidden, InvalidRequest, Unauthorized
from coppice.gateway.auth import ALL_SCOPES, DEFAULT_TENANT, KeyRing, Scope, parse_keys


def test_bare_and_scoped_keys() -> None:
    keys = parse_keys("abc, acme:s3cret:create|read ,")
    assert [k.key for k in keys] == ["abc", "s3cret"]
    assert keys[0].principal.tenant == DEFAULT_TENANT
    assert keys[0].principal.scopes == ALL_SCOPES
    assert keys[1].principal.tenant == "acme"
    assert keys[1].principal.scopes == {Scope.CREATE, Scope.READ}


@pytest.mark.parametrize("spec", ["a:b", "acme::read", ":k:read", "acme:k:fly"])
def test_malformed_keys_are_rejected_without_echoing_the_secret(spec: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_keys(spec)
    assert spec not in str(info.value)


def test_x_api_key_and_bearer_both_authenticate() -> None:
    ring = KeyRing(parse_keys("t1:one:read,two"))
    assert ring.authenticate({"x-api-key": "one"}).tenant == "t1"
    assert ring.authenticate({"authorization": "Bearer two"}).tenant == DEFAULT_TENANT


def test_wrong_and_missing_keys_are_401() -> None:
    ring = KeyRing(parse_keys("one"))
    with pytest.raises(Unauthorized, match="invalid"):
        ring.authenticate({"x-api-key": "onf"})
    with pytest.raises(Unauthorized, match="missing"):
        ring.authenticate({})


def test_missing_scope_is_403() -> None:
    who = KeyRing(parse_keys("t:k:read")).authenticate({"x-api-key": "k"})
    who.require(Scope.READ)
    with pytest.raises(Forbidden, match="manage"):
        who.require(Scope.MANAGE)


def test_no_keys_means_open() -> None:
    ring = KeyRing([])
    assert ring.open
    assert ring.authenticate({}).scopes == ALL_SCOPES


def test_keys_file_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nacme:k1:read  # read-only\n\nk2\n")
    ring = KeyRing.from_settings("k3", str(path))
    assert ring.authenticate({"x-api-key": "k1"}).tenant == "acme"
    assert ring.authenticate({"x-api-key": "k2"}).scopes == ALL_SCOPES
    assert ring.authenticate({"x-api-key": "k3"})
