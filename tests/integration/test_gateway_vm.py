"""The e2b SDKs on a `vm` template through the gateway, and the smoke rig on the vm substrate:
the same surfaces as for jails, with real QEMU clones (TCG on these machines)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox
from e2b_code_interpreter import Sandbox as CodeSandbox

from coppice.pool.controller import PoolController
from coppice.store.records import TemplateRecord

from .conftest import run_cli
from .gateway_process import GatewayProcess, sdk_pointed_at

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# First, before the module's gateway exists: its keeper would refill the pool the rig drains.
def test_smoke_rig_on_the_vm_substrate(
    cli_env: dict[str, str], vm_template: TemplateRecord, controller: PoolController
) -> None:
    controller.drain(vm_template.name)
    done = run_cli(cli_env, "smoke", "--substrate", "vm", "--count", "2", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ALL GATES PASSED" in done.stdout


@pytest.fixture(scope="module")
def vm_gateway(
    cli_env: dict[str, str],
    vm_template: TemplateRecord,
    controller: PoolController,
    instance_dir: Path,
) -> Iterator[GatewayProcess]:
    controller.drain(vm_template.name)
    gw = GatewayProcess(
        cli_env, instance_dir / "gateway-vm.log", COPPICE_POOL_TARGETS=f"{vm_template.name}=2"
    ).start(timeout_s=600)
    try:
        with sdk_pointed_at(gw):
            yield gw
    finally:
        controller.drain(vm_template.name)


def test_sdk_on_a_vm_sandbox(vm_gateway: GatewayProcess, vm_template: TemplateRecord) -> None:
    sbx = Sandbox.create(template=vm_template.name, envs={"WHERE": "vm"})
    try:
        r = sbx.commands.run("echo $WHERE; uname -r; cat /proc/cmdline | grep -o coppice.ip")
        lines = r.stdout.split()
        assert lines[0] == "vm" and "coppice.ip" in lines  # a guest kernel, not the host's
        assert sbx.commands.run("whoami").stdout.strip() == "user"
        data = os.urandom(256 * 1024)
        sbx.files.write("/home/user/blob.bin", data)
        assert sbx.files.read("/home/user/blob.bin", format="bytes") == data
        assert sbx.files.exists("/home/user/blob.bin")
    finally:
        assert sbx.kill() is True


def test_run_code_on_a_vm_sandbox(vm_gateway: GatewayProcess, vm_template: TemplateRecord) -> None:
    ci = CodeSandbox.create(template=vm_template.name)
    try:
        ex = ci.run_code("import random\nprint('hi')\n6 * 7")
        assert ex.text == "42" and ex.logs.stdout == ["hi\n"] and ex.error is None
        assert ci.run_code("1/0").error is not None
    finally:
        ci.kill()


def test_two_vm_sandboxes_do_not_share_identity_or_randomness(
    vm_gateway: GatewayProcess, vm_template: TemplateRecord
) -> None:
    a = CodeSandbox.create(template=vm_template.name)
    b = CodeSandbox.create(template=vm_template.name)
    try:
        probe = "import random, socket; (socket.gethostname(), random.random())"
        assert a.run_code(probe).text != b.run_code(probe).text
        ips = [s.commands.run("hostname -I").stdout.split()[0] for s in (a, b)]
        assert ips[0] != ips[1]
    finally:
        a.kill()
        b.kill()
