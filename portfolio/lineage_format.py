"""Lineage as a terminal tree, Graphviz DOT or Mermaid.

Nodes: adapter versions, dataset snapshots (with sha256) and the base model. Edges point
from what was used to what was made, labelled with the relation or the data role.
"""

from __future__ import annotations

from collections import defaultdict

from portfolio.registry.entities import AdapterVersion, DataEdge, Lineage


def _rows(edge: DataEdge) -> str:
    if edge.row_ids is None:
        return f"all {edge.n_rows} rows"
    shown = ", ".join(str(i) for i in edge.row_ids[:8])
    more = f", … (+{len(edge.row_ids) - 8})" if len(edge.row_ids) > 8 else ""
    return f"{edge.n_rows} rows: {shown}{more}"


def _version_line(v: AdapterVersion) -> str:
    alias = f" ({', '.join(v.aliases)})" if v.aliases else ""
    digest = f" artifact {v.artifact_digest[:12]}" if v.artifact_digest else ""
    return f"{v.ref}{alias} [{v.status}] {v.kind} r={v.rank} alpha={v.alpha:g}{digest}"


def render_tree(lin: Lineage) -> str:
    """An indented tree: each version, then its data and its parents, recursively."""
    versions = {v.ref: v for v in lin.versions}
    data: dict[str, list[DataEdge]] = defaultdict(list)
    for d in lin.data:
        data[d.version].append(d)
    parents = defaultdict(list)
    for p in lin.parents:
        parents[p.child].append(p)
    lines = [_version_line(versions[lin.root])]
    seen = {lin.root}

    def walk(ref: str, prefix: str) -> None:
        items: list[tuple[str, object]] = [("data", d) for d in data[ref]] + [("parent", p) for p in parents[ref]]
        if not items and not parents[ref]:
            items = [("base", None)]
        for i, (kind, item) in enumerate(items):
            last = i == len(items) - 1
            branch, cont = ("└── ", "    ") if last else ("├── ", "│   ")
            if kind == "data":
                d = item  # type: ignore[assignment]
                lines.append(f"{prefix}{branch}{d.role:<6} {d.snapshot} [{d.domain}] sha256 {d.sha256} ({_rows(d)})")
            elif kind == "parent":
                p = item  # type: ignore[assignment]
                detail = [p.recipe["method"]] if p.recipe.get("method") else []
                if "weight" in p.recipe:
                    detail.append(f"w={p.recipe['weight']:g}")
                how = f"{p.relation}" + (f" ({', '.join(detail)})" if detail else "")
                if p.parent in seen:
                    lines.append(f"{prefix}{branch}{how} ← {p.parent} (shown above)")
                    continue
                seen.add(p.parent)
                lines.append(f"{prefix}{branch}{how} ← {_version_line(versions[p.parent])}")
                walk(p.parent, prefix + cont)
            else:
                b = lin.base_model
                lines.append(f"{prefix}{branch}base {b.name} ({b.architecture}) sha256 {b.weights_sha256}")

    walk(lin.root, "")
    return "\n".join(lines)


def _dot_id(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def _label(*lines: str) -> str:
    return _dot_id("\\n".join(lines))


def render_dot(lin: Lineage) -> str:
    """Graphviz DOT: ``dot -Tpng lineage.dot -o lineage.png``."""
    out = ["digraph lineage {", "  rankdir=BT;", '  node [fontname="Helvetica", fontsize=10];']
    b = lin.base_model
    out.append(f"  {_dot_id('base:' + b.name)} [shape=box3d, label={_label(b.name, b.architecture, 'sha256 ' + b.weights_sha256[:12])}];")
    has_parent = {p.child for p in lin.parents}
    for v in lin.versions:
        style = ', style="filled", fillcolor="#dbeafe"' if v.ref == lin.root else ""
        head = v.ref + (f" ({', '.join(v.aliases)})" if v.aliases else "")
        out.append(f"  {_dot_id(v.ref)} [shape=box{style}, label={_label(head, f'{v.status}, r={v.rank}')}];")
        if v.ref not in has_parent:
            out.append(f"  {_dot_id('base:' + b.name)} -> {_dot_id(v.ref)} [style=dotted, label=base];")
    for snap in {d.snapshot: d for d in lin.data}.values():
        out.append(f"  {_dot_id('data:' + snap.snapshot)} [shape=cylinder, label={_label(snap.snapshot, snap.domain, 'sha256 ' + snap.sha256[:12])}];")
    for p in lin.parents:
        out.append(f"  {_dot_id(p.parent)} -> {_dot_id(p.child)} [label={_dot_id(p.relation)}];")
    for d in lin.data:
        style = ", style=dashed" if d.role != "train" else ""
        out.append(f"  {_dot_id('data:' + d.snapshot)} -> {_dot_id(d.version)} [label={_dot_id(f'{d.role} ({d.n_rows})')}{style}];")
    out.append("}")
    return "\n".join(out) + "\n"


def render_mermaid(lin: Lineage) -> str:
    """A Mermaid flowchart (renders in GitHub Markdown inside a ```mermaid block)."""
    ids: dict[str, str] = {}

    def node(key: str) -> str:
        return ids.setdefault(key, f"n{len(ids)}")

    out = ["flowchart BT"]
    b = lin.base_model
    out.append(f'  {node("base:" + b.name)}[["{b.name}<br/>sha256 {b.weights_sha256[:12]}"]]')
    has_parent = {p.child for p in lin.parents}
    for v in lin.versions:
        alias = f"<br/>({', '.join(v.aliases)})" if v.aliases else ""
        out.append(f'  {node(v.ref)}["{v.ref}{alias}<br/>{v.status}, r={v.rank}"]')
        if v.ref not in has_parent:
            out.append(f"  {node('base:' + b.name)} -.-> {node(v.ref)}")
    for snap in {d.snapshot: d for d in lin.data}.values():
        out.append(f'  {node("data:" + snap.snapshot)}[("{snap.snapshot}<br/>{snap.domain}<br/>sha256 {snap.sha256[:12]}")]')
    for p in lin.parents:
        out.append(f"  {node(p.parent)} -->|{p.relation}| {node(p.child)}")
    for d in lin.data:
        arrow = "-->" if d.role == "train" else "-.->"
        out.append(f"  {node('data:' + d.snapshot)} {arrow}|{d.role} {d.n_rows}| {node(d.version)}")
    out.append(f"  style {node(lin.root)} fill:#dbeafe")
    return "\n".join(out) + "\n"


RENDERERS = {"tree": render_tree, "dot": render_dot, "mermaid": render_mermaid}
