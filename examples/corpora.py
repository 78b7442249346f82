"""Domain corpora from real text found on this machine, each cut into dated "drops" that play
fresh data arriving over time. Used by `bench/continual.py`; runnable on its own:

    python examples/corpora.py OUT_DIR [--drops 3] [--drop-kb 120]

Domains (each row records the file it came from; `sources.json` lists every file with its
sha256 and licence):

- ``python-reference``: Python's language reference, as shipped in every Python install
  (``pydoc_data/topics.py``; PSF-2.0).
- ``python-code``: Python standard-library source code (PSF-2.0).
- ``licenses``: software licence texts from ``/usr/share/common-licenses`` (Debian).
- ``manpages``: section-1 manual pages from ``/usr/share/man/man1``, rendered to plain text
  with groff (each page under its own package's licence).
- ``general`` (held out, never trained on): README files from ``/usr/share/doc``, the stand-in
  for "everything else the model knew".

Rows are documents cut at paragraph boundaries into chunks of at most ``max_chars``. Drops
are filled in a fixed order (sorted by the sha256 of the source path, so the order is
arbitrary but reproducible), each up to ``drop_kb`` kilobytes of text.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

DOMAINS = ("python-reference", "python-code", "licenses", "manpages")
GENERAL = "general"
FIRST_DROP = date(2026, 1, 5)
DROP_EVERY = timedelta(days=28)


@dataclass(frozen=True)
class Document:
    """One source document of a domain."""

    source: str
    text: str
    license: str


def chunks(text: str, max_chars: int) -> Iterator[str]:
    """Runs of whole paragraphs of at most ``max_chars`` (a longer paragraph is cut)."""
    chunk = ""
    for para in text.split("\n\n"):
        para = para.strip()
        while len(para) > max_chars:
            if chunk:
                yield chunk
                chunk = ""
            yield para[:max_chars]
            para = para[max_chars:]
        if not para:
            continue
        if chunk and len(chunk) + len(para) + 2 > max_chars:
            yield chunk
            chunk = ""
        chunk = f"{chunk}\n\n{para}" if chunk else para
    if chunk:
        yield chunk


def python_reference() -> Iterator[Document]:
    """The language reference topics of ``pydoc_data``."""
    from pydoc_data import topics

    for name in sorted(topics.topics):
        yield Document(f"{topics.__file__}#{name}", topics.topics[name], "PSF-2.0")


def python_code() -> Iterator[Document]:
    """Standard-library modules (top-level .py files, no tests)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 2000:
            yield Document(str(path), text, "PSF-2.0")


def licenses() -> Iterator[Document]:
    """Licence texts: the ones Debian ships once for all packages, then each package's
    ``copyright`` file (licence grants and texts), identical texts once."""
    seen: set[str] = set()
    common = Path("/usr/share/common-licenses")
    paths = sorted(p for p in common.iterdir() if p.is_file() and not p.is_symlink()) if common.is_dir() else []
    paths += sorted(Path("/usr/share/doc").glob("*/copyright"))
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in seen and len(text) > 1000:
            seen.add(digest)
            yield Document(str(path), text, "verbatim copying of licence texts is permitted")


def manpages(limit: int = 400) -> Iterator[Document]:
    """Section-1 manual pages rendered to plain text (groff, no formatting codes)."""
    root = Path("/usr/share/man/man1")
    if not root.is_dir():
        return
    for path in sorted(root.glob("*.1*.gz"))[:limit]:
        try:
            source = gzip.decompress(path.read_bytes())
            if source.startswith(b".so "):
                continue  # a link to another page
            out = subprocess.run(["groff", "-t", "-man", "-Tutf8", "-P-cbou"], input=source, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired, EOFError):
            continue
        text = out.stdout.decode("utf-8", errors="replace")
        if len(text) > 1500:
            yield Document(str(path), _squeeze(text), "licence of the documented package")


def general() -> Iterator[Document]:
    """README files of installed packages: broad technical English outside the four domains."""
    root = Path("/usr/share/doc")
    if not root.is_dir():
        return
    for path in sorted(root.glob("*/README*")):
        try:
            raw = path.read_bytes()
            text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        if len(text) > 800:
            yield Document(str(path), text, "licence of the documenting package")


def _squeeze(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines()]
    out, blank = [], 0
    for line in lines:
        blank = blank + 1 if not line.strip() else 0
        if blank <= 1:
            out.append(line)
    return "\n".join(out).strip()


SOURCES = {
    "python-reference": python_reference,
    "python-code": python_code,
    "licenses": licenses,
    "manpages": manpages,
    GENERAL: general,
}


def _order(doc: Document) -> str:
    return hashlib.sha256(doc.source.encode()).hexdigest()


def build(out: Path, drops: int = 3, drop_kb: int = 120, general_kb: int = 40, max_chars: int = 1500) -> dict:
    """Write ``<domain>/drop-<k>-<date>.jsonl`` for every domain and ``general/general.jsonl``;
    return the manifest (also written to ``sources.json``). Raises if a domain has too little
    text for ``drops`` drops of at least a quarter of ``drop_kb``."""
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"drops": drops, "drop_kb": drop_kb, "domains": {}}
    for domain, source in SOURCES.items():
        docs = sorted(source(), key=_order)
        n_drops, budget = (1, general_kb) if domain == GENERAL else (drops, drop_kb)
        buckets: list[list[dict]] = [[] for _ in range(n_drops)]
        sizes = [0] * n_drops
        files = []
        k = 0
        for doc in docs:
            if k >= n_drops:
                break
            rows = [{"text": c, "source": doc.source} for c in chunks(doc.text, max_chars)]
            buckets[k].extend(rows)
            sizes[k] += sum(len(r["text"]) for r in rows)
            files.append({"path": doc.source, "sha256": hashlib.sha256(doc.text.encode()).hexdigest(), "license": doc.license, "drop": k + 1})
            if sizes[k] >= budget * 1000:
                k += 1
        if min(sizes) < budget * 250:
            raise SystemExit(f"{domain}: only {sum(sizes) // 1000} KB of text found for {n_drops} drop(s) of about {budget} KB; "
                             f"lower --drop-kb (source: {(source.__doc__ or source.__name__).splitlines()[0]})")
        written = []
        for i, rows in enumerate(buckets):
            when = FIRST_DROP + i * DROP_EVERY
            name = f"{GENERAL}.jsonl" if domain == GENERAL else f"drop-{i + 1}-{when.isoformat()}.jsonl"
            path = out / domain / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            written.append({"file": str(path.relative_to(out)), "date": when.isoformat(), "rows": len(rows), "chars": sizes[i]})
        manifest["domains"][domain] = {"drops": written, "sources": files}
    (out / "sources.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--drops", type=int, default=3)
    parser.add_argument("--drop-kb", type=int, default=120)
    args = parser.parse_args()
    manifest = build(args.out, args.drops, args.drop_kb)
    for domain, info in manifest["domains"].items():
        print(f"{domain:<18}" + "  ".join(f"{d['file']} ({d['rows']} rows, {d['chars'] // 1000} KB)" for d in info["drops"]))


if __name__ == "__main__":
    main()
