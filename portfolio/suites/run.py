"""Running suites: batched greedy generation for several versions in one model load, choice
scoring by log-likelihood, verdicts, metrics, and reuse of stored results.

The base is loaded once and every pending version is attached as a named PEFT adapter. Cases
of all single-artifact versions (and of the base, as PEFT's ``__base__``) go through the same
left-padded batches, each row with its own adapter (PEFT's mixed-adapter batches,
``adapter_names``), generated greedily with the KV cache; a stack, whose parts must be active
together, gets batches of its own. A ``choice`` check scores each option by the sum of its
tokens' log-probabilities after the prompt, in batches too.

A result's key is the sha256 of the base weights, the version's serving key (artifact digest,
or a stack's parts), the suite's sha256, the generation settings and `SUITES_VERSION`: equal
key, equal outputs, so a stored result is returned and nothing is loaded.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portfolio import mixed_batch, runtime
from portfolio import engines
from portfolio.serving import activate, loaded
from portfolio.suites.cases import Case, Suite
from portfolio.suites.checks import FORMAT_KINDS, is_refusal, judge, parse_json_output, words
from portfolio.suites.scoring import softmax, summarize_by_slice

SUITES_VERSION = 1  # bump when generation, checks or scoring change, so stored results are not reused


@dataclass(frozen=True)
class SuiteScore:
    """One model's run of one suite: metrics (overall and per slice) and every case."""

    model: str
    suite: str
    metrics: dict[str, Any]
    cases: list[dict[str, Any]]
    reused: bool
    engine: str = ""  # the serving engine it ran on ("llamacpp:Q4_1"); "" = portfolio's reference model

    @property
    def overall(self) -> dict[str, Any]:
        """The suite-wide metrics."""
        return self.metrics["overall"]


