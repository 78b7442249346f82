"""Start a server: pick the base, load it once, run uvicorn until stopped."""

from __future__ import annotations

from portfolio.errors import InvalidState


def pick_base(registry, router: str | None, base_name: str | None):
    """The base to serve: ``base_name``, else the base of the router's default (or first)
    rule's target, else the only registered base."""
    if base_name:
        return registry.bases.get(base_name)
    if router:
        rules, _ = registry.routes.rules(router)
        if rules:
            return registry.bases.get(registry.get_version(rules[-1].to).base_model)
    bases = registry.bases.list()
    if len(bases) != 1:
        raise InvalidState("several bases are registered: pass --base NAME" if bases else "no base registered: `portfolio base add` first")
    return bases[0]


def serve(registry, host: str, port: int, *, router: str | None = None, base_name: str | None = None, api_key: str | None = None,
          max_adapters: int = 8, batch_size: int = 8, batch_wait_s: float = 0.005, max_tokens: int = 512, max_concurrency: int = 64, device: str = "auto",
          allowed_hosts: tuple[str, ...] = (), log=print) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM finish the requests in flight, then flush the
    request log)."""
    import uvicorn

    from portfolio.server.app import ServerSettings, create_app
    from portfolio.server.engine import Engine

    base = pick_base(registry, router, base_name)
    if router:
        registry.routes.rules(router)  # fails now, not on the first request, if it does not exist
    engine = Engine(registry, base, max_adapters=max_adapters, batch_size=batch_size, max_wait_s=batch_wait_s,
                    device=device, log=log)
    settings = ServerSettings(router=router, api_key=api_key, max_tokens=max_tokens, max_concurrency=max_concurrency,
                              allowed_hosts=tuple(allowed_hosts))
    app = create_app(registry, engine, settings, log=log)
    log(f"serving base {base.name} on http://{host}:{port}" + (f" (router {router})" if router else "")
        + ("; API key required" if api_key else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
