from __future__ import annotations

from coppice.net.host_guard import ruleset, table_name


def test_table_names_are_nft_identifiers() -> None:
    assert table_name("coppicenet0") == "coppice_guard_coppicenet0"
    assert table_name("br-x.1") == "coppice_guard_br_x_1"


def test_ruleset_replaces_its_table_atomically_and_drops_new_inbound() -> None:
    text = ruleset("coppicenet0")
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == "table inet coppice_guard_coppicenet0 {}"
    assert lines[1] == "delete table inet coppice_guard_coppicenet0"
    accept = lines.index('iifname "coppicenet0" ct state established,related accept')
    drop = lines.index('iifname "coppicenet0" counter drop')
    assert accept < drop
