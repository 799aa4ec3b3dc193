"""The in-place rollback of a VM entry that bench/rollback_bench.py measures against
destroy-and-respawn: QEMU's internal snapshots (`snapshot-save` once, `snapshot-load` on
each return) of the clone's own qcow2 disk, which also holds the saved state."""

from __future__ import annotations

import time
from typing import Any

from coppice.pool.controller import PoolController
from coppice.store.records import TemplateRecord
from coppice.substrates.identity_port import IdentityPort
from coppice.substrates.qmp_channel import QmpChannel
from coppice.substrates.vm import IDENTITY_TIMEOUT_S, VmSubstrate
from latency_stats import percentiles
from vm_bench import pss_mb

TAG = "clean"


def _run_job(qmp: QmpChannel, command: str, arguments: dict[str, Any]) -> None:
    job = f"{command}-{time.monotonic_ns()}"
    qmp.execute(command, {"job-id": job, **arguments})
    delay = 0.0005
    while True:
        (found,) = [j for j in qmp.execute("query-jobs") if j["id"] == job]
        if found["status"] == "concluded":
            qmp.execute("job-dismiss", {"id": job})
            if found.get("error"):
                raise RuntimeError(f"{command}: {found['error']}")
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def _writable_node(qmp: QmpChannel) -> str:
    for block in qmp.execute("query-block"):
        if block["device"] == "d1":
            return str(block["inserted"]["node-name"])
    raise RuntimeError("no writable disk d1")


class VmInPlace:
    def __init__(self, c: PoolController, template: TemplateRecord) -> None:
        vm = c.substrate("vm")
        assert isinstance(vm, VmSubstrate)
        self.c, self.vm, self.template = c, vm, template
        self.pss_after: list[float] = []
        self.pss_fresh: list[float] = []

    def measure(self, c: PoolController, template: TemplateRecord) -> float:
        entry = c.checkout(template.name)
        assert entry.handle is not None and entry.handle.head is not None
        pid = entry.handle.head.pid
        self.pss_fresh.append(pss_mb(pid))
        spec = c._spec(entry, template)
        sock = self.vm.entry_dir(entry.id) / "qmp.sock"
        qmp = QmpChannel.connect(sock, timeout_s=10)
        try:
            node = _writable_node(qmp)
            # Once per entry, not timed: a product would take it while warming.
            _run_job(qmp, "snapshot-save", {"tag": TAG, "vmstate": node, "devices": [node]})
            started = time.perf_counter()
            port = IdentityPort.connect(str(self.vm.entry_dir(entry.id) / "identity.sock"))
            try:
                _run_job(qmp, "snapshot-load", {"tag": TAG, "vmstate": node, "devices": [node]})
                qmp.execute("cont")
                message = self.vm._identity_message(spec, str(entry.handle.driver["mac"]))
                reply = port.request(message | {"time": time.time()}, IDENTITY_TIMEOUT_S)
                assert reply.get("ok"), reply
            finally:
                port.close()
        finally:
            qmp.close()
        self.vm.wait_ready(spec, entry.handle, c.settings.ready_timeout_s)
        self.vm.pause(entry.id, entry.handle)
        took = (time.perf_counter() - started) * 1000
        time.sleep(1)
        self.pss_after.append(pss_mb(pid))
        c.return_entry(entry.id)
        return took

    def memory(self) -> dict[str, Any]:
        return {
            "PSS of a fresh clone, checked out (MB)": percentiles(self.pss_fresh),
            "PSS after an in-place rollback (MB)": percentiles(self.pss_after),
        }
