"""Pictures for the dashboard as inline SVG strings: the lineage graph, the matrix heat map and
metric history. Pure functions of registry entities; no JavaScript, no external assets, so a
page renders the same offline and in a screenshot.

The lineage layout is a small layered (Sugiyama-style) drawing: each version sits one layer
below the child furthest above it (longest path from the root), each snapshot one layer below
the lowest version that used it, the base model at the bottom; within a layer nodes keep the
order a depth-first walk meets them, then one barycentre pass pulls each towards its
neighbours above. Good enough for the DAGs merges and stacks make; a page caps the depth it
asks for (`Registry.lineage(max_depth=)`), so the drawing stays readable.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from html import escape
from typing import Any

from portfolio.registry.entities import Lineage

NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 180, 50, 24, 70, 16
STATUS_FILL = {"candidate": "#fef9c3", "active": "#dcfce7", "deprecated": "#e5e7eb", "archived": "#f3f4f6"}


def _text(x: float, y: float, text: str, size: int = 11, weight: str = "normal", anchor: str = "middle", fill: str = "#111827",
          cls: str = "") -> str:
    extra = f' class="{cls}"' if cls else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" font-weight="{weight}" text-anchor="{anchor}" '
            f'fill="{fill}"{extra}>{escape(text)}</text>')


def _clip(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def generations(lin: Lineage) -> dict[str, int]:
    """Each version's generation above the root: the longest chain of parent edges from the
    root to it (merges make a DAG, so that is the layer a drawing puts it in), in the order a
    depth-first walk meets them."""
    refs = {v.ref for v in lin.versions}
    parents: dict[str, list[str]] = defaultdict(list)
    for p in lin.parents:
        if p.parent in refs and p.child in refs:
            parents[p.child].append(p.parent)
    layer = {lin.root: 0}
    pending = [lin.root]
    while pending:
        ref = pending.pop()
        for parent in parents[ref]:
            if layer.get(parent, -1) < layer[ref] + 1:
                layer[parent] = layer[ref] + 1
                pending.append(parent)
    return layer


def lineage_svg(lin: Lineage, version_href: Callable[[str], str], snapshot_href: Callable[[str], str]) -> str:
    """The lineage as an SVG graph; every version and snapshot node is a link."""
    nodes, links, bottom = _lineage_graph(lin)
    xy, width, height = _layout(nodes, links, bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="lineage of {escape(lin.root)}">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
           '<path d="M0,0 L10,5 L0,10 z" fill="#6b7280"/></marker></defs>']
    out += [_edge(xy[src], xy[dst], label, style) for src, dst, label, style in links]
    out += [_node(n, xy[key], lin.root, version_href, snapshot_href) for key, n in nodes.items()]
    out.append("</svg>")
    return "".join(out)


def _lineage_graph(lin: Lineage) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str, str, str]], int]:
    """(nodes keyed ``v:``/``d:``/``b:`` with their layer, links (from what was used, to what
    was made, label, style), the bottom layer, where the base sits)."""
    versions = {v.ref: v for v in lin.versions}
    layer = generations(lin)
    for ref in versions:  # anything the edges did not reach (should not happen) goes on top
        layer.setdefault(ref, 0)
    data_users: dict[str, list[Any]] = defaultdict(list)
    for d in lin.data:
        if d.version in versions:
            data_users[d.snapshot].append(d)
    nodes: dict[str, dict[str, Any]] = {}
    for ref in layer:  # the order the walk met them
        nodes["v:" + ref] = {"layer": layer[ref], "kind": "version", "obj": versions[ref]}
    for snap, edges in data_users.items():
        nodes["d:" + snap] = {"layer": max(layer[e.version] for e in edges) + 1, "kind": "data", "obj": edges[0]}
    bottom = max((n["layer"] for n in nodes.values()), default=0) + 1
    nodes["b:" + lin.base_model.name] = {"layer": bottom, "kind": "base", "obj": lin.base_model}
    links = [("v:" + p.parent, "v:" + p.child, p.relation, "parent") for p in lin.parents
             if "v:" + p.parent in nodes and "v:" + p.child in nodes]
    links += [("d:" + snap, "v:" + e.version, f"{e.role} · {e.n_rows} rows", e.role) for snap, edges in data_users.items() for e in edges]
    has_parent = {p.child for p in lin.parents if p.parent in versions}
    links += [("b:" + lin.base_model.name, "v:" + ref, "base", "base") for ref in versions if ref not in has_parent]
    return nodes, links, bottom


def _layout(nodes: dict[str, dict[str, Any]], links: list[tuple[str, str, str, str]], bottom: int
            ) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Each node's top-left corner, layer by layer, each layer ordered by the mean position of
    what it links to above (fewer crossings); and the drawing's width and height."""
    layers: dict[int, list[str]] = defaultdict(list)
    for key, n in nodes.items():
        layers[n["layer"]].append(key)
    pos: dict[str, float] = {}
    for depth in sorted(layers):
        keys = layers[depth]
        if depth > 0:
            above = defaultdict(list)
            for src, dst, _, _ in links:
                if src in keys and dst in pos:
                    above[src].append(pos[dst])
            keys.sort(key=lambda k: sum(above[k]) / len(above[k]) if above[k] else math.inf)
        for i, key in enumerate(keys):
            pos[key] = i
    width_n = max(len(k) for k in layers.values())
    width = PAD * 2 + width_n * NODE_W + (width_n - 1) * GAP_X
    height = PAD * 2 + (bottom + 1) * NODE_H + bottom * GAP_Y
    xy: dict[str, tuple[float, float]] = {}
    for depth, keys in layers.items():
        x0 = (width - (len(keys) * NODE_W + (len(keys) - 1) * GAP_X)) / 2
        for i, key in enumerate(keys):
            xy[key] = (x0 + i * (NODE_W + GAP_X), PAD + depth * (NODE_H + GAP_Y))
    return xy, width, height