def suite_eval_key(base_sha: str, serving: str | None, suite_sha: str, settings: dict[str, Any]) -> str:
    """The identity of a suite run's inputs."""
    payload = {"base": base_sha, "adapter": serving, "suite": suite_sha, "settings": settings, "code": SUITES_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run_suites(registry, models: list[str], suites: list[str], *, batch_size: int | None = None, device: str = "auto",
               log: Callable[[str], None] = print, progress: bool = False, engine: str | None = None) -> list[SuiteScore]:
    """Every model (version refs or ``base:NAME``) on every suite; computed only where no
    stored result matches, all pending work in one model load. With ``engine``
    (``llamacpp[:QUANT]``) the answers and option log-probabilities come from that engine
    over the base file as shipped, and are stored as that engine's results."""
    from portfolio.evaluation.evaluate import resolve_models

    resolved, base = resolve_models(registry, models)
    served = engines.target(base, engine, log) if engine else None
    label_of = served.label if served else ""
    snaps = [registry.suites.get(s) for s in suites]
    parsed = {s.ref: registry.suites.cases(s.ref) for s in snaps}
    scores: dict[tuple[str, str], SuiteScore] = {}
    pending: list[tuple[str, str | None, str, str, dict[str, Any]]] = []
    for label, _, serving in resolved:
        for snap in snaps:
            settings = {"max_new_tokens": parsed[snap.ref].max_new_tokens, "greedy": True}
            if served:
                settings["engine"] = served.identity
            key = suite_eval_key(base.weights_sha256, serving, snap.sha256, settings)
            stored = registry.suites.find_result(key, label)
            if stored is not None and stored.model != label:
                # the same weights scored under another name (an imported copy): stored under
                # this one too, so its history, matrix and gates see the result
                stored = registry.suites.record_result(label, snap.ref, key, stored.settings, stored.metrics, stored.cases,
                                                       engine=stored.engine)
            if stored is not None:
                scores[(label, snap.ref)] = SuiteScore(label, snap.ref, stored.metrics, stored.cases, True, label_of)
            else:
                pending.append((label, serving, snap.ref, key, settings))
    if pending and served:
        _compute_on_engine(registry, base, pending, parsed, served, scores, log)
    elif pending:
        _compute(registry, base, pending, parsed, batch_size, device, scores, log, progress)
    return [scores[(label, s.ref)] for label, _, _ in resolved for s in snaps]


def _compute(registry, base, pending, parsed: dict[str, Suite], batch_size, device_name, scores, log, progress) -> None:
    import torch

    with loaded(registry, base, [label for label, serving, *_ in pending if serving is not None], device_name, log, prefix="s") as rt:
        model, tokenizer, adapters = rt.model, rt.tokenizer, rt.adapters
        engine = SuiteGenerator(model, tokenizer, rt.device, batch_size or (32 if rt.device.type == "cuda" else 16), progress)
        # one request per (model, case): a model runs as one adapter name in a mixed batch, or
        # (a stack) as several names active together, in batches of its own
        groups: dict[str, list[str] | None] = {}
        for label, serving, *_ in pending:
            names = adapters.get(label)
            groups[label] = names if names and len(names) > 1 else None
        route = {label: (adapters[label][0] if label in adapters else runtime.BASE_ADAPTER) for label in groups}
        outputs: dict[tuple[str, str, str], str] = {}
        choices: dict[tuple[str, str, str], list[float]] = {}
        with torch.no_grad():
            for stack_names in [None] + [n for n in groups.values() if n]:
                members = [lbl for lbl, n in groups.items() if n == stack_names]
                work = [(lbl, ref, case) for lbl, _, ref, _, _ in pending if lbl in members for case in parsed[ref].cases]
                if not work:
                    continue
                if stack_names is not None:
                    activate(model, stack_names)
                peft_names = None if stack_names is not None or not adapters else [route[lbl] for lbl, _, _ in work]
                gen = [(i, w) for i, w in enumerate(work) if w[2].generates]
                for ref in {ref for _, ref, _ in work}:
                    need = [(i, w) for i, w in gen if w[1] == ref]
                    if need:
                        log(f"generating {len(need)} answers for {ref} ({', '.join(members)})")
                        texts = engine.generate([w[2].chat() for _, w in need], parsed[ref].max_new_tokens,
                                                [peft_names[i] for i, _ in need] if peft_names else None)
                        for (_, (lbl, r, case)), text in zip(need, texts):
                            outputs[(lbl, r, case.id)] = text
                mc = [(i, w) for i, w in enumerate(work) if any(c["kind"] == "choice" for c in w[2].checks)]
                if mc:
                    logps = engine.option_logprobs([(w[2].chat(), _choice(w[2])["options"]) for _, w in mc],
                                                   [peft_names[i] for i, _ in mc] if peft_names else None)
                    for (_, (lbl, r, case)), lp in zip(mc, logps):
                        choices[(lbl, r, case.id)] = lp
        for item in pending:
            _record(registry, item, parsed[item[2]], outputs, choices, scores, "")


def _record(registry, item, suite: Suite, outputs, choices, scores, engine: str) -> None:
    """Judge every case of one (model, suite) from its outputs and option scores, store it."""
    import dataclasses

    label, _, ref, key, settings = item
    results, skipped = [], []
    for case in suite.cases:
        logps = choices.get((label, ref, case.id))
        if logps is None and any(c["kind"] == "choice" for c in case.checks):
            # the engine gave no log-probabilities: its choice checks are skipped, not failed
            skipped.append(case.id)
            case = dataclasses.replace(case, checks=[c for c in case.checks if c["kind"] != "choice"])
            if not case.checks:
                continue
        results.append(judge_case(case, outputs.get((label, ref, case.id)), logps, suite.refusal_patterns))
    metrics = summarize_by_slice(results)
    if skipped:
        metrics["skipped"] = {"choice": skipped, "reason": f"{engine} returns no prompt log-probabilities"}
    registry.suites.record_result(label, ref, key, settings, metrics, results, code_version=str(SUITES_VERSION), engine=engine)
    scores[(label, ref)] = SuiteScore(label, ref, metrics, results, False, engine)


def _compute_on_engine(registry, base, pending, parsed: dict[str, Suite], served, scores, log) -> None:
    """Each model's cases on the serving engine (`engines.target`): the version exported for
    it, the same prompt token ids as the reference model gets, greedy; choice cases from the
    engine's own log-probabilities."""
    from portfolio.data.tokenize import chat_prompt_ids
    from portfolio.modeling import load_tokenizer, model_folder

    from portfolio.export import export_rank

    tokenizer = load_tokenizer(*model_folder(base, log))
    ranks = [export_rank(registry, registry.get_version(label)) for label in {item[0] for item in pending} if not label.startswith("base:")]
    with tempfile.TemporaryDirectory(prefix="portfolio-engine-") as work, served.session(registry, Path(work), log, max(ranks, default=8)):
        for label in dict.fromkeys(item[0] for item in pending):
            items = [item for item in pending if item[0] == label]
            cases = [(ref, case) for _, _, ref, _, _ in items for case in parsed[ref].cases]
            outputs: dict[tuple[str, str, str], str] = {}
            choices: dict[tuple[str, str, str], list[float]] = {}
            log(f"answering {len(cases)} cases of {label} on {served.label}")
            logits = any(c["kind"] == "choice" for _, case in cases for c in case.checks)
            with served.model(registry, None if label.startswith("base:") else label, Path(work), logits) as engine:
                for ref, case in cases:
                    prompt = chat_prompt_ids(tokenizer, case.chat())
                    if case.generates:
                        ids = engine.greedy(prompt, parsed[ref].max_new_tokens)
                        outputs[(label, ref, case.id)] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                    if any(c["kind"] == "choice" for c in case.checks):
                        options = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in _choice(case)["options"]]
                        logps = engine.option_logprobs(prompt, options)  # None: the engine cannot score them
                        if logps is not None:
                            choices[(label, ref, case.id)] = logps
            for item in items:
                _record(registry, item, parsed[item[2]], outputs, choices, scores, served.label)


