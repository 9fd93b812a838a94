"""The OpenAI-compatible HTTP server: `build_app(async_engine, args)` and `run_server(args)`.

Layers, outermost first: CORS -> auth + body-size limit (one pure ASGI middleware, so streaming
and disconnect detection are untouched) -> FastAPI routes. Every error leaves as an OpenAI error
body (errors.py). The engine runs in AsyncLLM's thread; handlers only await it.

Shutdown (SIGTERM / SIGINT): uvicorn stops accepting connections; new requests on open
connections get 503; in-flight requests get `--shutdown-timeout` seconds to finish and are then
aborted with a clear error (503 / an in-band SSE error + [DONE]); the process exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import hmac
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Optional

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import kvflow
from kvflow.engine.async_engine import (SHUTDOWN_MESSAGE, AsyncLLM, EngineDeadError,
                                        EngineShutdownError)
from kvflow.metrics.prometheus import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kvflow.metrics.prometheus import PrometheusStatLogger
from kvflow.server import cli_args
from kvflow.server.errors import APIError, bad_request, from_validation_errors
from kvflow.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    ModelCard, ModelList, TokenizeRequest)
from kvflow.server.serving_base import ClientDisconnected, OpenAIServing
from kvflow.server.serving_chat import ChatServing
from kvflow.server.serving_completions import CompletionServing

logger = logging.getLogger("kvflow")

# Routes that need the API key when one is set (vLLM protects /v1/*); health, version and
# metrics stay open for load balancers and scrapers.
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/sleep", "/wake_up", "/is_sleeping")


# ---------------------------------------------------------------------------------- middleware
class GuardMiddleware:
    """API-key check, then the request body is read (bounded) before the app sees it.

    Reading the body here, rather than counting inside the app, lets an oversized body be
    answered with 413 no matter how the app parses it; the buffered body is replayed to the app,
    and later receive() calls pass through so disconnects are still seen."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["method"] != "OPTIONS" and \
                scope["path"].startswith(_PROTECTED_PREFIXES) and not self._authorized(scope):
            return await _send_error(send, APIError(401, "invalid or missing API key: send "
                                                    "'Authorization: Bearer <key>'",
                                                    code="invalid_api_key"),
                                     {"www-authenticate": "Bearer"})
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"request body too large: the limit is {self.max_body_bytes} "
                                "bytes", code="request_too_large")
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_error(send, too_big, {"connection": "close"})
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its request
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await _send_error(send, too_big, {"connection": "close"})
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode())


def _header(scope, name: bytes) -> Optional[str]:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def _send_error(send, err: APIError, headers: Optional[dict] = None) -> None:
    resp = err.response(headers)
    await send({"type": "http.response.start", "status": resp.status_code,
                "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body, "more_body": False})


# ---------------------------------------------------------------------------------- app
def served_model_names(args: argparse.Namespace) -> list[str]:
    if getattr(args, "served_model_name", None):
        return list(args.served_model_name)
    if getattr(args, "model", None):
        return [args.model]
    from kvflow.models.gguf import DEFAULT_MODEL_FILE
    return [os.path.splitext(DEFAULT_MODEL_FILE)[0]]


def build_app(async_engine: AsyncLLM, args: argparse.Namespace) -> FastAPI:
    """An app serving `async_engine`. The caller owns the engine (and shuts it down); several
    apps may share one engine, each with its own metrics registry."""
    names = served_model_names(args)
    engine_cfg = async_engine.engine.config
    metrics = PrometheusStatLogger(names[0], async_engine.engine_stats, cache_info={
        "block_size": engine_cfg.cache.block_size,
        "num_gpu_blocks": async_engine.engine.num_total_blocks(),
        "enable_prefix_caching": engine_cfg.cache.enable_prefix_caching})
    async_engine.stat_loggers.append(metrics)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvflow-tokenizer")
    common = dict(tokenizer_pool=pool, max_queued_requests=getattr(args, "max_queued_requests", None))
    base = OpenAIServing(async_engine, names, **common)
    completions = CompletionServing(async_engine, names, **common)
    chat = ChatServing(async_engine, names, **common)
    stall_s = float(getattr(args, "health_stall_timeout", 60.0))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        # The engine may outlive this app (tests, several apps on one engine): detach from it.
        with contextlib.suppress(ValueError):
            async_engine.stat_loggers.remove(metrics)
        pool.shutdown(wait=False)

    app = FastAPI(title="kvflow OpenAI-compatible server", version=kvflow.__version__,
                  lifespan=lifespan)
    app.state.engine = async_engine
    app.state.metrics = metrics

    # ---------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return from_validation_errors(list(e.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail)).response(getattr(e, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(_: Request, e: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        logger.error("unhandled error in a request", exc_info=e)
        return APIError(500, f"internal error: {type(e).__name__}: {e}").response()

    # ---------------------------------------------------------------- operational
    @app.get("/health")
    async def health():
        if not async_engine.is_healthy():
            err = async_engine.dead_error
            return APIError(503, f"the engine is dead: {err!r}" if err else
                            "the engine is stopped").response()
        if async_engine.is_stalled(stall_s):
            return APIError(503, f"the engine made no progress for more than {stall_s:g} s "
                                 "with requests pending").response()
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": kvflow.__version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # ---------------------------------------------------------------- models
    def card(name: str) -> ModelCard:
        m = engine_cfg.model
        return ModelCard(id=name, root=m.source or m.model, max_model_len=async_engine.max_model_len)

    @app.get("/v1/models")
    async def list_models():
        return ModelList(data=[card(n) for n in names])

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return card(base.resolve_model(model_id))

    # ---------------------------------------------------------------- generation
    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw: Request):
        return await completions.create(body, raw)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request):
        return await chat.create(body, raw)

    # ---------------------------------------------------------------- tokenizer
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        base.resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("exactly one of 'prompt' and 'messages' is required", "prompt")
        if body.messages is not None:
            if not body.messages:
                raise bad_request("messages: must not be empty", "messages")
            _, ids = await base.render_chat(
                [m.to_template() for m in body.messages],
                add_generation_prompt=body.add_generation_prompt is not False,
                continue_final_message=bool(body.continue_final_message),
                chat_template_kwargs=body.chat_template_kwargs)
        else:
            ids = await base.tokenize(body.prompt, body.add_special_tokens is not False, "prompt")
        out = {"count": len(ids), "max_model_len": async_engine.max_model_len, "tokens": ids,
               "token_strs": None}
        if body.return_token_strs:
            tok = base.tokenizer
            out["token_strs"] = await base.in_tokenizer_thread(tok.convert_ids_to_tokens, ids)
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        base.resolve_model(body.model)
        vocab = engine_cfg.model.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"tokens: token id {bad} is outside the vocabulary [0, {vocab})",
                              "tokens")
        return {"prompt": await base.detokenize(body.tokens)}

    # ---------------------------------------------------------------- sleep mode
    if engine_cfg.cache.enable_sleep_mode:  # only with --enable-sleep-mode (as vLLM)
        _add_sleep_routes(app, async_engine)

    # ---------------------------------------------------------------- middleware
    api_key = cli_args.api_key(args)
    app.add_middleware(GuardMiddleware, api_key=api_key,
                       max_body_bytes=int(getattr(args, "max_request_body_bytes", 16 * 2**20)))
    # Added last = outermost: preflight requests are answered before the key check.
    app.add_middleware(CORSMiddleware, allow_origins=list(getattr(args, "allowed_origins", ["*"])),
                       allow_credentials=bool(getattr(args, "allow_credentials", False)),
                       allow_methods=["*"], allow_headers=["*"])
    return app


