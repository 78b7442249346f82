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
    taint = f" TAINTED by {', '.join(v.tainted_by)}" if v.tainted_by else ""
    return f"{v.ref}{alias} [{v.status}] {v.kind} r={v.rank} alpha={v.alpha:g}{digest}{taint}"


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
                state = " PURGED (bytes deleted)" if d.purged else " REVOKED" if d.revoked else ""
                lines.append(f"{prefix}{branch}{d.role:<6} {d.snapshot} [{d.domain}] sha256 {d.sha256} ({_rows(d)}){state}")
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


def _uses_nodes(uses) -> tuple[list, list]:
    """(version nodes, edges (source, target, label, dashed)) of a reverse lineage."""
    edges = []
    for u in uses.uses:
        for e in u.edges:
            label = f"{e['via']} ({e['rows']})" if e["rows"] is not None else e["via"]
            edges.append((e["source"] if e["source"] != uses.snapshot else "data:" + uses.snapshot, u.version, label, e["via"] == "replay"))
    return uses.uses, edges


def render_uses_dot(uses) -> str:
    """Reverse lineage of a snapshot as Graphviz DOT (data at the bottom, descendants above)."""
    versions, edges = _uses_nodes(uses)
    state = " REVOKED" if uses.revoked else ""
    out = ["digraph uses {", "  rankdir=BT;", '  node [fontname="Helvetica", fontsize=10];',
           f"  {_dot_id('data:' + uses.snapshot)} [shape=cylinder, label={_label(uses.snapshot + state, 'sha256 ' + uses.sha256[:12])}];"]
    for u in versions:
        fill = ', style="filled", fillcolor="#fee2e2"' if uses.revoked else ""
        head = u.version + (f" ({', '.join(u.aliases)})" if u.aliases else "")
        out.append(f"  {_dot_id(u.version)} [shape=box{fill}, label={_label(head, u.status)}];")
    for source, target, label, dashed in edges:
        out.append(f"  {_dot_id(source)} -> {_dot_id(target)} [label={_dot_id(label)}{', style=dashed' if dashed else ''}];")
    out.append("}")
    return "\n".join(out) + "\n"


def render_uses_mermaid(uses) -> str:
    """Reverse lineage of a snapshot as a Mermaid flowchart."""
    ids: dict[str, str] = {}

    def node(key: str) -> str:
        return ids.setdefault(key, f"n{len(ids)}")

    versions, edges = _uses_nodes(uses)
    state = "<br/>REVOKED" if uses.revoked else ""
    out = ["flowchart BT", f'  {node("data:" + uses.snapshot)}[("{uses.snapshot}<br/>sha256 {uses.sha256[:12]}{state}")]']
    for u in versions:
        alias = f"<br/>({', '.join(u.aliases)})" if u.aliases else ""
        out.append(f'  {node(u.version)}["{u.version}{alias}<br/>{u.status}"]')
    for source, target, label, dashed in edges:
        out.append(f"  {node(source)} {'-.->' if dashed else '-->'}|{label}| {node(target)}")
    if uses.revoked:
        out += [f"  style {node(u.version)} fill:#fee2e2" for u in versions]
    return "\n".join(out) + "\n"
