"""`glm2-serve`: a model behind OpenAI's HTTP API (FastAPI and uvicorn; server-sent events by sse-starlette).

The engine (`engine.py`) decodes every request in flight in one batched step; this module turns HTTP requests into
its jobs and their tokens back into OpenAI's responses and chunks (`openai_api.py`). Every refusal is OpenAI's
error object with its status, and the server goes on after it."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import click
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from glm2_core.errors import UserError
from glm2_core.options import AT_LEAST_ONE, ExistingPath, Tool

from .api import open_model
from .cli import _load, load_options
from .engine import Engine, Job, QueueFull
from .openai_api import ChatRequest, CompletionRequest, Conversation, Transcript, error_body
from .sampling import SamplingConfig

MAX_BODY = 4 * 2**20  # bytes of a request body; a larger one is refused before it is read whole
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request looks for its client gone
log = logging.getLogger("glm2.serve")


@dataclass
class Counters:
    """What /metrics shows, counted per finished request."""
    requests: dict = field(default_factory=dict)  # HTTP status → responses
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float = 0.0
    first_tokens: int = 0
    request_s: float = 0.0

    def text(self, engine: Engine) -> str:
        lines = [f'glm2_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        stats = engine.stats
        lines += [f"glm2_prompt_tokens_total {self.prompt_tokens}",
                  f"glm2_completion_tokens_total {self.completion_tokens}",
                  f"glm2_time_to_first_token_seconds_sum {self.first_token_s:.6f}",
                  f"glm2_time_to_first_token_seconds_count {self.first_tokens}",
                  f"glm2_request_seconds_sum {self.request_s:.6f}",
                  f"glm2_slots_busy {engine.busy}", f"glm2_slots_total {engine.slots}",
                  f"glm2_queue_waiting {engine.waiting}",
                  f"glm2_engine_steps_total {stats.steps}", f"glm2_engine_step_rows_total {stats.step_rows}",
                  f"glm2_engine_step_seconds_total {stats.step_s:.6f}",
                  f"glm2_engine_busy_seconds_total {stats.busy_s:.6f}"]
        return "\n".join(lines) + "\n"


@dataclass
class Served:
    """The model a server serves: its name, tokenizer, engine and counters."""
    name: str
    tok: object
    engine: Engine
    created: int = field(default_factory=lambda: int(time.time()))
    counters: Counters = field(default_factory=Counters)


class Run:
    """One request's job and its timings: tokens arrive on an asyncio queue from the engine's thread."""

    def __init__(self, served: Served, kind: str, ids: list[int], req, transcript: Transcript):
        self.served, self.kind, self.ids, self.transcript = served, kind, ids, transcript
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.start, self.first, self.made, self.finish, self.gone = time.perf_counter(), None, 0, None, False
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        new = req.new_tokens or served.engine.context - len(ids)  # the context's room (Engine.submit bounds it)
        self.job = Job(ids, new, req.sampling(), frozenset(served.tok.stop_ids), self._emit)

    def _emit(self, token, why) -> None:
        """From the engine's thread: the event onto this request's queue (dropped once the server's loop ended)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, (token, why))

    async def deltas(self, request: Request | None = None):
        """Yields each piece of text as it may be shown; `finish` is set when it ends. With `request`, a client
        gone before the end cancels the job (`gone`): a streaming response learns it from sse-starlette."""
        while True:
            try:
                token, why = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S if request else None)
            except TimeoutError:
                if await request.is_disconnected():
                    self.job.cancel()
                    self.gone = True
                    return
                continue
            if token is None:
                self.finish = why
                return
            self.made += 1
            self.first = self.first or time.perf_counter()
            piece = self.transcript.add(token)
            if self.transcript.stopped:
                self.job.cancel()
            if piece:
                yield piece

    def finish_reason(self, tool_calls) -> str:
        if tool_calls:
            return "tool_calls"
        return "length" if self.finish == "length" and not self.transcript.stopped else "stop"

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.ids), "completion_tokens": self.made,
                "total_tokens": len(self.ids) + self.made}

    def record(self, status: int) -> None:
        """The request's log line and counters."""
        c, elapsed = self.served.counters, time.perf_counter() - self.start
        c.prompt_tokens += len(self.ids)
        c.completion_tokens += self.made
        c.request_s += elapsed
        ttft = (self.first - self.start) if self.first else None
        if ttft is not None:
            c.first_token_s += ttft
            c.first_tokens += 1
        rate = self.made / (elapsed - ttft) if ttft is not None and self.made > 1 and elapsed > ttft else 0.0
        log.info("%s %s %d in %d out %d ttft %s %.2f tokens/s %s", self.id, self.kind, status, len(self.ids),
                 self.made, f"{ttft:.3f}s" if ttft is not None else "-", rate, self.finish or "")


