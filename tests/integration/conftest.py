"""Integration fixtures: a private Coppice instance with real jails, torn down completely.

The instance has its own state directory, run directory, cgroup/netns prefix, bridge and
subnet (10.79.0.0/24), so it never touches a production pool on the same host. Its template
is built from scratch (only the host-level .deb cache is reused): this is the image-build gate.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from coppice.config import Settings
from coppice.images.builder import TemplateBuilder
from coppice.pool.controller import PoolController
from coppice.store.records import TemplateRecord
from coppice.store.store import Store
from coppice.substrates.build_jail import template_builder

from .gateway_process import GatewayProcess, serving
from .hostscan import HostSnapshot
from .internet import DNS_SERVER, HOST_LINK, TestInternet

pytestmark = pytest.mark.integration

#: COPPICE_TEST_INSTANCE=1..7 gives a run its own names and subnets, so that runs from
#: several checkouts can share the host at once; unset, the one instance CI uses
_INSTANCE = os.environ.get("COPPICE_TEST_INSTANCE", "")
if _INSTANCE and not (_INSTANCE.isdigit() and 1 <= int(_INSTANCE) <= 7):
    raise RuntimeError("COPPICE_TEST_INSTANCE must be a number from 1 to 7")
if _INSTANCE:
    TEST_NAMESPACE = f"coppice-t{_INSTANCE}"
    TEST_BRIDGE = f"coppt{_INSTANCE}br"
    TEST_SUBNET = f"10.79.{16 + int(_INSTANCE)}.0/24"
    TEST_VM_BRIDGE = f"coppt{_INSTANCE}vm"
    TEST_VM_SUBNET = f"10.80.{16 + int(_INSTANCE)}.0/24"
else:
    TEST_NAMESPACE = "coppice-test"
    TEST_BRIDGE = "coppicetest0"
    TEST_SUBNET = "10.79.0.0/24"
    TEST_VM_BRIDGE = "copptestvm0"
    TEST_VM_SUBNET = "10.80.0.0/24"


#: the links this instance owns beyond its entries' (for the leak check)
TEST_LINKS = (TEST_BRIDGE, TEST_VM_BRIDGE, HOST_LINK)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="integration tests start real jails and need root")
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(skip)


#: the instance directory, once made: a failed test's report shows its gateways' last lines
_INSTANCE_DIR: list[Path] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _INSTANCE_DIR:
        # The instance (and its logs) is deleted at the session's end: CI keeps only this.
        recent = time.time() - 900
        for log in sorted(_INSTANCE_DIR[0].glob("gateway*.log")):
            if log.stat().st_mtime > recent:
                tail = log.read_text(errors="replace").splitlines()[-40:]
                report.sections.append((f"last lines of {log.name}", "\n".join(tail)))
    return report


@pytest.fixture(scope="session")
def instance_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="coppice-it-", dir="/var/tmp"))
    # As /var/lib is: build sandboxes (unprivileged ids) read staged files below it.
    path.chmod(0o755)
    _INSTANCE_DIR.append(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def config_file(instance_dir: Path) -> Path:
    path = instance_dir / "config.toml"
    path.write_text(
        f'state_dir = "{instance_dir / "state"}"\n'
        f'run_dir = "/run/{TEST_NAMESPACE}"\n'
        f'namespace = "{TEST_NAMESPACE}"\n'
        # No sandbox packet leaves this machine: the only way out is the test internet's
        # link (tests/integration/internet.py), which exists only while egress tests run.
        f'egress_interface = "{HOST_LINK}"\n'
        f'dns_upstreams = "{DNS_SERVER}"\n'
        # Pools follow demand; a test module's creates would grow them to dozens of entries
        # warming beside the tests. Four keep the behaviour and bound the CPU it costs.
        "pool_max = 4\n"
        f"[jail_network]\n"
        f'bridge = "{TEST_BRIDGE}"\n'
        f'subnet = "{TEST_SUBNET}"\n'
        f"[vm_network]\n"
        f'bridge = "{TEST_VM_BRIDGE}"\n'
        f'subnet = "{TEST_VM_SUBNET}"\n'
    )
    return path


@pytest.fixture(scope="session")
def settings(config_file: Path) -> Settings:
    return Settings.load({"COPPICE_CONFIG": str(config_file)})


@pytest.fixture(scope="session")
def cli_env(config_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["COPPICE_CONFIG"] = str(config_file)
    return env


@pytest.fixture(scope="session")
def host_before(settings: Settings) -> HostSnapshot:
    return HostSnapshot.take(TEST_NAMESPACE, TEST_LINKS, settings.entry_disks_dir)


@pytest.fixture(scope="session")
def controller(settings: Settings, host_before: HostSnapshot) -> Iterator[PoolController]:
    c = PoolController(settings, Store(settings.database_path))
    c.init_host()
    yield c
    for t in c.store.list_templates():
        c.drain(t.name)
    c.deinit_host()

    def leaked() -> dict[str, set[str]]:
        after = HostSnapshot.take(TEST_NAMESPACE, TEST_LINKS, settings.entry_disks_dir)
        return after.minus(host_before)

    # Another instance on this host can have a link of its own loose for a moment (made,
    # not yet on its bridge); a leak of ours is still there on the second look.
    found = leaked()
    if found:
        time.sleep(2)
        again = leaked()
        found = {kind: names & again.get(kind, set()) for kind, names in found.items()}
        found = {kind: names for kind, names in found.items() if names}
    assert not found, f"integration tests leaked host objects: {found}"


def builder(controller: PoolController) -> TemplateBuilder:
    return template_builder(controller.settings, controller.store)


@pytest.fixture(scope="session")
def template(controller: PoolController) -> TemplateRecord:
    record, _built = builder(controller).build("python")
    return record


@pytest.fixture(scope="session")
def base_template(controller: PoolController) -> TemplateRecord:
    """E2B's `base` image (node, git, sudo, ...), built once per test session."""
    record, _built = builder(controller).build("base")
    return record


