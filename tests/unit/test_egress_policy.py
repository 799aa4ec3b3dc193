"""E2B's egress rules, as Coppice reads them and decides on them (no host involved)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coppice.egress_policy import ALL_TRAFFIC, EgressPolicy, domain_matches
from coppice.errors import InvalidRequest, NotSupportedYet
from coppice.gateway.wire import egress_json, parse_create, parse_network_update


def test_allow_out_takes_addresses_networks_and_domains() -> None:
    p = EgressPolicy.parse(True, ["8.8.8.8", "10.0.0.0/8", "Example.COM.", "*.pypi.example"])
    assert p.allow_networks == (
        ipaddress.IPv4Network("8.8.8.8/32"),
        ipaddress.IPv4Network("10.0.0.0/8"),
    )
    assert p.allow_domains == ("example.com", "*.pypi.example")
    assert p.allow_out() == ["8.8.8.8/32", "10.0.0.0/8", "example.com", "*.pypi.example"]


@pytest.mark.parametrize(
    ("allow", "deny", "message"),
    [
        ([], ["example.com"], "deny rules take addresses only"),
        (["exa mple.com"], [], "neither an IPv4 address"),
        (["-bad.example"], [], "neither an IPv4 address"),
        (["2001:db8::/32"], [], "IPv4 networking only"),
        ([], ["2001:db8::1"], "IPv4 networking only"),
    ],
)
def test_bad_rules_are_refused_with_what_to_write(
    allow: list[str], deny: list[str], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        EgressPolicy.parse(True, allow, deny)


def test_internet_off_is_a_deny_of_everything() -> None:
    p = EgressPolicy.parse(False)
    assert p.denied == (ALL_TRAFFIC,) and p.denies_everything
    assert p.deny_out() == []  # as the caller said it: the flag, not a rule


def test_domain_patterns() -> None:
    assert domain_matches("example.com", "EXAMPLE.com.")
    assert not domain_matches("example.com", "www.example.com")
    assert domain_matches("*.example.com", "a.b.example.com")
    assert not domain_matches("*.example.com", "example.com")
    assert not domain_matches("*.example.com", "badexample.com")
    assert domain_matches("*", "anything.example")


def test_what_the_resolver_answers_and_pins() -> None:
    open_ = EgressPolicy.parse(True, [], ["203.0.113.7"])
    assert open_.answers_name("anything.example") and not open_.pins_name("anything.example")
    only = EgressPolicy.parse(True, ["*.allowed.example"], ["0.0.0.0/0"])
    assert only.answers_name("www.allowed.example") and only.pins_name("www.allowed.example")
    # A sandbox that may reach nothing else resolves nothing else: no DNS tunnel out.
    assert not only.answers_name("exfil.attacker.example")
    # Deny rules that leave the rest open: allowed domains must still pass them.
    part = EgressPolicy.parse(True, ["cdn.example"], ["203.0.113.0/24"])
    assert part.answers_name("other.example") and part.pins_name("cdn.example")


def test_plain_policies_need_no_rules_of_their_own() -> None:
    assert EgressPolicy.parse(True).is_plain(internet_by_default=True)
    assert EgressPolicy.parse(True, ["1.2.3.4"]).is_plain(True)  # allow without deny
    assert not EgressPolicy.parse(True, [], ["1.2.3.4"]).is_plain(True)
    assert not EgressPolicy.parse(False).is_plain(True)
    assert EgressPolicy.parse(False).is_plain(internet_by_default=False)
    assert not EgressPolicy.parse(False, ["1.2.3.4"]).is_plain(False)
    assert not EgressPolicy.parse(True).is_plain(False)


_networks = st.builds(
    lambda a, n: str(ipaddress.IPv4Network((a, n), strict=False)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
_domains = st.from_regex(r"(\*\.)?[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)


@given(
    st.booleans(),
    st.lists(st.one_of(_networks, _domains), max_size=6),
    st.lists(_networks, max_size=6),
)
def test_the_store_keeps_a_policy_exactly(
    internet: bool, allow: list[str], deny: list[str]
) -> None:
    p = EgressPolicy.parse(internet, allow, deny)
    assert EgressPolicy.from_json(p.to_json()) == p


# -- on the wire -------------------------------------------------------------------------------


def _create(**body: Any) -> EgressPolicy | None:
    return parse_create({"templateID": "base", **body}, 300, 3600).egress


def test_a_create_without_rules_takes_the_hosts_default() -> None:
    assert _create() is None
    assert _create(network={"allowPublicTraffic": False, "allowOut": [], "denyOut": []}) is None


def test_a_create_states_its_rules() -> None:
    p = _create(allow_internet_access=False)
    assert p is not None and p.denies_everything
    p = _create(network={"allowOut": ["example.com"], "denyOut": ["0.0.0.0/0"]})
    assert p is not None and p.allow_domains == ("example.com",) and p.allow_internet
    # The host-wide default fills in what the caller left out.
    req = parse_create(
        {"templateID": "base", "network": {"denyOut": ["1.2.3.4"]}}, 300, 3600, False
    )
    assert req.egress is not None and req.egress.denies_everything


def test_an_update_replaces_everything_and_clears_what_it_omits() -> None:
    assert parse_network_update({}, True) is None
    p = parse_network_update({"allowOut": ["1.2.3.4"], "allow_internet_access": False}, True)
    assert p is not None and not p.allow_internet and p.allow_out() == ["1.2.3.4/32"]
    with pytest.raises(NotSupportedYet, match="egressProxy"):
        parse_network_update({"egressProxy": {"address": "x:1"}}, True)
    with pytest.raises(InvalidRequest, match="list of strings"):
        parse_network_update({"allowOut": "1.2.3.4"}, True)


def test_the_detail_shows_the_rules_as_given() -> None:
    assert egress_json(None, True) == {"allowInternetAccess": True}
    p = EgressPolicy.parse(False, ["example.com"], ["203.0.113.0/24"])
    assert egress_json(p, True) == {
        "allowInternetAccess": False,
        "network": {"allowOut": ["example.com"], "denyOut": ["203.0.113.0/24"]},
    }
