"""The versions × snapshots matrix, metric history, and their pictures; all from stored
results (nothing is evaluated here)."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from portfolio.errors import InvalidState
from portfolio.evaluation.continual import ContinualStats, average_accuracy, backward_transfer, forgetting, forward_transfer
from portfolio.policy.gates import LOWER_IS_BETTER
from portfolio.registry.registry import Registry
from portfolio.suites.scoring import SUITE_METRICS


@dataclass
class Matrix:
    """Stored scores: rows are models (bases first, then versions), columns snapshots."""

    metric: str
    rows: list[str]
    cols: list[str]
    values: dict[tuple[str, str], float]
    continual: list[ContinualStats] = field(default_factory=list)

    def get(self, row: str, col: str) -> float | None:
        return self.values.get((row, col))


def _lower(metric: str) -> bool:
    """Whether lower is better (loss, ECE, Brier, critical failures; not rates and words)."""
    if metric in LOWER_IS_BETTER:
        return LOWER_IS_BETTER[metric]
    from portfolio.suites.scoring import HIGHER_IS_BETTER

    return HIGHER_IS_BETTER.get(metric) is False


def _version_key(model: str) -> tuple:
    if model.startswith("base:"):
        return (0, model, 0)
    model, _, engine = model.partition(" on ")  # an engine's row sorts right after its reference row
    name, _, ver = model.rpartition("@")
    return (1, name, int(ver), engine)


def build_matrix(registry: Registry, adapters: list[str] | None = None, snapshots: list[str] | None = None, metric: str = "loss",
                 max_versions: int | None = None) -> Matrix:
    """The matrix of ``metric`` and, per adapter, forgetting and backward transfer over its
    versions (each version's task = the snapshot it trained on); with ``max_versions``, over
    each adapter's newest that many versions only."""
    if metric in SUITE_METRICS:
        return _suite_matrix(registry, adapters, snapshots, metric)
    if metric not in LOWER_IS_BETTER:
        raise InvalidState(f"--metric must be one of {', '.join(list(LOWER_IS_BETTER) + list(SUITE_METRICS))}")
    table = registry.evaluations.table(adapters, snapshots, metric)
    values = {(r["model"], r["snapshot"]): r["value"] for r in table}
    rows = sorted({r["model"] for r in table}, key=_version_key)
    if max_versions is not None:
        newest: dict[str, list[str]] = {}
        for m in rows:
            if not m.startswith("base:"):
                newest.setdefault(m.rpartition("@")[0], []).append(m)
        keep = {m for ms in newest.values() for m in ms[-max_versions:]}
        rows = [m for m in rows if m.startswith("base:") or m in keep]
        values = {k: x for k, x in values.items() if k[0] in rows}
    cols = sorted({s for _, s in values}, key=lambda s: (s.rpartition("@")[0], int(s.rpartition("@")[2])))
    continual = []
    for adapter in sorted({r["adapter"] for r in table if r["adapter"]}):
        versions = [m for m in rows if m.rpartition("@")[0] == adapter]
        if len(versions) < 2:
            continue
        lineage = registry.lineage(versions[-1], None if max_versions is None else 2 * max_versions)
        tasks = {}
        for edge in lineage.data:
            if edge.role == "train" and edge.version in versions:
                tasks.setdefault(edge.version, edge.snapshot)
        R = {v: {c: values[(v, c)] for c in cols if (v, c) in values} for v in versions}
        base = f"base:{registry.get_version(versions[-1]).base_model}"
        baseline = {c: values[(base, c)] for c in cols if (base, c) in values}
        continual.append(ContinualStats(adapter, versions[-1], forgetting(R, versions, tasks, metric), backward_transfer(R, versions, tasks, metric),
                                        average_accuracy(R, versions, tasks), forward_transfer(R, versions, tasks, baseline, metric)))
    return Matrix(metric, rows, cols, values, continual)


def _suite_matrix(registry: Registry, adapters: list[str] | None, suites: list[str] | None, metric: str) -> Matrix:
    """Models × suites of a behavioural metric (overall), from stored suite results."""
    results = [r for s in (suites or [None]) for r in registry.suites.results(suite=s)]
    # a result on a serving engine is its own row, next to the reference model's
    values = {(f"{r.model} on {r.engine}" if r.engine else r.model, r.suite): r.metrics["overall"][metric] for r in results
              if r.metrics["overall"].get(metric) is not None and (not adapters or r.model.startswith("base:") or r.model.rpartition("@")[0] in adapters)}
    rows = sorted({m for m, _ in values}, key=_version_key)
    cols = sorted({s for _, s in values}, key=lambda s: (s.rpartition("@")[0], int(s.rpartition("@")[2])))
    return Matrix(metric, rows, cols, values, _suite_continual(registry, rows, cols, values, metric))


def _suite_continual(registry: Registry, rows: list[str], cols: list[str], values: dict, metric: str) -> list[ContinualStats]:
    """ACC, BWT, FWT and forgetting per adapter on a suite metric, where each version trained on
    a snapshot of the dataset a suite is named after (a task's data ``sst2@1`` and its suite
    ``sst2@…``: the continual-learning benchmark's layout)."""
    from portfolio.suites.scoring import HIGHER_IS_BETTER

    if HIGHER_IS_BETTER.get(metric) is None:
        return []
    by_name = {c.rpartition("@")[0]: c for c in cols}
    goodness = "accuracy" if HIGHER_IS_BETTER[metric] else "loss"  # the direction `evaluation.continual` reads
    out = []
    for adapter in sorted({m.rpartition("@")[0] for m in rows if not m.startswith("base:") and " on " not in m}):
        versions = [m for m in rows if m.rpartition("@")[0] == adapter and " on " not in m]
        if len(versions) < 2:
            continue
        tasks = {}
        for edge in registry.lineage(versions[-1]).data:
            name = edge.snapshot.rpartition("@")[0]
            if edge.role == "train" and edge.version in versions and name in by_name:
                tasks.setdefault(edge.version, by_name[name])
        if len(tasks) < 2:
            continue
        R = {v: {c: values[(v, c)] for c in cols if (v, c) in values} for v in versions}
        base = f"base:{registry.get_version(versions[-1]).base_model}"
        baseline = {c: values[(base, c)] for c in cols if (base, c) in values}
        out.append(ContinualStats(adapter, versions[-1], forgetting(R, versions, tasks, goodness),
                                  backward_transfer(R, versions, tasks, goodness), average_accuracy(R, versions, tasks),
                                  forward_transfer(R, versions, tasks, baseline, goodness)))
    return out


def build_history(registry: Registry, adapter: str, metric: str = "loss", snapshot: str | None = None) -> list[dict[str, Any]]:
    """``metric`` of every version of ``adapter`` on every snapshot (or one), oldest first."""
    if metric in SUITE_METRICS:
        out = [{"model": r.model, "adapter": adapter, "version": int(r.model.rpartition("@")[2]), "snapshot": r.suite,
                "value": r.metrics["overall"][metric], "created_at": r.created_at}
               for r in registry.suites.results(suite=snapshot, engine="")
               if r.model.rpartition("@")[0] == adapter and r.metrics["overall"].get(metric) is not None]
        return sorted(out, key=lambda r: (r["version"], r["snapshot"]))
    table = registry.evaluations.table([adapter], [snapshot] if snapshot else None, metric)
    out = [r for r in table if r["adapter"] == adapter]
    return sorted(out, key=lambda r: (r["version"], r["snapshot"]))


def _figure_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _write(path: Path, fig: Any, title: str, body_html: str) -> Path:
    import matplotlib.pyplot as plt

    png = _figure_bytes(fig)
    plt.close(fig)
    path = Path(path)
    if path.suffix.lower() == ".html":
        img = base64.b64encode(png).decode()
        path.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><img src='data:image/png;base64,{img}' alt='{html.escape(title)}'>{body_html}"
            f"<p><small>generated by portfolio, {datetime.now().isoformat(timespec='seconds')}</small></p></body></html>"
        )
    elif path.suffix.lower() == ".png":
        path.write_bytes(png)
    else:
        raise InvalidState(f"{path}: write a .png or .html file")
    return path


