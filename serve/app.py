"""The HTTP layer: OpenAI-compatible inference, the knowledge API, health and metrics.

Handlers validate, tokenize (with their own tokenizer copy) and hand jobs to the engine's
worker; they never touch the model. Every error is OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx for anything the client sent."""
from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.editor import subject_key
from ..engine.facts import Fact, FactError, fact_from_json
from .engine import Job, JobError, ServeEngine
from .generate import RowOut, Sampling, streamable
from .schemas import ChatRequest, CompletionRequest, ExplainRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    api_key: str | None = None
    read_only: bool = False
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 16  # OpenAI's default for completions
    max_facts_per_request: int = 64
    max_page: int = 1000


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


_ROUTE = re.compile(r"/\d+(?=/|$)")
_KNOWN = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/facts", "/v1/facts/{id}", "/v1/explain",
          "/health", "/metrics")


def route_label(path: str) -> str:
    """The metrics label of a path: its route, ids folded ("/v1/facts/{id}"); unknown paths "other"."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    label = _ROUTE.sub("/{id}", path)
    return label if label in _KNOWN else "other"


class Guard:
    """ASGI middleware before every route: API key, body size, request metrics."""

    def __init__(self, app: Any, settings: ServerSettings, engine: ServeEngine) -> None:
        self.app, self.settings, self.metrics = app, settings, engine.metrics
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        label = route_label(scope.get("path", ""))

        async def send_status(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            rejected = self._auth(scope) or await self._read_body(scope, receive)
            if isinstance(rejected, JSONResponse):
                return await rejected(scope, receive, send_status)
            body, more = rejected, [False]

            async def replay() -> dict:
                if not more[0]:
                    more[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: disconnect notices

            await self.app(scope, replay, send_status)
        finally:
            code = str(status[0])
            self.metrics.inc("neuraldb_requests_total", 1, "HTTP requests by route and status",
                             {"route": label, "code": code})
            self.metrics.observe("neuraldb_request_seconds", time.perf_counter() - t0,
                                 "HTTP request latency until the response ended", {"route": label})

    def _auth(self, scope: dict) -> JSONResponse | None:
        if self.key is None:
            return None
        got = b""
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                got = v
        want = b"Bearer " + self.key
        if not hmac.compare_digest(got, want):  # constant time in the key's content
            return error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                  None, "invalid_api_key")
        return None

    async def _read_body(self, scope: dict, receive: Callable) -> bytes | JSONResponse:
        limit = self.settings.max_body_bytes
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return error_response(400, "Content-Length is not a number", "Content-Length")
                if n > limit:
                    return error_response(413, f"request body of {n} bytes is over the limit of {limit}", "body")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return error_response(413, f"request body is over the limit of {limit} bytes", "body")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return b"".join(chunks)


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) if parts else ("body" if loc and loc[0] == "body" else None)


async def _run(engine: ServeEngine, kind: str, payload: Any,
               on_step: Callable[[RowOut], None] | None = None, cancellable: bool = True) -> Any:
    """Submit a job to the worker and wait for it; a cancelled wait cancels the job (not writes)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(res: Any, err: BaseException | None) -> None:
        if fut.done():
            return
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(res)

    job = Job(kind, payload, lambda r, e: loop.call_soon_threadsafe(settle, r, e), on_step)
    engine.submit(job)
    try:
        return await asyncio.shield(fut) if not cancellable else await fut
    except asyncio.CancelledError:
        if cancellable:
            job.cancelled.set()
        raise


