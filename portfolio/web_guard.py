"""What both web apps (`portfolio serve`, `portfolio ui`) check before a request reaches a
handler: the ``Host`` header, the body's size and nesting, and the headers every answer of
the dashboard carries.

**Host.** A server on loopback without a key trusts whoever can reach it, and a web page in
the user's browser can reach it through DNS rebinding (``evil.example`` resolving to
127.0.0.1): the browser sends ``Host: evil.example``. So without a key only loopback names
are accepted (``localhost``, 127.0.0.0/8, ``[::1]``), plus the names given with
``--allow-host``. With a key the key is the guard, and any ``Host`` is accepted.
"""

from __future__ import annotations

import ipaddress
import json

MAX_JSON_DEPTH = 64

SECURITY_HEADERS = {
    # nothing is fetched from elsewhere: the vendored CSS and script, inline SVG
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def loopback_name(host: str) -> bool:
    """Whether a host name (no port) is loopback: ``localhost`` or a loopback address."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """The name in a ``Host`` header, without its port."""
    header = header.strip()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(header: str | None, keyed: bool, allowed: tuple[str, ...] = ()) -> bool:
    """Whether a request with this ``Host`` header may be answered (see the module docstring)."""
    if keyed:
        return True
    if not header:
        return False
    name = host_of(header)
    return loopback_name(name) or name.lower() in {a.lower() for a in allowed}


def host_refusal(header: str | None) -> str:
    """The message for a refused ``Host``."""
    return (f"Host {str(header)[:100]!r} is not a loopback name; a server without an API key answers only "
            "localhost/127.0.0.1/[::1] (start it with --allow-host NAME, or with an API key)")


def too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON body nests deeper than ``limit`` (counted over brackets outside strings,
    without parsing, so a 100,000-deep body costs one pass and no recursion)."""
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def parse_json_body(body: bytes) -> str | None:
    """None if ``body`` is JSON an app may parse, else why not (one line)."""
    if too_deep(body):
        return f"the body nests deeper than {MAX_JSON_DEPTH} levels"
    try:
        json.loads(body or b"null")
    except (ValueError, RecursionError):
        return "the body is not valid JSON"
    return None


async def read_limited(request, limit: int) -> bytes | None:
    """The request body, or None as soon as it passes ``limit`` bytes (a chunked body has no
    Content-Length to check first, so it is counted as it arrives and never read whole).
    The body read is handed on to the app (Starlette passes ``_body`` downstream)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body
    return body