def plot_matrix(matrix: Matrix, path: str | Path) -> Path:
    """A heatmap (models × snapshots, value in every cell) as PNG, or HTML with the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import patheffects

    if not matrix.rows:
        raise InvalidState("no stored evaluations to plot; run `portfolio eval` first")
    grid = np.array([[matrix.get(r, c) if matrix.get(r, c) is not None else np.nan for c in matrix.cols] for r in matrix.rows])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(matrix.cols), 1.0 + 0.45 * len(matrix.rows)))
    cmap = "viridis_r" if _lower(matrix.metric) else "viridis"
    im = ax.imshow(grid, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(matrix.cols)), matrix.cols, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix.rows)), matrix.rows)
    ax.set_xlabel("dataset snapshot (held-out rows)")
    ax.set_ylabel("model")
    for i in range(len(matrix.rows)):
        for j in range(len(matrix.cols)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8, color="white",
                        path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])
    fig.colorbar(im, ax=ax, label=f"{matrix.metric} ({'lower' if _lower(matrix.metric) else 'higher'} is better)")
    ax.set_title(f"{matrix.metric} of every model on every snapshot")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in matrix.cols)
    body = "".join(
        f"<tr><th>{html.escape(r)}</th>" + "".join(f"<td>{'' if matrix.get(r, c) is None else f'{matrix.get(r, c):.4f}'}</td>" for c in matrix.cols) + "</tr>"
        for r in matrix.rows
    )
    cl = "".join(
        f"<tr><th>{html.escape(s.adapter)}</th><td>{html.escape(s.latest)}</td><td>{'' if s.bwt is None else f'{s.bwt:+.4f}'}</td>"
        f"<td>{html.escape(', '.join(f'{k}: {v:+.4f}' for k, v in s.forgetting.items()))}</td></tr>"
        for s in matrix.continual
    )
    extra = f"<h2>Values</h2><table><tr><th></th>{head}</tr>{body}</table>"
    if cl:
        extra += f"<h2>Continual learning</h2><table><tr><th>adapter</th><th>latest</th><th>BWT</th><th>forgetting</th></tr>{cl}</table>"
    return _write(Path(path), fig, f"portfolio matrix: {matrix.metric}", extra)


def plot_history(history: list[dict[str, Any]], adapter: str, metric: str, path: str | Path) -> Path:
    """One line per snapshot: the metric across the adapter's versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise InvalidState(f"no stored {metric} for {adapter}; run `portfolio eval` first")
    fig, ax = plt.subplots(figsize=(7, 4))
    for snap in sorted({h["snapshot"] for h in history}):
        points = [(h["version"], h["value"]) for h in history if h["snapshot"] == snap]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=snap)
    ax.set_xlabel(f"{adapter} version")
    ax.set_ylabel(f"{metric} on {'suite cases' if metric in SUITE_METRICS else 'held-out rows'}")
    ax.set_xticks(sorted({h["version"] for h in history}))
    ax.grid(alpha=0.3)
    ax.legend(title="snapshot")
    ax.set_title(f"{metric} of {adapter} across versions")
    rows = "".join(f"<tr><td>{h['version']}</td><td>{html.escape(h['snapshot'])}</td><td>{h['value']:.4f}</td><td>{h['created_at']:%Y-%m-%d %H:%M}</td></tr>" for h in history)
    return _write(Path(path), fig, f"{adapter}: {metric} history",
                  f"<table><tr><th>version</th><th>snapshot</th><th>{metric}</th><th>evaluated</th></tr>{rows}</table>")


