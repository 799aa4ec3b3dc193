from __future__ import annotations

from coppice.net.host_guard import ruleset, services_ruleset, table_name


def test_table_names_are_nft_identifiers() -> None:
    assert table_name("coppicenet0") == "coppice_guard_coppicenet0"
    assert table_name("br-x.1") == "coppice_guard_br_x_1"


def test_ruleset_rewrites_its_rules_and_drops_new_inbound_but_to_services() -> None:
    lines = [line.strip() for line in ruleset("coppicenet0").splitlines()]
    assert lines[0] == "add table inet coppice_guard_coppicenet0"
    # its rules are replaced, its set of open ports is not
    assert "flush chain inet coppice_guard_coppicenet0 input" in lines
    assert not any(line.startswith(("flush set", "delete")) for line in lines)
    accept = next(i for i, line in enumerate(lines) if "established,related accept" in line)
    services = next(i for i, line in enumerate(lines) if "@services accept" in line)
    drop = lines.index(
        'add rule inet coppice_guard_coppicenet0 input iifname "coppicenet0" counter drop'
    )
    assert accept < services < drop


def test_closing_ports_never_fails_on_ports_not_open() -> None:
    text = services_ruleset("br0", [53, 8080, 53], add=False)
    assert text.splitlines() == [
        "add element inet coppice_guard_br0 services { 53, 8080 }",
        "delete element inet coppice_guard_br0 services { 53, 8080 }",
    ]
    assert services_ruleset("br0", [], add=True) == ""
