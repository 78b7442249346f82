"""Running the dashboard under uvicorn, with portfolio's own one-line log instead of uvicorn's."""

from __future__ import annotations

import logging
from collections.abc import Callable

from portfolio.registry.registry import Registry


def run_dashboard(registry: Registry, host: str, port: int, api_key: str | None, log: Callable[[str], None] = print,
                  allowed_hosts: tuple[str, ...] = ()) -> None:
    """Serve the dashboard until interrupted."""
    import uvicorn

    from portfolio.ui.app import create_app

    app = create_app(registry, api_key, tuple(allowed_hosts))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, log_config=None)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server = uvicorn.Server(config)
    log(f"portfolio dashboard on http://{host}:{port}/ ({'writes enabled with the API key' if api_key else 'read-only'}); Ctrl-C stops it")
    server.run()