VARIANT_COLOURS = {"lora": "#1f77b4", "dora": "#d62728", "rslora": "#2ca02c"}


def plot_tune_front(tune: dict[str, Any], path: str | Path) -> Path:
    """A `tune` run's candidates as gain on the new data (y) against the change on the
    retention set (x; left of 0 is forgetting), with their paired-bootstrap intervals; the
    pick ringed, the candidates the gates refused hollow. PNG, or HTML with the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = tune["candidates"]
    if not candidates:
        raise InvalidState(f"tune run {tune['run']} has no candidates to draw")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in candidates:
        x = 100 * (c["retention"] or 0.0)
        y = 100 * c["gain"]
        xerr = [[x - 100 * c["retention_ci"][0]], [100 * c["retention_ci"][1] - x]] if c.get("retention_ci") else None
        yerr = [[y - 100 * c["gain_ci"][0]], [100 * c["gain_ci"][1] - y]] if c.get("gain_ci") else None
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", ms=7 + c["rank"] ** 0.5, capsize=3, alpha=0.85,
                    mfc="none" if not c["gates_passed"] else None, color=VARIANT_COLOURS.get(c["variant"], "grey"))
        ax.annotate(f"{c['setting']}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if c["picked"]:
            ax.scatter([x], [y], s=400, facecolors="none", edgecolors="black", linewidths=1.5, zorder=3)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    from matplotlib.lines import Line2D

    shown = dict.fromkeys(c["variant"] for c in candidates)
    handles = [Line2D([], [], marker="o", ls="", color=VARIANT_COLOURS.get(v, "grey"), label=v) for v in shown]
    handles += [Line2D([], [], marker="o", ls="", mfc="none", color="grey", label="refused by the gates"),
                Line2D([], [], marker="o", ls="", ms=14, mfc="none", color="black", label="pick")]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel("change on the retention set vs " + tune["incumbent"] + " (%; < 0 forgets)")
    ax.set_ylabel(f"gain on {tune['data']} vs {tune['incumbent']} (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"tune {tune['adapter']}: gain vs forgetting (pick: {tune['pick'] or 'none'})")
    rows = "".join(
        f"<tr><td>{html.escape(c['setting'])}</td><td>{html.escape(c['ref'])}</td><td>{c['n_params']:,}</td>"
        f"<td>{100 * c['gain']:+.2f}%</td><td>{_percent_or_blank(c['retention'])}</td>"
        f"<td>{'pass' if c['gates_passed'] else 'refused'}</td><td>{'yes' if c['within_noise'] else 'no'}</td>"
        f"<td>{'PICK' if c['picked'] else ''}</td></tr>" for c in candidates)
    table = ("<table><tr><th>setting</th><th>version</th><th>parameters</th><th>gain</th><th>retention</th><th>gates</th>"
             f"<th>within noise of best</th><th></th></tr>{rows}</table><p>{html.escape(tune['reason'])}</p>")
    return _write(Path(path), fig, f"tune {tune['adapter']} on {tune['data']}", table)


def _percent_or_blank(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.2f}%"
