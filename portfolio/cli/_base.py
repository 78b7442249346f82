"""The root `portfolio` group, its one error handler and the helpers every command module
shares (open the registry once per invocation, print JSON or a table)."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from portfolio.errors import PortfolioError


class PortfolioGroup(click.Group):
    """A click group that reports `PortfolioError` as one line on stderr, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PortfolioError as exc:
            click.echo(f"error: {one_line(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:
            # click's own report takes four lines; ours is one, with where to look
            where = f"; see `{exc.ctx.command_path} --help`" if exc.ctx is not None else ""
            click.echo(f"error: {one_line(exc.format_message())}{where}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            # the reader went away (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            ctx.exit(141)
        except Exception as exc:  # a bug: still one line, the traceback only on request
            if os.environ.get("PORTFOLIO_DEBUG"):
                raise
            click.echo(f"error: internal error {type(exc).__name__}: {one_line(str(exc))} "
                       "(a bug in portfolio; rerun with PORTFOLIO_DEBUG=1 for the traceback and report it)", err=True)
            ctx.exit(3)


def one_line(text: str) -> str:
    """A message folded onto one line (paths and JSON excerpts may hold line breaks)."""
    return " ".join(text.split()) if text else text


def _registry(ctx: click.Context, check: bool = True):
    from portfolio.registry.registry import Registry

    obj = ctx.find_root().obj
    if "registry" not in obj:
        obj["registry"] = Registry.open(obj["db"], obj["store"], check=check)
        ctx.call_on_close(obj["registry"].close)
    return obj["registry"]


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _when(dt) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S") if dt else ""


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@click.group(cls=PortfolioGroup)
@click.option("--db", envvar="PORTFOLIO_DB", default=None, metavar="URL",
              help="Registry database URL [env PORTFOLIO_DB; default sqlite:///.portfolio/registry.db].")
@click.option("--store", envvar="PORTFOLIO_STORE", default=None, metavar="PATH",
              help="Artifact store folder [env PORTFOLIO_STORE; default .portfolio/store].")
@click.version_option(package_name="portfolio")
@click.pass_context
def cli(ctx: click.Context, db: str | None, store: str | None) -> None:
    """Manage a portfolio of LoRA adapters: versions, lineage, data provenance."""
    quiet_libraries()
    ctx.obj = {"db": db, "store": store}


def quiet_libraries() -> None:
    """What a person reads is portfolio's own output: no progress bars, deprecation notes or
    info logs from transformers, PEFT, bitsandbytes or the hub (portfolio shows its own progress)."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for module in ("transformers", "peft", "torch", "huggingface_hub", "accelerate", "bitsandbytes"):
        warnings.filterwarnings("ignore", module=module)
        logging.getLogger(module).setLevel(logging.ERROR)
    # transformers reads both variables when it is first imported, which is later: no import here,
    # so commands that never load a model stay fast
