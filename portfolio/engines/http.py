"""JSON over HTTP to a serving engine's OpenAI-compatible server, with the standard library:
one call, its status and decoded body; an engine that does not answer is one clear error."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from portfolio.errors import InvalidState


class JsonClient:
    """Calls to one server (``url``), named ``what`` in errors (``vLLM``, ``the server``)."""

    def __init__(self, url: str, what: str = "the server", timeout_s: float = 120.0):
        self.url, self.what, self.timeout_s = url.rstrip("/"), what, timeout_s

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode()
                return response.status, (json.loads(text) if text.strip().startswith(("{", "[")) else text)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise InvalidState(f"{self.what} at {self.url} does not answer ({exc}); start it, or check the URL") from None
