"""Why a sandbox died, judged from what it left behind: exact sentences for each cause."""

from __future__ import annotations

from coppice.pool.deaths import DeathReason, diagnose
from coppice.substrates.cgroups import OomCounters
from coppice.substrates.post_mortem import Findings

MIB = 1024 * 1024
BOOT = 1_700_000_000.0
MADE = BOOT + 600  # the entry was made after the boot


def _findings(
    oom: OomCounters | None = None, status: int | None = None, tail: tuple[str, ...] = ()
) -> Findings:
    return Findings(oom=oom, exit_status=status, console_tail=tail)


def test_an_entry_older_than_the_boot_died_with_the_host() -> None:
    # Whatever is (not) left: after a reboot nothing can be read, and nothing else matters.
    found = diagnose(_findings(status=-9), created_at=BOOT - 5, boot_time=BOOT)
    assert found.reason is DeathReason.HOST_RESTARTED
    assert found.detail == (
        "the host restarted (it booted at 2023-11-14T22:13:20Z); no sandbox outlives its "
        "host's restart: create a new one"
    )


def test_an_oom_kill_is_the_cause_even_when_its_victim_was_init() -> None:
    oom = OomCounters(oom_kills=2, limit_hits=41, limit_bytes=512 * MIB)
    found = diagnose(_findings(oom, status=137), MADE, BOOT)
    assert found.reason is DeathReason.OUT_OF_MEMORY and found.oom_kills == 2
    assert found.detail == (
        "out of memory: the kernel's OOM killer ended 2 processes of it at its 512 MiB limit "
        "(usage reached the limit 41 times); give the template more memory (memory_mb) or "
        "make the code use less"
    )


def test_without_a_limit_in_the_cgroup_the_templates_limit_is_named() -> None:
    oom = OomCounters(oom_kills=1, limit_hits=1, limit_bytes=(1 << 63) - 4096)
    found = diagnose(_findings(oom), MADE, BOOT, memory_mb=1024)
    assert "ended 1 process of it at its 1024 MiB limit" in found.detail


def test_exit_statuses_say_how_the_head_ended() -> None:
    signalled = diagnose(_findings(status=-9), MADE, BOOT)
    assert signalled.reason is DeathReason.CRASHED
    assert signalled.detail == "its head process was killed by signal 9 (SIGKILL)"
    # bwrap (and a shell) report a child killed by a signal as 128 + the signal
    assert diagnose(_findings(status=137), MADE, BOOT).detail == (
        "its init ended with status 137: killed by signal 9 (SIGKILL)"
    )
    assert diagnose(_findings(status=1), MADE, BOOT).detail == "its init exited with status 1"


def test_zero_oom_kills_do_not_make_a_memory_death() -> None:
    found = diagnose(_findings(OomCounters(0, 3, 512 * MIB), status=1), MADE, BOOT)
    assert found.reason is DeathReason.CRASHED and found.oom_kills == 0


def test_nothing_seen_is_said_plainly_with_the_consoles_last_line() -> None:
    found = diagnose(_findings(tail=("booting", "agent: fatal: no such file")), MADE, None)
    assert found.reason is DeathReason.UNKNOWN
    assert found.detail == (
        "its processes ended and no cause was seen (no OOM kill, no exit status); the last "
        "line of its console: 'agent: fatal: no such file'"
    )
    long_line = "x" * 500
    quoted = diagnose(_findings(status=2, tail=(long_line,)), MADE, BOOT).detail
    assert quoted.endswith("…'") and len(quoted) < 300


def test_a_forked_jails_exit_status_is_read_from_its_init_s_last_console_line() -> None:
    from coppice.substrates.post_mortem import init_exit_status

    assert (
        init_exit_status(("coppice-agent ... INFO started", "coppice-init: exit status 137")) == 137
    )
    assert init_exit_status(("coppice-init: exit status 1", "later noise")) == 1
    assert init_exit_status(("no such line",)) is None
