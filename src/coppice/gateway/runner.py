"""Starting the gateway: refuse unsafe set-ups before anything runs, tell the user how to point
the SDK at it, then hand over to uvicorn (which stops accepting on SIGTERM and lets requests in
flight finish; sandboxes keep running and the next start adopts them)."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from coppice.config import Settings
from coppice.errors import InvalidRequest, TemplateNotFound
from coppice.gateway.app import GatewayApp, build_gateway
from coppice.gateway.auth import KeyRing
from coppice.gateway.catalog import TemplateCatalog
from coppice.gateway.sandbox_dns import SandboxNetworkService
from coppice.pool.controller import PoolController
from coppice.store.store import Store

KEEP_ALIVE_S = 310


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GatewayRunner:
    def __init__(self, settings: Settings, host: str, port: int) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.keys = KeyRing.from_settings(settings.api_keys, settings.api_keys_file)

    def check(self) -> None:
        if not 0 < self.port < 65536:
            raise InvalidRequest(f"--port {self.port} is not a port number")
        if self.keys.open and not _loopback(self.host):
            raise InvalidRequest(
                f"no API keys are configured, so the gateway listens only on loopback, not "
                f"{self.host}; set COPPICE_API_KEYS (e.g. COPPICE_API_KEYS=team:SECRET:"
                "create|read|manage) or serve on 127.0.0.1"
            )
        catalog = TemplateCatalog(Store(self.settings.database_path))
        for name in self.settings.pool_target_map():
            try:
                catalog.store.get_template(name)
            except TemplateNotFound:
                raise TemplateNotFound(name) from None

    def banner(self) -> list[str]:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host  # noqa: S104
        url = f"http://{shown}:{self.port}"
        key = "<one of COPPICE_API_KEYS>" if not self.keys.open else "local"
        lines = []
        if self.keys.open:
            lines.append("no API keys configured: any key is accepted, listening on loopback only")
        lines += [
            f"coppice gateway on {url}; point the e2b SDK at it with:",
            f"  export E2B_API_URL={url}",
            f"  export E2B_SANDBOX_URL={url}",
            f"  export E2B_API_KEY={key}",
        ]
        return lines

    def run(self, controller: PoolController) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        # One line per relayed request is noise (and time) on the hot path.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        app = build_gateway(self.settings, controller)
        networks = SandboxNetworkService(self.settings, controller, self.port)
        networks.start()
        try:
            self._serve(app)
        finally:
            networks.stop()

    def _serve(self, app: GatewayApp) -> None:
        uvicorn.run(
            app,
            host=self.host,
            port=self.port,
            access_log=False,
            log_level="info",
            timeout_graceful_shutdown=5,
            # Longer than the SDK's own idle expiry (E2B_KEEPALIVE_EXPIRY, 300 s): the client
            # must be the one to drop an idle connection, or it may reuse one the server is
            # closing at that instant and see a reset.
            timeout_keep_alive=KEEP_ALIVE_S,
        )
