"""Signed URLs for a template build's file uploads.

The SDK uploads a COPY step's archive with a bare `PUT` to whatever URL the gateway handed
out (it was made for S3's presigned URLs, so it sends no API key), so the URL itself must be
the permission: an HMAC over the template, the files' hash and an expiry, keyed by a secret
that never leaves this process. A restart makes a new secret, which only costs an upload in
flight its link (the SDK asks for a fresh one on its next build).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import quote, urlencode

from coppice.errors import Forbidden

#: as long as the SDK's own upload timeout (an hour)
UPLOAD_URL_TTL_S = 3600


class UploadSigner:
    def __init__(self, secret: bytes | None = None, ttl_s: int = UPLOAD_URL_TTL_S) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def _signature(self, template: str, files_hash: str, expires: int) -> str:
        message = f"{template}\n{files_hash}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def url(self, base_url: str, template: str, files_hash: str, now: float | None = None) -> str:
        """The absolute URL a `PUT` of the files' archive goes to."""
        expires = int(now if now is not None else time.time()) + self.ttl_s
        query = urlencode(
            {"expires": expires, "signature": self._signature(template, files_hash, expires)}
        )
        path = f"templates/{quote(template, safe='')}/files/{quote(files_hash, safe='')}"
        return f"{base_url.rstrip('/')}/{path}?{query}"

    def check(
        self,
        template: str,
        files_hash: str,
        expires: str | None,
        signature: str | None,
        now: float | None = None,
    ) -> None:
        """Raises Forbidden unless the URL is one this gateway signed and it has not expired."""
        if not expires or not signature or not expires.isdigit():
            raise Forbidden(
                "this upload URL carries no valid signature; get one from "
                f"GET /templates/{template}/files/{files_hash}"
            )
        expected = self._signature(template, files_hash, int(expires))
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise Forbidden(
                "this upload URL's signature is wrong (or the gateway restarted since it was "
                "made); build again to get a new one"
            )
        if int(expires) < (now if now is not None else time.time()):
            raise Forbidden("this upload URL has expired; build again to get a new one")