@pytest.fixture(scope="session")
def code_interpreter_template(
    controller: PoolController, base_template: TemplateRecord
) -> TemplateRecord:
    """E2B's code interpreter image (`base` + data packages, kernels, charts), built once per
    test session on the session's `base`."""
    record, _built = builder(controller).build("code-interpreter-v1")
    return record


@pytest.fixture()
def pool(controller: PoolController, template: TemplateRecord) -> Iterator[PoolController]:
    """The controller with an empty pool before and after the test."""
    controller.drain(template.name)
    yield controller
    controller.drain(template.name)
    controller.reconcile()


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("coppice") or str(Path(__file__).parents[2] / ".venv/bin/coppice")
    return subprocess.run(
        [exe, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def vm_template(controller: PoolController) -> Iterator[TemplateRecord]:
    """The python-vm template; its golden snapshot (RAM in /dev/shm) goes with the session."""
    record, _built = builder(controller).build("python-vm")
    yield record
    controller.drain(record.name)
    controller.substrate("vm").forget_template(record.name)


@pytest.fixture()
def vm_pool(controller: PoolController, vm_template: TemplateRecord) -> Iterator[PoolController]:
    """The controller with an empty python-vm pool before and after the test."""
    controller.drain(vm_template.name)
    yield controller
    controller.drain(vm_template.name)
    controller.reconcile()


@pytest.fixture(scope="session")
def internet(controller: PoolController) -> Iterator[TestInternet]:
    """The made-up internet the instance's sandboxes reach (after `controller`, so that it
    is gone before the leak check)."""
    world = TestInternet(f"{TEST_NAMESPACE}-inet").start()
    yield world
    world.stop()


#: warm entries of `base` and `code-interpreter-v1` the SDK suites' gateway keeps
SDK_POOL = 4
CODE_POOL = 2


@pytest.fixture(scope="module")
def gateway(
    cli_env: dict[str, str],
    base_template: TemplateRecord,
    code_interpreter_template: TemplateRecord,
    controller: PoolController,
    instance_dir: Path,
) -> Iterator[GatewayProcess]:
    """`coppice serve` on loopback with warm pools of the SDKs' default templates (`base`
    for e2b's Sandbox, `code-interpreter-v1` for the code interpreter's), the SDK pointed
    at it (one per test module)."""
    pools = {base_template.name: SDK_POOL, code_interpreter_template.name: CODE_POOL}
    with serving(cli_env, instance_dir / "gateway.log", pools, controller.drain) as gw:
        yield gw