def _error(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None,
           headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status, headers=headers)


def make_app(served: Served, shutdown_timeout: float = 30.0) -> FastAPI:
    """The ASGI app; the engine starts and stops with it."""

    @asynccontextmanager
    async def lifespan(app):
        served.engine.start()
        yield
        await asyncio.to_thread(served.engine.stop, shutdown_timeout)

    app = FastAPI(title="glm2-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, counters=served.counters)
    _errors(app)

    @app.get("/health")
    async def health():
        e = served.engine
        return {"status": "ok", "model": served.name, "slots": e.slots, "busy": e.busy, "waiting": e.waiting}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(served.counters.text(served.engine))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != served.name:
            return _unknown_model(name)
        return _model_card(served)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        if req.model != served.name:
            return _unknown_model(req.model)
        conversation = await asyncio.to_thread(Conversation, served.tok, req)  # (a long prompt: not on the loop)
        run = Run(served, "chat", conversation.ids, req, Transcript(served.tok, req.stop, conversation))
        return await _serve(run, req.stream, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if req.model != served.name:
            return _unknown_model(req.model)
        ids = await asyncio.to_thread(served.tok.encode, req.text)
        run = Run(served, "completion", ids, req, Transcript(served.tok, req.stop))
        return await _serve(run, req.stream, request)

    return app


def _model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "glm2-toolkit"}


def _unknown_model(name: str) -> JSONResponse:
    return _error(404, f"The model {name!r} does not exist", param="model", code="model_not_found")


def _errors(app: FastAPI) -> None:
    """Every refusal in OpenAI's error shape."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "extra_forbidden":
            return _error(400, f"Unrecognized request argument supplied: {where}", param=where)
        if first.get("type") == "json_invalid":
            return _error(400, "The request body is not valid JSON", code="json_invalid")
        return _error(400, f"{where or 'body'}: {first.get('msg')}", param=where or None)

    @app.exception_handler(UserError)
    async def refused(request, exc: UserError):
        code = "context_length_exceeded" if "context" in str(exc) else None
        return _error(400, str(exc), code=code)

    @app.exception_handler(Exception)
    async def failed(request, exc: Exception):  # a bug of ours: said in the protocol's shape, and logged
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"{type(exc).__name__}: {exc}", kind="server_error")

    @app.exception_handler(HTTPException)
    async def http(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), kind="invalid_request_error")


async def _serve(run: Run, stream: bool, request: Request):
    try:
        run.served.engine.submit(run.job)
    except QueueFull as exc:
        run.record(429)
        return _error(429, f"The server is busy ({exc}); retry later", kind="rate_limit_exceeded",
                      headers={"Retry-After": "1"})
    if stream:
        return EventSourceResponse(_chunks(run), ping=15, sep="\n")
    return await _whole(run, request)


async def _whole(run: Run, request: Request):
    """The reply in one response; a client gone before it ends cancels the job."""
    try:
        async for _ in run.deltas(request):
            pass
    except asyncio.CancelledError:
        run.job.cancel()
        raise
    if run.gone:
        run.record(499)
        return _error(499, "the client closed the request")
    if run.finish.startswith("error"):
        run.record(500)
        return _error(500, run.finish, kind="server_error")
    content, calls = run.transcript.reply()
    run.record(200)
    return _response(run, content, calls)


def _response(run: Run, content, calls) -> dict:
    if run.kind == "completion":
        choice = {"index": 0, "text": content, "finish_reason": run.finish_reason(None), "logprobs": None}
    else:
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": run.finish_reason(calls), "logprobs": None}
    return {**_envelope(run), "choices": [choice], "usage": run.usage()}


async def _chunks(run: Run):
    """Server-sent events in OpenAI's chunk shape, ending in [DONE]; a client gone cancels the job."""
    status = 200
    try:
        if run.kind == "chat":
            yield _chunk(run, {"role": "assistant", "content": ""})
        async for piece in run.deltas():
            yield _chunk(run, {"content": piece} if run.kind == "chat" else piece)
        if run.finish.startswith("error"):
            status = 500
            yield json.dumps(error_body(run.finish, "server_error"))
            return
        content, calls = run.transcript.reply()
        rest = run.transcript.rest(content)
        if calls:
            yield _chunk(run, {"tool_calls": [{"index": 0, **c} for c in calls]})
        elif rest:
            yield _chunk(run, {"content": rest} if run.kind == "chat" else rest)
        yield _chunk(run, {} if run.kind == "chat" else "", run.finish_reason(calls))
        if run.include_usage:
            yield json.dumps({**_envelope(run, chunk=True), "choices": [], "usage": run.usage()})
        yield "[DONE]"
    except asyncio.CancelledError:
        status = 499
        run.job.cancel()
        raise
    finally:
        run.record(status)


def _envelope(run: Run, chunk: bool = False) -> dict:
    """What every response and streamed chunk of `run` begins with: its id, object, time and model."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if run.kind == "chat" else "text_completion"
    return {"id": run.id, "object": kind, "created": int(time.time()), "model": run.served.name}


def _chunk(run: Run, delta, finish: str | None = None) -> str:
    if run.kind == "chat":
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
    return json.dumps({**_envelope(run, chunk=True), "choices": [choice]}, ensure_ascii=False)


class Gate:
    """Before the app: refuses a request body over MAX_BODY (413, OpenAI's error shape) as soon as it is known (its
    Content-Length, or the bytes received); after it: counts every response by status and logs the refusals (a
    request that ran logs its own line, `Run.record`)."""

    def __init__(self, app, counters: Counters):
        self.app, self.counters = app, counters

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def sent(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
                requests = self.counters.requests
                requests[message["status"]] = requests.get(message["status"], 0) + 1
            await send(message)

        length = dict(scope.get("headers", ())).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY:
            await _error(413, f"the request body passes {MAX_BODY} bytes (or its Content-Length is not a number)")(
                scope, receive, sent)
        else:
            await self.app(scope, _counted(receive), sent)
        if status and status[0] >= 400 and status[0] not in (429, 499, 500):
            log.info("%s %s %d", scope["method"], scope["path"], status[0])


def _counted(receive):
    seen = 0

    async def counted():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > MAX_BODY:
            raise HTTPException(413, f"the request body passes {MAX_BODY} bytes")
        return message

    return counted


def warm_up(served: Served) -> None:
    """One short request through the engine before the port opens: the decoding step compiles, and a mapped
    file's checksums are checked (a corrupt weight stops the server here, in one line)."""
    ended = threading.Event()
    why = []
    served.engine.submit(Job(served.tok.encode("hello"), 2, SamplingConfig(greedy=True), frozenset(),
                             lambda token, end: end and (why.append(end), ended.set())))
    served.engine.start()
    ended.wait()
    if why[0].startswith("error"):
        raise UserError(f"the model failed its first request: {why[0].removeprefix('error: ')}")


@click.command("glm2-serve", cls=Tool)
@click.argument("model_dir", type=ExistingPath())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free one, printed when ready).")
@click.option("--name", default=None, show_default="the folder's name", help="The model's id in the API.")
@click.option("--slots", type=AT_LEAST_ONE, default=4, show_default=True,
              help="Requests decoded together (each a row of the batched KV cache).")
