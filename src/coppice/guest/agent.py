"""The in-sandbox agent. It runs INSIDE every sandbox on the template's python3 and imports
nothing but the standard library (nothing from the host side of Coppice).

For now it answers the pool's readiness probe; the E2B-compatible services (process,
filesystem, files, code interpreter) will be mounted on this same server.
"""

from __future__ import annotations

import json
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

AGENT_PORT = 49983


class AgentHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "coppice-agent/0.1"

    def do_GET(self) -> None:
        if self.path == "/health":
            body = json.dumps(
                {"status": "ok", "entry": os.environ.get("COPPICE_ENTRY_ID", "")}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404, "no such endpoint")

    def log_message(self, format: str, *args: object) -> None:
        pass  # probes arrive every few milliseconds while warming; keep the log quiet


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        # Answers go out in one small write; do not let Nagle hold them back.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


def main() -> None:
    AgentServer(("0.0.0.0", AGENT_PORT), AgentHandler).serve_forever()  # noqa: S104


if __name__ == "__main__":
    main()
