"""Which sandbox a presigned file URL is for, when the URL does not say.

The SDK builds `download_url()` / `upload_url()` from the sandbox's direct URL. Behind one
origin (`E2B_SANDBOX_URL`) that is the same for every sandbox, and a browser or `curl`
fetching it sends none of the SDK's routing headers: all the gateway sees is
`/files?path=…&signature=v1_…`. The signature is a SHA-256 over the path, the operation, the
user and the sandbox's access token, so exactly one sandbox's token reproduces it: the
gateway, which holds every token, finds that one. Expiry is left to the agent, which checks
the same signature again before it serves the file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import parse_qs

SIGNATURE_PREFIX = "v1_"


def is_presigned_files_request(path: str, query: str) -> bool:
    return path == "/files" and "signature=" in query


def signed_for(method: str, query: str, tokens: Iterable[tuple[str, str]]) -> str | None:
    """The id among `(sandbox_id, access_token)` pairs whose token signed this request."""
    params = parse_qs(query, keep_blank_values=True)

    def one(name: str) -> str:
        return str(params.get(name, [""])[0])

    signature = one("signature")
    if not signature.startswith(SIGNATURE_PREFIX):
        return None
    operation = "write" if method.upper() == "POST" else "read"
    head = f"{one('path')}:{operation}:{one('username')}:"
    expiration = one("signature_expiration")
    tail = f":{expiration}" if expiration else ""
    presented = signature.encode()
    for sandbox_id, token in tokens:
        digest = hashlib.sha256(f"{head}{token}{tail}".encode()).digest()
        expected = SIGNATURE_PREFIX + base64.b64encode(digest).decode().rstrip("=")
        if hmac.compare_digest(presented, expected.encode()):
            return sandbox_id
    return None
