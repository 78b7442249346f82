"""One webhook POST, with the limits a delivery to a URL someone typed needs.

- **No redirects.** A 3xx answer is a failed delivery, recorded with its ``Location``: a
  receiver must not be able to send the signed body (or a body-less GET carrying the
  signature) to another scheme, host or port.
- **No link-local or cloud metadata addresses** (169.254.0.0/16, fe80::/10,
  ``fd00:ec2::254``) unless the webhook was added with ``allow_link_local``. The host is
  resolved here and the connection made to the address that was checked, so a DNS answer
  that changes between the check and the connect cannot slip past it.
- **A bound on the whole delivery**, not only on each read: a receiver that trickles its
  headers a byte at a time is cut off at ``deadline_s`` (a timer shuts the socket down).

`http.client` from the standard library does the HTTP; it never follows redirects itself.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass

BLOCKED_NETWORKS = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"),
                    ipaddress.ip_network("fd00:ec2::254/128"))
MAX_RESPONSE_BYTES = 65536  # what is read of a receiver's answer body, at most


class DeliveryRefused(Exception):
    """The URL may not be delivered to (scheme, or a blocked address)."""


@dataclass(frozen=True)
class Answer:
    """What one POST got: the status code (None when no answer came), an error text for
    anything but a 2xx, and a redirect's Location."""

    code: int | None
    error: str | None = None
    location: str | None = None


def blocked(address: str) -> bool:
    """Whether an IP address is link-local or a cloud metadata endpoint (IPv4-mapped too)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in BLOCKED_NETWORKS if net.version == ip.version)


def check_url(url: str, allow_link_local: bool = False) -> urllib.parse.SplitResult:
    """Parse a webhook URL, refusing other schemes and a literal blocked address."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeliveryRefused(f"{redact(url)[:80]!r} is not an http:// or https:// URL with a host")
    try:
        literal = blocked(parts.hostname)
    except ValueError:
        literal = False  # a name, resolved at delivery
    if literal and not allow_link_local:
        raise DeliveryRefused(f"{parts.hostname} is a link-local or metadata address; add the webhook with "
                              "--allow-link-local if that receiver is really meant")
    return parts


def redact(url: str) -> str:
    """The URL with any ``user:password@`` replaced by ``***@`` (for lists and logs)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _connect(parts: urllib.parse.SplitResult, timeout: float, allow_link_local: bool) -> socket.socket:
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    allowed = [info for info in infos if allow_link_local or not blocked(info[4][0])]
    if not allowed:
        raise DeliveryRefused(f"{parts.hostname} resolves to {infos[0][4][0]}, a link-local or metadata address; "
                              "add the webhook with --allow-link-local if that receiver is really meant")
    error: OSError | None = None
    for family, kind, proto, _, address in allowed:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        return sock
    raise error or OSError(f"cannot connect to {parts.hostname}")


def post(url: str, body: bytes, headers: dict[str, str], *, deadline_s: float, allow_link_local: bool = False) -> Answer:
    """POST ``body`` to ``url`` once, within ``deadline_s`` in all (connect, send, answer)."""
    try:
        parts = check_url(url, allow_link_local)
    except DeliveryRefused as exc:
        return Answer(None, f"refused: {exc}")
    sock: socket.socket | None = None
    timer: threading.Timer | None = None
    cut = threading.Event()

    def cut_off() -> None:
        cut.set()
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    timer = threading.Timer(deadline_s, cut_off)
    timer.daemon = True
    timer.start()
    try:
        sock = _connect(parts, deadline_s, allow_link_local)
        if cut.is_set():
            raise TimeoutError
        # the connection class only for its Host header (default port per scheme): the socket,
        # already connected to the checked address (TLS wrapped), is handed to it
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.hostname, parts.port, timeout=deadline_s)
        conn.sock = sock
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(MAX_RESPONSE_BYTES)
        code = response.status
        if 300 <= code < 400:
            location = (response.getheader("Location") or "")[:500]
            return Answer(code, f"HTTP {code} redirect to {location or '(no Location)'}, not followed", location)
        return Answer(code, None if 200 <= code < 300 else f"HTTP {code}")
    except DeliveryRefused as exc:
        return Answer(None, f"refused: {exc}")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if cut.is_set():
            return Answer(None, f"no complete answer within {deadline_s:g} s")
        return Answer(None, f"{type(exc).__name__}: {exc}")
    finally:
        timer.cancel()
        if sock is not None:
            sock.close()
