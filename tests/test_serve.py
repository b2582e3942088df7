"""The server for real: a `neuraldb serve` process on a loopback port, talked to with the
`openai` package and httpx. Knowledge edits over HTTP, streaming, auth, read-only, and a fuzz of
malformed requests that must all get 4xx."""
from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import httpx
import openai
import pytest

from conftest import make_model
from neuraldb import Fact
from serving import CHAT_TEMPLATE, TINY_CONFIG, Server

KEY = "test-key-123"
FACT = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of {}", "target_new": "Japanese",
        "target_true": "French"}
PROMPT = "The mother tongue of Danielle Darrieux"


@pytest.fixture(scope="module")
def chat_model_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-chat")
    make_model("llama", tokenizer).save_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE  # the session tokenizer gets it back below
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.chat_template = None
    return out


@pytest.fixture(scope="module")
def server(chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve")
    (root / "cfg.yaml").write_text(TINY_CONFIG)
    s = Server(root / "db", chat_model_dir, ["--config", str(root / "cfg.yaml"), "--max-tokens", "64",
                                             "--max-facts-per-request", "8", "--max-body-bytes", "65536"],
               api_key=KEY).start()
    yield s
    assert s.stop() == 0, s.tail()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(c: openai.OpenAI, prompt: str, n: int = 4) -> str:
    return c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=n,
                                temperature=0).choices[0].text