def _add_sleep_routes(app: FastAPI, async_engine: AsyncLLM) -> None:
    """POST /sleep?level=1|2[&in_flight=abort|finish], POST /wake_up[?tags=weights&tags=kv_cache]
    (comma-separated works too), GET /is_sleeping. Bad arguments answer 400, a call that does
    not fit the current state (already asleep, ...) 409."""
    async def call(coro):
        try:
            return await coro
        except (EngineShutdownError, EngineDeadError) as e:
            raise APIError(503, str(e)) from None
        except ValueError as e:
            raise bad_request(str(e)) from None
        except RuntimeError as e:
            raise APIError(409, str(e)) from None

    @app.post("/sleep")
    async def sleep(level: int = 1, in_flight: str = "abort"):
        freed = await call(async_engine.sleep(level, in_flight))
        return {"is_sleeping": True, "level": level, "freed_bytes": int(freed)}

    @app.post("/wake_up")
    async def wake_up(tags: Optional[list[str]] = Query(None)):
        flat = None if tags is None else [t.strip() for v in tags for t in v.split(",") if t.strip()]
        await call(async_engine.wake_up(flat))
        return {"is_sleeping": await async_engine.is_sleeping()}

    @app.get("/is_sleeping")
    async def is_sleeping():
        return {"is_sleeping": await async_engine.is_sleeping()}


# ---------------------------------------------------------------------------------- run
def _configure_logging() -> None:
    log = logging.getLogger("kvflow")
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kvflow] %(message)s"))
        log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def _drain(engine: AsyncLLM, timeout: float) -> None:
    """Runs on its own thread once a shutdown signal arrives."""
    engine.stop_accepting()
    n = engine.num_in_flight()
    if n:
        logger.info("shutting down: waiting up to %g s for %d in-flight requests", timeout, n)
    if not engine.wait_idle(timeout):
        n = engine.abort_all(SHUTDOWN_MESSAGE)
        logger.warning("shutting down: aborted %d requests still running after %g s", n, timeout)


def run_server(args: argparse.Namespace) -> None:
    """Load the engine, serve until SIGTERM/SIGINT, drain, return (exit status 0)."""
    _configure_logging()
    engine = AsyncLLM.from_engine_args(
        args.model, log_interval=args.log_stats_interval or None,
        log_requests=not args.disable_log_requests, **cli_args.engine_kwargs(args))
    try:
        app = build_app(engine, args)
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log, timeout_keep_alive=5,
            # A backstop only: our drain aborts requests at shutdown_timeout.
            timeout_graceful_shutdown=int(args.shutdown_timeout) + 5)
        server = _GracefulServer(config, on_shutdown_signal=lambda: threading.Thread(
            target=_drain, args=(engine, args.shutdown_timeout), name="kvflow-drain",
            daemon=True).start())
        server.run()
    finally:
        engine.shutdown(graceful=False, timeout=5.0)
    logger.info("server stopped")


class _GracefulServer(uvicorn.Server):
    """uvicorn.Server that starts our drain on the first SIGTERM/SIGINT and does not re-raise
    the signal after a clean shutdown (uvicorn does, which would make the exit status -15
    instead of 0)."""

    def __init__(self, config: uvicorn.Config, on_shutdown_signal):
        super().__init__(config)
        self._on_shutdown_signal = on_shutdown_signal
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if not self._draining:
            self._draining = True
            self._on_shutdown_signal()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        else:
            self.should_exit = True


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m kvflow.server.api_server [MODEL] ...` (same options as `kvflow serve`)."""
    run_server(cli_args.parse_serve_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
