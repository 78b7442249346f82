"""Token-by-token streaming from a real `portfolio serve` process: chunks leave as the tokens
are generated (time to first chunk well under the whole answer's time), also for two requests
of different adapters answered in one mixed-adapter batch, and the streamed text is exactly the
non-streamed answer."""

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from portfolio import Registry
from tests.conftest import free_port, wait_until_healthy

TOKENS = 400


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base, lora_dir):
    from conftest import make_lora

    root = tmp_path_factory.mktemp("stream")
    db, store = f"sqlite:///{root / 'registry.db'}", root / "store"
    reg = Registry.open(db, store)
    reg.bases.add("tiny", tiny_base)
    reg.import_adapter("a", lora_dir, base="tiny")
    reg.import_adapter("b", make_lora(tiny_base, root / "other", seed=7), base="tiny")
    reg.close()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "portfolio", "--db", db, "--store", str(store), "serve", "--port", str(port),
                             "--max-tokens", str(TOKENS), "--batch-wait-ms", "150"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    wait_until_healthy(proc, client, lambda: proc.stderr.read())
    yield client
    proc.terminate()
    proc.wait(timeout=30)
    client.close()


def body(model: str, stream: bool) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": TOKENS,
            "stream": stream}


def streamed(client: httpx.Client, model: str, out: dict) -> None:
    """Stream one answer, noting when each content chunk arrived."""
    started, arrivals, text, finish = time.perf_counter(), [], "", None
    with client.stream("POST", "/v1/chat/completions", json=body(model, True)) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["delta"].get("content"):
                arrivals.append(time.perf_counter() - started)
                text += choice["delta"]["content"]
            finish = choice["finish_reason"] or finish
    out[model] = {"arrivals": arrivals, "text": text, "total": time.perf_counter() - started, "finish": finish}


def test_chunks_leave_as_tokens_are_generated_in_a_mixed_batch(server):
    expected = {m: server.post("/v1/chat/completions", json=body(m, False)).json()["choices"][0]["message"]["content"]
                for m in ("a@1", "b@1")}
    assert expected["a@1"] != expected["b@1"]  # two adapters, two answers
    got: dict = {}
    threads = [threading.Thread(target=streamed, args=(server, m, got)) for m in ("a@1", "b@1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for model in ("a@1", "b@1"):
        s = got[model]
        assert s["text"] == expected[model]  # the same greedy answer, streamed
        assert len(s["arrivals"]) > 20, s
        # the first piece leaves long before the last: tokens are sent as they are generated
        assert s["arrivals"][0] < 0.25 * s["arrivals"][-1], (s["arrivals"][0], s["arrivals"][-1])
    # both streams ran at once (the engine runs one batch at a time, so overlapping streams
    # were one mixed-adapter batch)
    a, b = got["a@1"]["arrivals"], got["b@1"]["arrivals"]
    assert a[0] < b[-1] and b[0] < a[-1]


def test_a_refused_stream_is_still_an_http_status(server):
    r = server.post("/v1/chat/completions", json=body("nope@1", True))
    assert r.status_code == 404 and "error" in r.json()
    r = server.post("/v1/completions", json={"model": "a@1", "prompt": "", "stream": True})
    assert r.status_code == 400
    with server.stream("POST", "/v1/completions", json={"model": "a@1", "prompt": "Once", "max_tokens": 8, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["portfolio"]["version"] == "a@1" and chunks[-1]["usage"]["completion_tokens"] <= 8
    assert "".join(c["choices"][0]["text"] for c in chunks) == server.post(
        "/v1/completions", json={"model": "a@1", "prompt": "Once", "max_tokens": 8}).json()["choices"][0]["text"]