@click.option("--context", type=AT_LEAST_ONE, default=None, show_default="the model's, at most 4096",
              help="Prompt + new tokens of one request at most (each slot's cache length).")
@click.option("--queue", type=AT_LEAST_ONE, default=64, show_default=True,
              help="Requests that may wait for a slot; more are refused with 429 and Retry-After.")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds SIGTERM waits for requests in flight before cancelling them.")
@load_options
def main(model_dir, host, port, name, slots, context, queue, shutdown_timeout, **loading):
    """Serve the model in MODEL_DIR with OpenAI's API: /v1/chat/completions (streaming, tools for ChatGLM3 and
    GLM-4), /v1/completions, /v1/models, /health and /metrics."""
    sock = _listen(host, port)  # a port in use, or a context that cannot be, is refused before minutes of loading
    with open_model(model_dir, release=loading["release"]) as folder:
        context = context or min(folder.config.seq_length, 4096)
        half = loading["compute_dtype"] == "float16" and not loading["quantize"]
        Engine.check(folder.config, slots, context, 2 if half else 4)
    model, tok, load_s = _load(model_dir, **loading)
    served = Served(name or model_dir.resolve().name, tok, Engine(model, slots, context, queue))
    warm_up(served)
    logging.basicConfig(format="glm2-serve: %(message)s", level=logging.INFO)
    bound = sock.getsockname()
    click.echo(f"glm2-serve: {served.name} ready at http://{bound[0]}:{bound[1]} ({slots} slots × {context} tokens, "
               f"loaded in {load_s:.1f} s)", err=True)
    config = uvicorn.Config(make_app(served, shutdown_timeout), log_level="warning",
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    _Server(config).run(sockets=[sock])


class _Server(uvicorn.Server):
    def handle_exit(self, sig, frame):
        """SIGTERM or Ctrl-C: the graceful shutdown, exit status 0; the signal is not raised again after it, as
        uvicorn would (the tool's own handler would then call the clean end an interruption)."""
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def _listen(host: str, port: int) -> socket.socket:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)  # connections made once "ready" is said wait for uvicorn to take them
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
