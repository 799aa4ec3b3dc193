"""The loop_config the kernel is handed has the kernel's layout."""

from __future__ import annotations

from coppice.host import loop_devices


def test_loop_config_is_as_large_as_the_kernel_s() -> None:
    # sizeof(struct loop_config) in linux/loop.h: 8 + sizeof(struct loop_info64) (232) + 64
    assert loop_devices._LOOP_CONFIG.size == 304