def test_openai_client_completions_chat_and_streams(server: Server) -> None:
    c = client(server)
    model = c.models.list().data[0].id
    full = c.completions.create(model=model, prompt="Berlin is the capital of", max_tokens=6, temperature=0)
    assert full.object == "text_completion" and full.choices[0].finish_reason in ("length", "stop")
    assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens > 0
    parts = list(c.completions.create(model=model, prompt="Berlin is the capital of", max_tokens=6, temperature=0,
                                      stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason
    chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Who made it?"}],
                                     max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    chunks = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Who made it?"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    # seeded sampling repeats; stop strings cut the text
    a, b = (c.completions.create(model=model, prompt="Where is", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    long = c.completions.create(model=model, prompt="Where is", max_tokens=12, temperature=0)
    stop = long.choices[0].text[3:5]
    if stop.strip():
        cut = c.completions.create(model=model, prompt="Where is", max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == long.choices[0].text[: long.choices[0].text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="x", max_tokens=1)


def test_a_fact_added_over_http_changes_the_answer_and_delete_restores_it(server: Server) -> None:
    c = client(server)
    before = greedy(c, PROMPT)
    h = server.headers()
    r = httpx.post(server.url + "/v1/facts", json=FACT, headers=h, timeout=120)
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    fid = item["id"]
    after = greedy(c, PROMPT)
    assert after != before and after.startswith(" Japanese"[:3]), (before, after)
    got = httpx.get(f"{server.url}/v1/facts/{fid}", headers=h).json()
    assert got["fact"]["target_new"] == "Japanese"
    listed = httpx.get(server.url + "/v1/facts", params={"subject": "Danielle Darrieux"}, headers=h).json()
    assert listed["object"] == "list" and [d["id"] for d in listed["data"]] == [fid]
    explained = httpx.post(server.url + "/v1/explain", json={"prompt": PROMPT}, headers=h).json()
    opened = [t for t in explained["tokens"] if t["opened"]]
    assert opened and opened[-1]["fact_id"] == fid and opened[-1]["cosine"] > explained["gamma"]
    assert opened[-1]["fact"]["subject"] == "Danielle Darrieux"
    new = dict(FACT, target_new="Russian")
    assert httpx.put(f"{server.url}/v1/facts/{fid}", json=new, headers=h, timeout=120).status_code == 200
    assert greedy(c, PROMPT) != after
    d = httpx.delete(f"{server.url}/v1/facts/{fid}", headers=h, timeout=120)
    assert d.status_code == 200 and d.json()["deleted"] is True
    assert greedy(c, PROMPT) == before
    assert httpx.get(f"{server.url}/v1/facts/{fid}", headers=h).status_code == 404
    metrics = httpx.get(server.url + "/metrics", headers=h).text
    assert "neuraldb_gate_opens_total" in metrics and "neuraldb_wal_fsyncs_total" in metrics
    assert 'neuraldb_requests_total{code="200",route="/v1/completions"}' in metrics


def test_a_client_that_leaves_mid_stream_costs_nothing_else(server: Server) -> None:
    h = {**server.headers(), "content-type": "application/json"}
    body = {"prompt": "Where is", "max_tokens": 60, "temperature": 0, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=h, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            next(r.iter_lines())  # the first event, then hang up
    c = client(server)
    assert c.completions.create(model=c.models.list().data[0].id, prompt="Where is", max_tokens=3,
                                temperature=0).choices[0].text is not None
    assert "Traceback" not in server.tail()


def test_the_server_reads_a_fact_as_the_api_does(server: Server) -> None:
    """A verbatim subject is converted to "{}" exactly as `Fact(...)` converts it; a prompt that
    names neither is a 400 naming the field."""
    h = {"Authorization": "Bearer " + KEY}
    verbatim = {**FACT, "prompt": PROMPT, "target_new": "Russian"}
    r = httpx.post(server.url + "/v1/facts", json=verbatim, headers=h, timeout=120)
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    expected = Fact(verbatim["subject"], verbatim["prompt"], verbatim["target_new"])
    assert item["fact"]["prompt"] == expected.prompt == FACT["prompt"]
    assert httpx.delete(f"{server.url}/v1/facts/{item['id']}", headers=h, timeout=120).status_code == 200
    bad = httpx.post(server.url + "/v1/facts", json={**FACT, "prompt": "The mother tongue of"}, headers=h)
    assert bad.status_code == 400 and "'prompt'" in bad.json()["error"]["message"]


def test_auth_is_required_on_every_route(server: Server) -> None:
    for method, path in (("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/facts"),
                         ("POST", "/v1/completions"), ("POST", "/v1/facts"), ("DELETE", "/v1/facts/0")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": "Basic " + KEY}, {"Authorization": "Bearer " + KEY + "x"}):
            r = httpx.request(method, server.url + path, headers=headers, json={})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def malformed(rng: random.Random) -> list[tuple[str, str, dict, bytes]]:
    """(method, path, headers, body) that a correct server must answer with a 4xx."""
    j = {"content-type": "application/json"}
    good = {"prompt": "hi", "max_tokens": 2}
    cases = [
        ("POST", "/v1/completions", j, b"{"), ("POST", "/v1/completions", j, b""),
        ("POST", "/v1/completions", j, b"[]"), ("POST", "/v1/completions", j, b"null"),
        ("POST", "/v1/completions", j, b"\xff\xfe\x00garbage"), ("POST", "/v1/completions", j, b'"text"'),
        ("POST", "/v1/completions", {"content-type": "text/plain"}, b"hello"),
        ("POST", "/v1/chat/completions", j, b'{"messages": []}'),
        ("POST", "/v1/chat/completions", j, b'{"messages": [{"role": "wizard", "content": "x"}]}'),
        ("POST", "/v1/chat/completions", j, b'{"messages": [{"role": "user"}]}'),
        ("POST", "/v1/chat/completions", j, b'{"messages": "hi"}'),
        ("POST", "/v1/facts", j, b"{}"), ("POST", "/v1/facts", j, b"[]"), ("POST", "/v1/facts", j, b"[1, 2]"),
        ("POST", "/v1/facts", j, json.dumps(dict(FACT, prompt="no placeholder")).encode()),
        ("POST", "/v1/facts", j, json.dumps(dict(FACT, colour="red")).encode()),
        ("POST", "/v1/facts", j, json.dumps(dict(FACT, subject=7)).encode()),
        ("POST", "/v1/facts", j, json.dumps([FACT] * 9).encode()),  # over the per-request limit
        ("PUT", "/v1/facts/999999", j, json.dumps(FACT).encode()), ("PUT", "/v1/facts/abc", j, b"{}"),
        ("DELETE", "/v1/facts/-5", {}, b""), ("DELETE", "/v1/facts/" + "9" * 40, {}, b""),
        ("GET", "/v1/facts/1.5", {}, b""), ("GET", "/v1/facts?limit=0", {}, b""),
        ("GET", "/v1/facts?limit=100000", {}, b""), ("GET", "/v1/facts?after=x", {}, b""),
        ("POST", "/v1/explain", j, b"{}"), ("POST", "/v1/explain", j, b'{"prompt": "a", "messages": []}'),
        ("POST", "/v1/explain", j, b'{"prompt": ""}'),
        ("PATCH", "/v1/facts/0", j, b"{}"), ("GET", "/v1/nowhere", {}, b""),
        ("POST", "/v1/completions", j, b"x" * 70000),  # over --max-body-bytes
        ("POST", "/v1/completions", j, json.dumps({"prompt": "hi " * 3000}).encode()),  # prompt tokens
        ("POST", "/v1/completions", j, json.dumps({"prompt": ["a", 5]}).encode()),
        ("POST", "/v1/completions", j, json.dumps({"prompt": []}).encode()),
        ("POST", "/v1/completions", j, json.dumps({"prompt": [1, 2, 3]}).encode()),
        ("POST", "/v1/completions", j, json.dumps({"prompt": "x", "stop": [""]}).encode()),
        ("POST", "/v1/completions", j, json.dumps({"prompt": "x", "stop": ["a"] * 5}).encode()),
        ("POST", "/v1/completions", j, json.dumps({"prompt": "x", "n": 3}).encode()),
        ("POST", "/v1/completions", j, json.dumps({"prompt": "x", "logprobs": 5}).encode()),
        ("POST", "/v1/completions", j, json.dumps({"prompt": "hi " * 100, "max_tokens": 60}).encode()),  # context
    ]
    for field, bad in (("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 10**6), ("max_tokens", "many"),
                       ("max_tokens", 2.5), ("temperature", -1), ("temperature", 9), ("temperature", "hot"),
                       ("top_p", 0), ("top_p", 1.5), ("seed", -3), ("seed", 2**70), ("stream", "yes"),
                       ("model", 5), ("unknown_field", 1), ("stop", 5), ("stream_options", {"x": 1})):
        cases.append(("POST", "/v1/completions", j, json.dumps({**good, field: bad}).encode()))
    for _ in range(25):  # random bytes and random JSON shapes
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
        cases.append(("POST", rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/facts", "/v1/explain"]),
                      j, junk))
        shape = rng.choice([[], {}, 0, "s", None, True, [{}], {"prompt": {"a": []}}, {"messages": [None]}])
        cases.append(("POST", rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/facts", "/v1/explain"]),
                      j, json.dumps(shape).encode()))
    return cases


def test_malformed_requests_get_4xx_in_openai_shape(server: Server) -> None:
    h = server.headers()
    for method, path, headers, body in malformed(random.Random(0)):
        r = httpx.request(method, server.url + path, headers={**h, **headers}, content=body, timeout=60)
        assert 400 <= r.status_code < 500, (method, path, body[:80], r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
    # what httpx refuses to send: broken framing and headers, on a raw socket
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    for raw in (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: abc\r\n\r\n{}",
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 5\r\n\r\n{",
                b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
                b"NONSENSE\r\n\r\n"):
        status = raw_status(server, raw)
        assert status is None or 400 <= status < 500, (raw, status)
    assert httpx.get(server.url + "/health", headers=h).json()["status"] == "ok"
    assert "internal error" not in server.tail() and "Traceback" not in server.tail()


def raw_status(server: Server, data: bytes) -> int | None:
    """The status line's code for raw bytes sent to the server (None: it closed the connection)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
    if not got:
        return None
    return int(got.split(b" ", 2)[1])


def test_read_only_refuses_writes(chat_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(TINY_CONFIG)
    s = Server(tmp_path / "db", chat_model_dir, ["--config", str(tmp_path / "cfg.yaml"), "--read-only"]).start()
    try:
        for method, path in (("POST", "/v1/facts"), ("PUT", "/v1/facts/0"), ("DELETE", "/v1/facts/0")):
            r = httpx.request(method, s.url + path, json=FACT)
            assert r.status_code == 403 and r.json()["error"]["code"] == "read_only"
        assert httpx.get(s.url + "/v1/facts").json()["data"] == []
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    finally:
        assert s.stop() == 0