def _choice(case: Case) -> dict[str, Any]:
    return next(c for c in case.checks if c["kind"] == "choice")


def judge_case(case: Case, output: str | None, option_logps: list[float] | None, refusal_patterns: list[str]) -> dict[str, Any]:
    """One case's verdicts from its output (and its options' log-likelihoods)."""
    verdicts = []
    choice = None
    for check in case.checks:
        if check["kind"] == "choice":
            probs = softmax(option_logps)
            pred = max(range(len(probs)), key=probs.__getitem__)
            choice = {"options": check["options"], "probs": probs, "pred": pred, "answer": check["answer"]}
            verdicts.append({"kind": "choice", "passed": pred == check["answer"], "note": f"{probs[pred]:.2f} on {check['options'][pred]!r}"})
        else:
            passed, note = judge(check, output or "", refusal_patterns)
            verdicts.append({"kind": check["kind"], "passed": passed, "note": note})
    has_format = any(c["kind"] in FORMAT_KINDS for c in case.checks)
    return {
        "id": case.id, "slice": case.slice, "critical": case.critical, "output": output,
        "checks": verdicts, "passed": all(v["passed"] for v in verdicts),
        "refused": is_refusal(output, refusal_patterns) if output is not None else None,
        "words": words(output) if output is not None else None,
        "format_ok": parse_json_output(output or "")[0] if has_format and output is not None else None,
        "choice": choice,
    }


class SuiteGenerator:
    """Batched greedy generation and option scoring on one loaded (PEFT) model."""

    def __init__(self, model, tokenizer, device, batch_size: int, progress: bool = False):
        self.model, self.tokenizer, self.device, self.batch_size, self.progress = model, tokenizer, device, batch_size, progress
        self.pad_id = runtime.pad_id(tokenizer)

    def encode(self, chat: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation with the assistant's turn opened."""
        from portfolio.data.tokenize import chat_prompt_ids

        return chat_prompt_ids(self.tokenizer, chat)

    def _batches(self, n: int, lengths: list[int], what: str = "answers"):
        """Index batches of similar lengths (less padding), with cases done / total and an ETA
        on stderr."""
        from tqdm.auto import tqdm

        order = sorted(range(n), key=lambda i: lengths[i])
        bar = tqdm(total=n, desc=what, unit="case", disable=not self.progress, leave=False)
        try:
            for i in range(0, n, self.batch_size):
                chunk = order[i:i + self.batch_size]
                yield chunk
                bar.update(len(chunk))
        finally:
            bar.close()

    def generate(self, chats: list[list[dict[str, str]]], max_new_tokens: int, adapter_names: list[str] | None) -> list[str]:
        """Greedy completions, one per chat, in left-padded batches (with the KV cache)."""
        from portfolio.data.tokenize import left_pad

        prompts = [self.encode(c) for c in chats]
        out: list[str] = [""] * len(prompts)
        for idx in self._batches(len(prompts), [len(p) for p in prompts]):
            ids, mask = left_pad([prompts[i] for i in idx], self.pad_id)
            width = ids.shape[1]
            names = [adapter_names[i] for i in idx] if adapter_names else None
            gen = mixed_batch.generate(self.model, names, self.pad_id, input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                       max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id)
            for row, i in enumerate(idx):
                out[i] = self.tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
        return out

    def option_logprobs(self, items: list[tuple[list[dict[str, str]], list[str]]], adapter_names: list[str] | None) -> list[list[float]]:
        """For each (chat, options): the summed log-probability of each option's tokens after
        the prompt — every option of a case from one pass over its prompt (`suites.choice`),
        cases of similar packed length batched together."""
        from portfolio.suites.choice import pack, score_packed

        rows = [pack(self.encode(chat), [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options])
                for chat, options in items]
        out: list[list[float]] = [[] for _ in items]
        for idx in self._batches(len(rows), [len(r.ids) for r in rows], "choice"):
            names = [adapter_names[i] for i in idx] if adapter_names else None
            for i, scores in zip(idx, score_packed(self.model, [rows[i] for i in idx], self.pad_id, self.device, names)):
                out[i] = scores
        return out