def _edge(src: tuple[float, float], dst: tuple[float, float], label: str, style: str) -> str:
    """One labelled curve from what was used (below) up to what was made from it."""
    (sx, sy), (dx, dy) = src, dst
    x1, y1, x2, y2 = sx + NODE_W / 2, sy, dx + NODE_W / 2, dy + NODE_H
    mid = (y1 + y2) / 2
    dash = ' stroke-dasharray="5,4"' if style in ("replay", "base", "eval") else ""
    color = {"train": "#2563eb", "replay": "#7c3aed", "parent": "#374151"}.get(style, "#9ca3af")
    return (f'<path class="edge edge-{escape(style)}" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}" '
            f'fill="none" stroke="{color}" stroke-width="1.4"{dash} marker-end="url(#arrow)"/>'
            + _text((x1 + x2) / 2 + 4, mid - 3, label, 10, anchor="start", fill="#4b5563", cls="edge-label"))


def _node(n: dict[str, Any], at: tuple[float, float], root: str, version_href: Callable[[str], str],
          snapshot_href: Callable[[str], str]) -> str:
    """One box: a version (a link, coloured by status, red when tainted), a snapshot (a link,
    red when revoked) or the base."""
    (x, y), obj = at, n["obj"]
    if n["kind"] == "version":
        fill = "#fee2e2" if obj.tainted else STATUS_FILL.get(obj.status, "#ffffff")
        stroke = "#1d4ed8" if obj.ref == root else "#6b7280"
        alias = f" ({', '.join(obj.aliases)})" if obj.aliases else ""
        flags = " · TAINTED" if obj.tainted else " · drifted" if obj.drifted else ""
        return (f'<a href="{escape(version_href(obj.ref))}" class="node node-version" data-ref="{escape(obj.ref)}">'
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{fill}" stroke="{stroke}" '
                f'stroke-width="{2.2 if obj.ref == root else 1}"/>'
                + _text(x + NODE_W / 2, y + 20, _clip(obj.ref + alias), 12, "bold")
                + _text(x + NODE_W / 2, y + 37, _clip(f"{obj.status} · {obj.kind} r={obj.rank}{flags}", 32), 10, fill="#374151")
                + "</a>")
    if n["kind"] == "data":
        state = " · PURGED" if obj.purged else " · REVOKED" if obj.revoked else ""
        fill = "#fecaca" if obj.revoked else "#e0f2fe"
        return (f'<a href="{escape(snapshot_href(obj.snapshot))}" class="node node-data" data-ref="{escape(obj.snapshot)}">'
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="14" fill="{fill}" stroke="#0369a1"/>'
                + _text(x + NODE_W / 2, y + 20, _clip(f"{obj.snapshot} [{obj.domain}]"), 12, "bold")
                + _text(x + NODE_W / 2, y + 37, f"sha256 {obj.sha256[:16]}{state}", 10, fill="#374151", cls="sha")
                + "</a>")
    return (f'<g class="node node-base"><rect x="{x:.1f}" y="{y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="2" '
            f'fill="#f5f5f4" stroke="#57534e"/>'
            + _text(x + NODE_W / 2, y + 20, _clip(f"base {obj.name}"), 12, "bold")
            + _text(x + NODE_W / 2, y + 37, f"sha256 {obj.weights_sha256[:16]}", 10, fill="#374151") + "</g>")


