"""The nftables text of the egress table: which rule comes before which, and idempotence."""

from __future__ import annotations

from coppice.egress_policy import EgressPolicy
from coppice.net.egress_rules import (
    EgressHost,
    base_ruleset,
    clear_ruleset,
    pin_ruleset,
    sandbox_ruleset,
)

HOST = EgressHost(
    bridge="coppicenet0",
    subnet="10.78.0.0/24",
    sandbox_ranges=("10.77.0.0/24", "10.79.240.0/20"),
    egress_interface="",
    opened=("10.5.0.0/16",),
)


def _rules(text: str, chain: str, host: EgressHost = HOST) -> list[str]:
    prefix = f"add rule ip {host.table} {chain} "
    return [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]


def test_what_no_policy_lifts_comes_before_the_policies() -> None:
    out = _rules(base_ruleset(HOST), "outbound")
    assert out == [
        "ip daddr @never counter drop",
        "ip daddr @opened goto by_sandbox",
        "ip daddr @private counter drop",
        "goto by_sandbox",
    ]
    never = next(line for line in base_ruleset(HOST).splitlines() if "add element" in line)
    for net in ("169.254.0.0/16", "10.78.0.0/24", "10.77.0.0/24", "10.79.240.0/20"):
        assert net in never
    assert _rules(base_ruleset(HOST), "by_sandbox") == ["ip saddr vmap @policies", "accept"]


def test_into_a_sandbox_only_answers_pass() -> None:
    assert _rules(base_ruleset(HOST), "forward") == [
        'oifname "coppicenet0" ct state established,related accept',
        'oifname "coppicenet0" counter drop',
        'iifname "coppicenet0" jump outbound',
    ]


def test_an_egress_interface_is_the_only_way_out() -> None:
    host = EgressHost("br", "10.79.0.0/24", egress_interface="coppinet0", internet_by_default=False)
    text = base_ruleset(host)
    assert _rules(text, "outbound", host)[0] == 'oifname != "coppinet0" counter drop'
    assert 'oifname "coppinet0" masquerade' in text
    assert "by_sandbox counter drop" in text


def test_the_base_can_be_loaded_again_without_losing_sandboxes() -> None:
    text = base_ruleset(HOST)
    assert "delete" not in text
    assert "flush map" not in text  # the sandboxes' verdicts stay


def test_a_sandbox_chain_lets_allowed_beat_denied() -> None:
    p = EgressPolicy.parse(True, ["198.51.100.7", "example.com"], ["198.51.100.0/24"])
    text = sandbox_ruleset(HOST, "10.78.0.50", p)
    assert _rules(text, "sb_10_78_0_50") == [
        "ip daddr @allow_10_78_0_50 accept",
        "ip daddr @pin_10_78_0_50 accept",
        "ip daddr @deny_10_78_0_50 counter drop",
        "accept",
    ]
    assert "add element ip coppice_egress_coppicenet0 allow_10_78_0_50 { 198.51.100.7/32 }" in text
    assert text.splitlines()[-1].endswith("policies { 10.78.0.50 : goto sb_10_78_0_50 }")


def test_overlapping_rules_are_merged_for_interval_sets() -> None:
    p = EgressPolicy.parse(True, [], ["198.51.100.0/24", "198.51.100.7", "0.0.0.0/0"])
    text = sandbox_ruleset(HOST, "10.78.0.50", p)
    assert "deny_10_78_0_50 { 0.0.0.0/0 }" in text


def test_clearing_works_whether_or_not_there_were_rules() -> None:
    lines = clear_ruleset(HOST, "10.78.0.50").splitlines()
    add = next(i for i, line in enumerate(lines) if line.startswith("add element"))
    delete = next(i for i, line in enumerate(lines) if line.startswith("delete element"))
    assert add < delete
    assert lines[-1] == "delete set ip coppice_egress_coppicenet0 pin_10_78_0_50"


def test_pins_get_a_fresh_timeout() -> None:
    text = pin_ruleset(HOST, "10.78.0.50", ["203.0.113.10", "203.0.113.10"])
    assert text.count("timeout 3600s") == 2 and text.count("delete element") == 1
    assert pin_ruleset(HOST, "10.78.0.50", []) == ""
