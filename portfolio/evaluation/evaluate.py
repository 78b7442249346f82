"""`evaluate`: score versions (or a base) on the held-out rows of snapshots and on retention
sets, computing nothing twice.

Two layers of reuse:

- a whole result: its key is the sha256 of everything that determines it (the base weights,
  the adapter's artifact digest — none for the base alone —, the snapshot's sha256, the exact
  held-out row ids, the sequence length and `METRICS_VERSION`). Equal key, equal numbers: the
  stored ones are returned and nothing is loaded;
- each example: every score ever computed is kept per (`model_key`, `example_sha`), so an
  evaluation on rows a model was already scored on (a retention set that shrank, the parent's
  scores from its own candidacy, a revalidation's fresh rows) loads nothing either, and only
  missing examples go through the model.

What is computed runs in one model load, all models in the same batches where PEFT allows
(its mixed-adapter batch, ``adapter_names``); a stack, whose parts are active together, gets
batches of its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from portfolio import runtime
from portfolio.data.splits import split_rows
from portfolio.data.tokenize import Example, encode_rows
from portfolio.errors import InvalidState
from portfolio.registry.registry import Registry
from portfolio.serving import loaded

METRICS_VERSION = 2  # bump when the metric code changes, so stored results are not reused (2: per-example scores)
DEFAULT_SEQ_LEN = 256


@dataclass(frozen=True)
class Score:
    """One model on one snapshot (or retention set)."""

    model: str
    snapshot: str
    metrics: dict[str, float]
    n_tokens: int
    reused: bool
    per_example: list[list[float]] | None = None  # [loss sum, correct, tokens] per example, in order


@dataclass(frozen=True)
class Target:
    """What to score on: a snapshot's whole held-out split (recorded as an evaluation of that
    snapshot), or given rows of several snapshots (a retention set), one example per row."""

    label: str
    parts: tuple[tuple[str, tuple[int, ...]], ...]  # (snapshot ref, row ids); empty ids = its held-out split
    whole_snapshot: bool = True

    @property
    def rows(self) -> int | None:
        """Rows named (None for a whole held-out split)."""
        return None if self.whole_snapshot else sum(len(ids) for _, ids in self.parts)


def snapshot_target(ref: str) -> Target:
    """The held-out split of one snapshot."""
    return Target(ref, ((ref, ()),))


def retention_target(rset, snapshots: list[str] | None = None) -> Target | None:
    """The rows of a retention set (only those drawn from ``snapshots``, when given); None
    when it holds none."""
    members = rset.members if snapshots is None else rset.restricted(snapshots)
    parts = tuple((ref, tuple(rows)) for ref, rows in members.items() if rows)
    return Target(rset.ref, parts, whole_snapshot=False) if parts else None


def eval_key(base_sha: str, artifact: str | None, snapshot_sha: str, row_ids: list[int], seq_len: int) -> str:
    """The identity of an evaluation's inputs."""
    payload = {"base": base_sha, "adapter": artifact, "data": snapshot_sha, "rows": row_ids, "seq_len": seq_len, "metrics": METRICS_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def model_key(base_sha: str, serving: str | None, seq_len: int) -> str:
    """The identity of a scoring model: the base weights, the adapter's serving key (none for
    the base alone), the sequence length and the metric code."""
    payload = {"base": base_sha, "adapter": serving, "seq_len": seq_len, "metrics": METRICS_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def example_sha(example: Example) -> str:
    """The identity of a tokenised example: its tokens and labels."""
    return hashlib.sha256(json.dumps([example.input_ids, example.labels]).encode()).hexdigest()


@dataclass
class Scorer:
    """Scores examples for several models on one loaded model, through the registry's
    example cache. A route is how a model runs: None (the base), one adapter name, or the
    names of a stack's parts."""

    registry: Registry
    model: Any
    pad_id: int
    batch_size: int
    device: Any
    computed: int = field(default=0)

    def score(self, jobs: list[tuple[str, Any, list[Example]]],
              known: dict[str, dict[str, list[float]]] | None = None) -> list[list[list[float]]]:
        """Per-example ``[loss sum, correct, tokens]`` of each (model key, route, examples);
        ``known`` holds scores the caller already read from the cache (model key -> sha -> scores)."""
        from peft import PeftModel

        from portfolio.evaluation.metrics import evaluate_examples

        shas = [[example_sha(e) for e in examples] for _, _, examples in jobs]
        known = known if known is not None else cached_scores(self.registry, jobs, shas)
        todo: dict[tuple[str, str], tuple[Any, Example]] = {}
        for (key, route, examples), job_shas in zip(jobs, shas):
            for sha, example in zip(job_shas, examples):
                if sha not in known[key]:
                    todo.setdefault((key, sha), (route, example))
        if todo:
            peft = isinstance(self.model, PeftModel)
            groups: dict[Any, list[tuple[str, str]]] = {}
            for item, (route, _) in todo.items():
                # single adapters and the base share batches; each stack runs alone
                group = tuple(route) if isinstance(route, list) and len(route) > 1 else "mixed"
                groups.setdefault(group, []).append(item)
            fresh: dict[str, dict[str, list[float]]] = {}
            for group, items in groups.items():
                items.sort(key=lambda it: len(todo[it][1].input_ids))  # similar lengths share a batch
                examples = [todo[it][1] for it in items]
                if group != "mixed":
                    from portfolio.serving import activate

                    activate(self.model, list(group))
                    names = None
                else:
                    names = [_single(todo[it][0]) for it in items] if peft else None
                if peft and group == "mixed" and all(n == runtime.BASE_ADAPTER for n in names):
                    with self.model.disable_adapter():
                        out = evaluate_examples(self.model, examples, self.pad_id, self.batch_size, self.device)
                else:
                    out = evaluate_examples(self.model, examples, self.pad_id, self.batch_size, self.device, adapter_names=names)
                for (key, sha), row in zip(items, out["per_example"]):
                    fresh.setdefault(key, {})[sha] = row
            for key, rows in fresh.items():
                self.registry.retention.record_example_scores(key, rows)
                known[key].update(rows)
            self.computed += len(todo)
        return [[known[key][sha] for sha in job_shas] for (key, _, _), job_shas in zip(jobs, shas)]


def cached_scores(registry: Registry, jobs: list[tuple[str, Any, list[Example]]], shas: list[list[str]]) -> dict[str, dict[str, list[float]]]:
    """What the example cache holds for the jobs, read once per model key."""
    wanted: dict[str, list[str]] = {}
    for (key, _, _), job_shas in zip(jobs, shas):
        wanted.setdefault(key, []).extend(job_shas)
    return {key: registry.retention.example_scores(key, key_shas) for key, key_shas in wanted.items()}


def _single(route: Any) -> str:
    if route is None:
        return runtime.BASE_ADAPTER
    return route[0] if isinstance(route, list) else route


def _resolve(registry: Registry, ref: str) -> tuple[str, str, str | None]:
    """(label, base name, serving key or None) of a version ref or ``base:NAME``."""
    if ref.startswith("base:"):
        return ref, registry.bases.get(ref[5:]).name, None
    from portfolio.serving import serving_key

    version = registry.get_version(ref)
    if version.status == "archived":
        raise InvalidState(f"{version.ref} is archived and its bytes are gone; its stored scores remain (`portfolio show`)")
    return version.ref, version.base_model, serving_key(registry, version)


def resolve_models(registry: Registry, models: list[str]) -> tuple[list[tuple[str, str, str | None]], Any]:
    """(label, base name, serving key) of each model, and the one base they share (models on
    different bases cannot share one model load)."""
    resolved = [_resolve(registry, m) for m in models]
    bases = {base for _, base, _ in resolved}
    if len(bases) > 1:
        raise InvalidState(f"models on different bases cannot share one evaluation: {', '.join(sorted(bases))}")
    return resolved, registry.bases.get(bases.pop())


def evaluate(
    registry: Registry,
    models: list[str],
    snapshots: list[str],
    *,
    targets: list[Target] | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> list[Score]:
    """Scores (loss, perplexity, accuracy, tokens scored, per-example) of every model on
    every snapshot's held-out rows, then on every extra ``target``, model by model; computed
    only where nothing stored matches. Whole-snapshot results are recorded as evaluations."""
    resolved, base = resolve_models(registry, models)
    wanted = [snapshot_target(registry.data.get(s).ref) for s in snapshots] + list(targets or [])
    refs = list(dict.fromkeys(ref for t in wanted for ref, _ in t.parts))
    snaps = dict(zip(refs, registry.data.get_many(refs)))
    rows_of: dict[str, list[dict]] = {}

    heldout_of: dict[str, list[dict]] = {}

    def rows(ref: str, ids: tuple[int, ...]) -> list[dict]:
        if ref not in rows_of:
            rows_of[ref] = registry.data.rows(snaps[ref])
        if not ids:
            if ref not in heldout_of:
                heldout_of[ref] = split_rows(rows_of[ref])[1]
            return heldout_of[ref]
        keep = set(ids)
        return [r for r in rows_of[ref] if r["row"] in keep]

    scores: dict[tuple[str, str], Score] = {}
    pending: list[tuple[str, str | None, Target, str | None]] = []
    for label, _, serving in resolved:
        for t in wanted:
            key = None
            if t.whole_snapshot:
                ref = t.parts[0][0]
                key = eval_key(base.weights_sha256, serving, snaps[ref].sha256, [r["row"] for r in rows(ref, ())], seq_len)
                stored = registry.evaluations.find(key)
                if stored is not None:
                    scores[(label, t.label)] = Score(label, t.label, stored["metrics"], stored["n_tokens"] or 0, True, stored.get("per_example"))
                    continue
            pending.append((label, serving, t, key))
    if pending:
        _compute(registry, base, pending, snaps, rows, seq_len, batch_size, device, scores, log)
    return [scores[(label, t.label)] for label, _, _ in resolved for t in wanted]


def _compute(registry, base, pending, snaps, rows, seq_len, batch_size, device_name, scores, log) -> None:
    from portfolio.evaluation.metrics import metrics_from_rows
    from portfolio.modeling import load_tokenizer, model_folder

    folder, _ = model_folder(base, log)
    tokenizer = load_tokenizer(folder)
    examples: dict[str, list[Example]] = {}
    for _, _, t, _ in pending:
        if t.label not in examples:
            examples[t.label] = [e for ref, ids in t.parts
                                 for e in encode_rows(rows(ref, ids), snaps[ref].format, tokenizer, seq_len, pack=t.whole_snapshot)]
    keys = {label: model_key(base.weights_sha256, serving, seq_len) for label, serving, _, _ in pending}
    shas = {label: [example_sha(e) for e in exs] for label, exs in examples.items()}
    jobs = [(keys[label], None, examples[t.label]) for label, _, t, _ in pending]
    known = cached_scores(registry, jobs, [shas[t.label] for _, _, t, _ in pending])
    # everything already scored example by example needs no model at all
    cached = {(label, t.label) for label, _, t, _ in pending if all(sha in known[keys[label]] for sha in shas[t.label])}
    with _loaded(registry, base, [(label, serving) for label, serving, t, _ in pending if (label, t.label) not in cached],
                 tokenizer, batch_size, device_name, log) as (scorer, routes):
        jobs = [(keys[label], routes.get(label), examples[t.label]) for label, _, t, _ in pending]
        for label, _, t, _ in pending:
            if (label, t.label) not in cached:
                log(f"evaluating {label} on {t.label} ({len(examples[t.label])} examples)")
        per_job = (scorer.score(jobs, known) if scorer is not None
                   else [[known[keys[label]][sha] for sha in shas[t.label]] for label, _, t, _ in pending])
    for (label, _, t, key), per_example in zip(pending, per_job):
        metrics = metrics_from_rows(per_example)
        n_tokens = int(metrics.pop("n_tokens"))
        if t.whole_snapshot:
            ref = t.parts[0][0]
            registry.evaluations.record(label, ref, metrics, n_tokens=n_tokens, row_ids=[r["row"] for r in rows(ref, ())],
                                       eval_key=key, per_example=per_example)
        scores[(label, t.label)] = Score(label, t.label, metrics, n_tokens, (label, t.label) in cached, per_example)


@contextmanager
def _loaded(registry, base, models, tokenizer, batch_size, device_name, log):
    """The base with every model that needs computing attached, and a `Scorer` over it
    (with each model's adapter names); no load at all when nothing needs computing."""
    models = list(dict.fromkeys(models))
    if not models:
        yield None, {}
        return
    with loaded(registry, base, [label for label, serving in models if serving is not None], device_name, log) as rt:
        yield (Scorer(registry, rt.model, runtime.pad_id(tokenizer), batch_size or (32 if rt.device.type == "cuda" else 8), rt.device),
               rt.adapters)
