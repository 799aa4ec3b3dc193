"""The accelerator decision: KVM only where it can boot a stock guest kernel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coppice.substrates import accel
from coppice.substrates.accel import KVM, TCG, HostFacts, decide


@pytest.mark.parametrize(
    ("flags", "usable", "pvm", "expected"),
    [
        ({"vmx"}, True, False, KVM),
        ({"svm"}, True, False, KVM),
        ({"vmx"}, False, False, TCG),  # no /dev/kvm
        (set(), True, True, TCG),  # PVM only (this project's CI machines)
        (set(), True, False, TCG),  # a /dev/kvm without hardware support
        (set(), False, False, TCG),
        ({"svm"}, True, True, KVM),  # real hardware wins over a PVM module beside it
    ],
)
def test_decision_table(flags: set[str], usable: bool, pvm: bool, expected: str) -> None:
    assert decide(HostFacts(frozenset(flags), usable, pvm)).accel == expected


def test_pvm_reason_names_it() -> None:
    assert "PVM" in decide(HostFacts(frozenset(), True, True)).reason


def test_read_facts_from_fake_host(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 svm avx\n")
    modules = tmp_path / "module"
    (modules / "kvm_pvm").mkdir(parents=True)
    facts = accel.read_facts(cpuinfo, tmp_path / "no-kvm", modules)
    assert facts == HostFacts(frozenset({"svm"}), False, True)
    (modules / "kvm_amd").mkdir()
    assert not accel.read_facts(cpuinfo, tmp_path / "no-kvm", modules).pvm_only


def test_choice_is_probed_once_and_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def fake_facts() -> HostFacts:
        calls.append(1)
        return HostFacts(frozenset(), True, True)

    monkeypatch.setattr(accel, "read_facts", fake_facts)
    first = accel.choose(tmp_path)
    second = accel.choose(tmp_path)
    assert first == second and first.accel == TCG
    assert len(calls) == 1
    assert json.loads((tmp_path / accel.CACHE_NAME).read_text())["accel"] == TCG


def test_a_stale_cache_is_probed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / accel.CACHE_NAME).write_text(json.dumps({"version": 0, "accel": "kvm"}))
    monkeypatch.setattr(accel, "read_facts", lambda: HostFacts(frozenset({"vmx"}), True, False))
    assert accel.choose(tmp_path).accel == KVM