def _color(goodness: float) -> str:
    """0 (worst in its column) .. 1 (best): red to green through pale yellow."""
    g = min(1.0, max(0.0, goodness))
    if g < 0.5:
        t = g / 0.5
        r, gr, b = 248, int(113 + (240 - 113) * t), int(113 + (170 - 113) * t)
    else:
        t = (g - 0.5) / 0.5
        r, gr, b = int(248 - (248 - 134) * t), int(240 - (240 - 219) * t), int(170 - (170 - 151) * t)
    return f"rgb({r},{gr},{b})"


def heatmap_svg(rows: list[str], cols: list[str], values: dict[tuple[str, str], float], lower_is_better: bool,
                row_href: Callable[[str], str | None], col_href: Callable[[str], str | None], title: str) -> str:
    """A models × snapshots heat map, each column coloured from its worst to its best value."""
    cell_w, cell_h, left, top = 92, 26, 150, 70
    width, height = left + cell_w * max(1, len(cols)) + PAD, top + cell_h * max(1, len(rows)) + PAD
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="heatmap" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{escape(title)}">']
    for j, col in enumerate(cols):
        x = left + j * cell_w + cell_w / 2
        label = _text(x, top - 10, _clip(col, 14), 11, "bold")
        href = col_href(col)
        out.append(f'<a href="{escape(href)}">{label}</a>' if href else label)
        column = [values[(r, col)] for r in rows if (r, col) in values]
        lo, hi = (min(column), max(column)) if column else (0.0, 0.0)
        for i, row in enumerate(rows):
            y = top + i * cell_h
            value = values.get((row, col))
            if value is None:
                out.append(f'<rect x="{left + j * cell_w}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="#f9fafb" stroke="#e5e7eb"/>')
                continue
            span = hi - lo
            good = 0.5 if span == 0 else ((hi - value) / span if lower_is_better else (value - lo) / span)
            out.append(f'<rect class="cell" x="{left + j * cell_w}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="{_color(good)}">'
                       f'<title>{escape(row)} on {escape(col)}: {value:.4f}</title></rect>')
            out.append(_text(left + j * cell_w + cell_w / 2 - 1, y + 17, f"{value:.4f}", 11))
    for i, row in enumerate(rows):
        label = _text(left - 8, top + i * cell_h + 17, _clip(row, 22), 11, anchor="end")
        href = row_href(row)
        out.append(f'<a href="{escape(href)}">{label}</a>' if href else label)
    out.append("</svg>")
    return "".join(out)


PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d"]


def _scale(lo: float, hi: float, start: float, length: float, flip: bool = False):
    """The linear map of [lo, hi] onto the pixels from ``start`` over ``length``; ``flip``
    (a y axis) puts ``hi`` at ``start``, since SVG's y grows down the page."""
    def to_px(value: float) -> float:
        fraction = (value - lo) / (hi - lo)
        return start + (1 - fraction if flip else fraction) * length
    return to_px


