"""The review app's security headers and request size limit (an ASGI middleware)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

__all__ = ["CONTENT_SECURITY_POLICY", "SecurityHeaders"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Scripts and styles from the app's own files only (no inline code, no eval), images from
#: the app or data URIs (the metrics plots), fetches to the app only (the viewer's volumes and
#: corrections), forms posted to the app only, never framed.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
#: HSTS: one year; sent only when the app is served over TLS.
HSTS = "max-age=31536000"


class SecurityHeaders:
    """Adds the security headers to every response, and refuses oversized request bodies.

    Every response gets a Content-Security-Policy, ``X-Frame-Options: DENY``,
    ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` and
    ``Cache-Control: no-store`` (unless the route set its own, as the static files do); with
    ``tls``, also ``Strict-Transport-Security``. A request declaring a body larger than
    ``max_body`` bytes is answered 413, a POST without ``Content-Length`` 411, before the app
    reads it.

    Parameters
    ----------
    app:
        The ASGI app to wrap.
    tls:
        Whether the app is served over HTTPS.
    max_body:
        Largest request body accepted, in bytes.
    limits:
        Larger limits for some paths (the viewer's corrected masks), in bytes.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tls: bool = False,
        max_body: int = 64 * 1024,
        limits: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.limits = dict(limits or {})
        self.headers = dict(_HEADERS)
        if tls:
            self.headers["strict-transport-security"] = HSTS
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                from starlette.datastructures import MutableHeaders

                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    headers[name] = value
                if "cache-control" not in headers:
                    headers["cache-control"] = "no-store"
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            from starlette.responses import PlainTextResponse

            status, text = refusal
            await PlainTextResponse(text, status_code=status)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        length: str | None = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                length = value.decode("latin-1")
        if length is None:
            if scope.get("method") == "POST":
                return 411, "a POST needs a Content-Length"
            return None
        if not length.isdigit():
            return 400, "bad Content-Length"
        limit = self.limits.get(str(scope.get("path", "")), self.max_body)
        if int(length) > limit:
            return 413, f"request body over {limit} bytes"
        return None
