"""Real text for demos: Python's language reference, as shipped in every Python install
(``pydoc_data.topics``), cut into documents of a few paragraphs."""

from __future__ import annotations

import json
from pathlib import Path


def python_reference_rows(first: int, last: int, max_chars: int = 1200) -> list[dict[str, str]]:
    """Rows ``{"text": ...}`` from topics[first:last] of the language reference, each a run
    of whole paragraphs of at most ``max_chars`` characters."""
    from pydoc_data.topics import topics

    rows = []
    for name in sorted(topics)[first:last]:
        chunk = ""
        for para in topics[name].split("\n\n"):
            para = para.strip()
            if not para:
                continue
            if chunk and len(chunk) + len(para) > max_chars:
                rows.append({"text": chunk})
                chunk = ""
            chunk = f"{chunk}\n\n{para}" if chunk else para
        if chunk:
            rows.append({"text": chunk})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON Lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def stdlib_source_rows(modules: tuple[str, ...] = ("json/decoder.py", "textwrap.py", "fractions.py"), max_chars: int = 1200) -> list[dict[str, str]]:
    """Rows of Python standard-library source code: a domain shift from prose to code."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for name in modules:
        text = (root / name).read_text(encoding="utf-8")
        for start in range(0, len(text), max_chars):
            chunk = text[start : start + max_chars].strip()
            if chunk:
                rows.append({"text": chunk})
    return rows