def _legend_entry(x: float, y: float, color: str, label: str) -> list[str]:
    """A colour swatch and its label, one legend line at baseline ``y``."""
    return [f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{color}"/>', _text(x + 16, y, label, 11, anchor="start")]


def history_svg(history: list[dict[str, Any]], metric: str) -> str:
    """``metric`` per version number, one line per snapshot, with a legend."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for h in history:
        series[h["snapshot"]].append((int(h["version"]), float(h["value"])))
    width, height, left, right, top, bottom = 720, 300, 64, 180, 20, 40
    if not series:
        return ""
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if x_hi == x_lo:
        x_hi += 1
    if y_hi == y_lo:
        y_hi, y_lo = y_hi + 0.5, y_lo - 0.5
    pw, ph = width - left - right, height - top - bottom
    px, py = _scale(x_lo, x_hi, left, pw), _scale(y_lo, y_hi, top, ph, flip=True)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="history" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{escape(metric)} history">',
           f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#9ca3af"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#9ca3af"/>']
    for k in range(5):
        y = y_lo + (y_hi - y_lo) * k / 4
        out.append(_text(left - 6, py(y) + 4, f"{y:.3f}", 10, anchor="end", fill="#6b7280"))
        out.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + pw}" y2="{py(y):.1f}" stroke="#f3f4f6"/>')
    step = max(1, (x_hi - x_lo) // 10)
    for x in range(x_lo, x_hi + 1, step):
        out.append(_text(px(x), top + ph + 16, f"v{x}", 10, fill="#6b7280"))
    out.append(_text(left + pw / 2, height - 6, "version", 11, fill="#374151"))
    for i, (snap, pts) in enumerate(sorted(series.items())):
        color = PALETTE[i % len(PALETTE)]
        pts.sort()
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"><title>v{x} on {escape(snap)}: {y:.4f}</title></circle>')
        out += _legend_entry(left + pw + 14, top + 14 + i * 16, color, _clip(snap, 22))
    out.append("</svg>")
    return "".join(out)


def front_svg(candidates: list[dict[str, Any]], incumbent: str, data: str) -> str:
    """A tune run's candidates: gain on the new data (y) against the change on the retention
    set (x, left of 0 forgets), in percent; hollow where the gates refused, ringed: the pick."""
    if not candidates:
        return ""
    width, height, left, right, top, bottom = 720, 320, 64, 150, 20, 44
    xs = [100 * (c["retention"] or 0.0) for c in candidates] + [0.0]
    ys = [100 * c["gain"] for c in candidates] + [0.0]
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
    x_pad, y_pad = max(1.0, (x_hi - x_lo) * 0.1), max(1.0, (y_hi - y_lo) * 0.1)
    x_lo, x_hi, y_lo, y_hi = x_lo - x_pad, x_hi + x_pad, y_lo - y_pad, y_hi + y_pad
    pw, ph = width - left - right, height - top - bottom
    px, py = _scale(x_lo, x_hi, left, pw), _scale(y_lo, y_hi, top, ph, flip=True)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="front" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'role="img" aria-label="gain against forgetting">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#9ca3af"/>',
           f'<line x1="{px(0):.1f}" y1="{top}" x2="{px(0):.1f}" y2="{top + ph}" stroke="#9ca3af" stroke-dasharray="4 3"/>',
           f'<line x1="{left}" y1="{py(0):.1f}" x2="{left + pw}" y2="{py(0):.1f}" stroke="#9ca3af" stroke-dasharray="4 3"/>',
           _text(left + pw / 2, height - 8, f"change on the retention set vs {incumbent} (%; < 0 forgets)", 11, fill="#374151"),
           f'<g transform="translate(14 {top + ph / 2}) rotate(-90)">{_text(0, 0, f"gain on {data} (%)", 11, fill="#374151")}</g>']
    for k in range(5):
        x, y = x_lo + (x_hi - x_lo) * k / 4, y_lo + (y_hi - y_lo) * k / 4
        out.append(_text(px(x), top + ph + 16, f"{x:+.1f}", 10, fill="#6b7280"))
        out.append(_text(left - 6, py(y) + 4, f"{y:+.1f}", 10, anchor="end", fill="#6b7280"))
    variants = list(dict.fromkeys(c["variant"] for c in candidates))
    for c in candidates:
        x, y = px(100 * (c["retention"] or 0.0)), py(100 * c["gain"])
        color = PALETTE[variants.index(c["variant"]) % len(PALETTE)]
        fill = color if c["gates_passed"] else "white"
        r = 4 + math.sqrt(c["rank"])
        tip = (f"{c['setting']} ({c['ref']}): gain {100 * c['gain']:+.2f}%, retention "
               f"{'-' if c['retention'] is None else format(100 * c['retention'], '+.2f') + '%'}, "
               f"{'passes' if c['gates_passed'] else 'refused by'} the gates")
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{fill}" stroke="{color}" stroke-width="2">'
                   f'<title>{escape(tip)}</title></circle>')
        if c["picked"]:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r + 6:.1f}" fill="none" stroke="#111827" stroke-width="1.5" class="pick"/>')
        out.append(_text(x + r + 4, y - 4, c["setting"], 10, anchor="start"))
    for i, v in enumerate(variants):
        out += _legend_entry(left + pw + 14, top + 14 + i * 16, PALETTE[i % len(PALETTE)], v)
    out.append(_text(left + pw + 14, top + 20 + len(variants) * 16, "hollow: refused", 10, anchor="start", fill="#6b7280"))
    out.append(_text(left + pw + 14, top + 36 + len(variants) * 16, "ringed: the pick", 10, anchor="start", fill="#6b7280"))
    out.append("</svg>")
    return "".join(out)