def create_app(engine: ServeEngine, settings: ServerSettings) -> FastAPI:
    tok = copy.deepcopy(engine.tok)  # the worker's tokenizer is never shared across threads

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        # uvicorn ends here on SIGTERM once in-flight requests are done: drain, checkpoint
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="neuraldb", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings = engine, settings

    @app.exception_handler(APIError)
    async def _api_error(_r: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(JobError)
    async def _job_error(_r: Request, exc: JobError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        param = _param(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            return error_response(400, "the body is not valid JSON", "body")
        msg = first.get("msg", "invalid value")
        return error_response(400, f"{param}: {msg}" if param else msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_r: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")

    # ----- helpers ------------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_id:
            raise APIError(404, f"the model '{name}' does not exist (this server serves '{settings.model_id}')",
                           "model", "model_not_found")

    def prompt_ids(text: str, param: str, special: bool = True) -> list[int]:
        ids = tok(text, add_special_tokens=special)["input_ids"]
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param)
        if len(ids) > settings.max_prompt_tokens:
            raise APIError(400, f"{param}: {len(ids)} tokens, over the limit of {settings.max_prompt_tokens}", param)
        return ids

    def chat_ids(messages: list) -> list[int]:
        try:
            text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                           add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template that refuses these messages
            raise APIError(400, f"messages: the chat template refused them ({exc})", "messages") from exc
        return prompt_ids(text, "messages", special=False)

    context = int(getattr(engine.model.config, "max_position_embeddings", 0) or 1 << 30)

    def sampling(req: Any, ids: list[int]) -> Sampling:
        n = req.max_tokens if req.max_tokens is not None else settings.default_max_tokens
        if n > settings.max_tokens:
            raise APIError(400, f"max_tokens: {n} is over the limit of {settings.max_tokens}", "max_tokens")
        if len(ids) + n > context:
            raise APIError(400, f"max_tokens: the prompt's {len(ids)} tokens + {n} exceed the model's context of "
                                f"{context} tokens", "max_tokens")
        return Sampling(ids, n, req.temperature, req.top_p, tuple(req.stop), req.seed)

    def usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def count_tokens(prompt: int, completion: int) -> None:
        engine.metrics.inc("neuraldb_prompt_tokens_total", prompt, "prompt tokens processed")
        engine.metrics.inc("neuraldb_completion_tokens_total", completion, "tokens generated")

    def sse(obj: Any) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    def stream(samplings: list[Sampling], chunk: Callable[[int, str | None, str | None], dict],
               final: Callable[[int, int], dict | None]) -> StreamingResponse:
        """SSE: one job per choice; `chunk(index, text, finish)` builds each event."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def stepper(index: int, s: Sampling) -> Callable[[RowOut], None]:
            def on_step(row: RowOut) -> None:  # worker thread
                delta = streamable(row, s.stop)
                row.sent += len(delta)
                loop.call_soon_threadsafe(q.put_nowait, ("delta", index, delta, row.finish_reason))
            return on_step

        async def one(index: int, s: Sampling) -> RowOut:
            return await _run(engine, "generate", s, stepper(index, s))

        async def events() -> AsyncIterator[bytes]:
            tasks = [asyncio.ensure_future(one(i, s)) for i, s in enumerate(samplings)]
            left, done_rows = len(tasks), 0
            try:
                for i in range(len(samplings)):
                    first = chunk(i, None, None)
                    if first:
                        yield sse(first)
                while left:
                    get = asyncio.ensure_future(q.get())
                    waiting = [get] + [t for t in tasks if not t.done()]
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()
                        failed = [t for t in tasks if t.done() and t.exception() is not None]
                        if failed:
                            raise failed[0].exception()
                        continue
                    _, i, delta, finish = get.result()
                    if delta:
                        yield sse(chunk(i, delta, None))
                    if finish is not None:
                        yield sse(chunk(i, "", finish))
                        left -= 1
                outs = [await t for t in tasks]
                done_rows = sum(len(o.token_ids) for o in outs)
                count_tokens(sum(len(s.prompt_ids) for s in samplings), done_rows)
                tail = final(sum(len(s.prompt_ids) for s in samplings), done_rows)
                if tail:
                    yield sse(tail)
            except (JobError, APIError) as exc:
                yield sse(error_body(exc.status, exc.message, getattr(exc, "param", None)))
            finally:
                for t in tasks:
                    t.cancel()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ----- OpenAI-compatible inference ----------------------------------------------------------
    def model_card() -> dict[str, Any]:
        return {"id": settings.model_id, "object": "model", "created": int(engine.created), "owned_by": "neuraldb"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        samplings = [sampling(req, prompt_ids(p, "prompt" if isinstance(req.prompt, str) else f"prompt.{i}"))
                     for i, p in enumerate(prompts)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def body(choices: list[dict], use: dict | None = None) -> dict[str, Any]:
            out = {"id": rid, "object": "text_completion", "created": created, "model": settings.model_id,
                   "choices": choices}
            if use is not None:
                out["usage"] = use
            return out

        if req.stream:
            want_usage = bool(req.stream_options and req.stream_options.include_usage)
            return stream(
                samplings,
                lambda i, text, fin: None if text is None else body(
                    [{"index": i, "text": text, "logprobs": None, "finish_reason": fin}]),
                lambda p, c: body([], usage(p, c)) if want_usage else None)
        outs = await asyncio.gather(*(_run(engine, "generate", s) for s in samplings))
        p, c = sum(len(s.prompt_ids) for s in samplings), sum(len(o.token_ids) for o in outs)
        count_tokens(p, c)
        return body([{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                     for i, o in enumerate(outs)], usage(p, c))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Any:
        check_model(req.model)
        s = sampling(req, chat_ids(req.messages))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def body(choices: list[dict], obj: str, use: dict | None = None) -> dict[str, Any]:
            out = {"id": rid, "object": obj, "created": created, "model": settings.model_id, "choices": choices}
            if use is not None:
                out["usage"] = use
            return out

        if req.stream:
            want_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(i: int, text: str | None, fin: str | None) -> dict:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                return body([{"index": i, "delta": delta, "logprobs": None, "finish_reason": fin}],
                            "chat.completion.chunk")

            return stream([s], chunk, lambda p, c: body([], "chat.completion.chunk", usage(p, c))
                          if want_usage else None)
        o = await _run(engine, "generate", s)
        count_tokens(len(s.prompt_ids), len(o.token_ids))
        return body([{"index": 0, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
                      "finish_reason": o.finish_reason}], "chat.completion", usage(len(s.prompt_ids), len(o.token_ids)))

    # ----- the knowledge API --------------------------------------------------------------------
    def writable() -> None:
        if settings.read_only:
            raise APIError(403, "this server is read-only (started with --read-only)", None, "read_only")

    def parse_fact(rec: Any, where: str) -> Fact:
        if not isinstance(rec, dict):
            raise APIError(400, f"{where}: a fact must be a JSON object", where)
        try:
            return fact_from_json(rec, where)
        except FactError as exc:
            raise APIError(400, str(exc), where) from exc

    def fact_item(i: int, f: Fact) -> dict[str, Any]:
        return {"id": i, "object": "fact", "fact": f.to_json()}

    @app.post("/v1/facts")
    async def add_facts(payload: Any = Body(...)) -> dict[str, Any]:
        writable()
        recs = payload if isinstance(payload, list) else [payload]
        if not recs:
            raise APIError(400, "body: the list of facts is empty", "body")
        if len(recs) > settings.max_facts_per_request:
            raise APIError(400, f"body: {len(recs)} facts, over the limit of {settings.max_facts_per_request} "
                                f"per request", "body")
        facts = [parse_fact(r, f"body[{i}]" if isinstance(payload, list) else "body") for i, r in enumerate(recs)]
        change = await _run(engine, "write", ("add", facts), cancellable=False)
        return {"object": "list", "data": [fact_item(i, f) for i, f in zip(change.rows, change.facts)]}

    def stored(i: int) -> Fact:
        with engine.facts_lock:
            f = engine.facts.get(i)
        if f is None:
            raise APIError(404, f"no fact with id {i}", "id", "fact_not_found")
        return f

    @app.get("/v1/facts/{fact_id}")
    async def get_fact(fact_id: int) -> dict[str, Any]:
        return fact_item(fact_id, stored(fact_id))

    @app.get("/v1/facts")
    async def list_facts(subject: str | None = None, after: int | None = None,
                         limit: int = Query(100, ge=1)) -> dict[str, Any]:
        if limit > settings.max_page:
            raise APIError(400, f"limit: {limit} is over the page limit of {settings.max_page}", "limit")
        with engine.facts_lock:
            items = sorted(engine.facts.items()) if subject is None else sorted(
                (i, f) for i, f in engine.facts.items() if subject_key(f) == subject.strip())
        if after is not None:
            items = [(i, f) for i, f in items if i > after]
        page = items[:limit]
        return {"object": "list", "data": [fact_item(i, f) for i, f in page],
                "first_id": page[0][0] if page else None, "last_id": page[-1][0] if page else None,
                "has_more": len(items) > limit}

    @app.put("/v1/facts/{fact_id}")
    async def put_fact(fact_id: int, payload: Any = Body(...)) -> dict[str, Any]:
        writable()
        fact = parse_fact(payload, "body")
        stored(fact_id)
        change = await _run(engine, "write", ("update", (fact_id, fact)), cancellable=False)
        return fact_item(fact_id, change.facts[0])

    @app.delete("/v1/facts/{fact_id}")
    async def delete_fact(fact_id: int) -> dict[str, Any]:
        writable()
        stored(fact_id)
        await _run(engine, "write", ("remove", [fact_id]), cancellable=False)
        return {"id": fact_id, "object": "fact.deleted", "deleted": True}

    @app.post("/v1/explain")
    async def explain(req: ExplainRequest) -> dict[str, Any]:
        ids = prompt_ids(req.prompt, "prompt") if req.prompt is not None else chat_ids(req.messages)
        tokens = await _run(engine, "explain", ids)
        with engine.facts_lock:
            for t in tokens:
                f = engine.facts.get(t["fact_id"]) if t["opened"] else None
                t["fact"] = f.to_json() if f is not None else None
        return {"object": "explanation", "model": settings.model_id, "gamma": engine.db.config.gamma,
                "tokens": tokens}

    # ----- operations ---------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        body = {"status": "ok" if ok else "stopped", "facts": len(engine.facts), "model": settings.model_id,
                "read_only": settings.read_only, "wal_records": engine.wal.records, "replayed": engine.replayed}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    return Guard(app, settings, engine)  # type: ignore[return-value]
