"""What a vm clone's usage is read from: the resident part of QEMU's guest RAM mapping."""

from __future__ import annotations

from coppice.substrates.vm_usage import mapping_rss

SMAPS = """\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:00 1234       /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 900 kB
7f0000000000-7f0010000000 rw-p 00000000 00:1a 99                         /dev/shm/c-vm-k.ram
Size:             262144 kB
Rss:               40960 kB
Pss:               30000 kB
VmFlags: rd wr mr mw me
7f0010000000-7f0020000000 rw-p 10000000 00:1a 99        /dev/shm/c-vm-k.ram (deleted)
Size:             262144 kB
Rss:                1024 kB
7f0030000000-7f0034000000 rw-p 00000000 00:00 0
Rss:               65536 kB
"""


def test_resident_guest_ram_is_the_rss_of_the_ram_files_mappings() -> None:
    assert mapping_rss(SMAPS, "/dev/shm/c-vm-k.ram") == (40960 + 1024) * 1024
    assert mapping_rss(SMAPS, "/dev/shm/other.ram") == 0
