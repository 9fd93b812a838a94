"""`kvflow proxy`: one OpenAI endpoint in front of prefill and decode instances.

For each /v1/completions or /v1/chat/completions request:
  1. the least-loaded prefill instance gets a copy with max_tokens=1, stream off, and
     kv_transfer_params={"do_remote_decode": true}: it computes the prompt's KV, keeps the
     blocks, and answers with kv_transfer_params saying where to pull them from;
  2. the least-loaded decode instance gets the client's request unchanged plus those
     kv_transfer_params; its response (JSON or SSE stream) is passed back byte for byte.
Least loaded = fewest requests this proxy has in flight there (ties: round robin).

A prefill instance that cannot be reached is skipped for the next one; with none left, the
request goes to decode without kv_transfer_params (it prefills locally). A prefill instance's
HTTP error (400 for a bad request, ...) is returned to the client as is. What happens when a
transfer fails after the prefill answered is the decode instance's failure_policy.
"""

import argparse
import itertools
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger("kvflow")

_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive",
                "accept-encoding"}


@dataclass
class Instance:
    url: str
    in_flight: int = 0


class Pool:
    def __init__(self, urls: list[str]):
        if not urls:
            raise ValueError("at least one URL is needed")
        self.instances = [Instance(u.rstrip("/")) for u in urls]
        self._rr = itertools.count()

    def order(self) -> list[Instance]:
        """Instances by load, least first; equal loads rotate so they share the traffic."""
        k = next(self._rr) % len(self.instances)
        rotated = self.instances[k:] + self.instances[:k]
        return sorted(rotated, key=lambda i: i.in_flight)   # stable: rotation breaks ties


def _urls(text: str) -> list[str]:
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise argparse.ArgumentTypeError("expected URL[,URL...]")
    return urls


def build_proxy_app(prefill: list[str], decode: list[str], timeout: float = 600.0):
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    prefills, decodes = Pool(prefill), Pool(decode)
    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=5.0))

    @asynccontextmanager
    async def lifespan(_):
        yield
        await client.aclose()

    app = FastAPI(title="kvflow disaggregation proxy", lifespan=lifespan)
    app.state.prefill, app.state.decode = prefills, decodes

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "ProxyError",
                                       "param": None, "code": status}}, status_code=status)

    async def run_prefill(path: str, body: dict, headers: dict):
        """(kv_transfer_params or None, error response or None)."""
        pbody = dict(body, max_tokens=1, stream=False,
                     kv_transfer_params={"do_remote_decode": True})
        # Only the prompt's KV matters: nothing may stop, lengthen or fan out the one token.
        for key in ("stream_options", "stop", "max_completion_tokens", "n", "best_of",
                    "min_tokens"):
            pbody.pop(key, None)
        for inst in prefills.order():
            inst.in_flight += 1
            try:
                r = await client.post(inst.url + path, json=pbody, headers=headers)
            except httpx.TransportError as e:
                logger.warning("proxy: prefill instance %s unreachable (%s); trying the next",
                               inst.url, e)
                continue
            finally:
                inst.in_flight -= 1
            if r.status_code != 200:
                return None, Response(r.content, status_code=r.status_code,
                                      media_type=r.headers.get("content-type"))
            return r.json().get("kv_transfer_params"), None
        logger.warning("proxy: no prefill instance reachable; decode prefills locally")
        return None, None

    async def forward(path: str, raw: Request):
        try:
            body = await raw.json()
        except ValueError:
            return error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        headers = {k: v for k, v in raw.headers.items() if k.lower() not in _HOP_HEADERS}
        kv_params = None
        if body.get("n", 1) in (None, 1) and "kv_transfer_params" not in body:
            kv_params, err = await run_prefill(path, body, headers)
            if err is not None:
                return err
        dbody = dict(body, kv_transfer_params=kv_params) if kv_params else body
        inst = decodes.order()[0]
        inst.in_flight += 1
        try:
            req = client.build_request("POST", inst.url + path, json=dbody, headers=headers)
            r = await client.send(req, stream=True)
        except httpx.TransportError as e:
            inst.in_flight -= 1
            return error(502, f"decode instance {inst.url} unreachable: {e}")
        if not body.get("stream"):
            try:
                content = await r.aread()
            finally:
                await r.aclose()
                inst.in_flight -= 1
            return Response(content, status_code=r.status_code,
                            media_type=r.headers.get("content-type"))

        async def relay():
            try:
                async for chunk in r.aiter_raw():
                    yield chunk
            finally:
                await r.aclose()
                inst.in_flight -= 1

        return StreamingResponse(relay(), status_code=r.status_code,
                                 media_type=r.headers.get("content-type"))

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await forward("/v1/completions", raw)

    @app.post("/v1/chat/completions")
    async def chat(raw: Request):
        return await forward("/v1/chat/completions", raw)

    @app.get("/v1/models")
    async def models(raw: Request):
        headers = {k: v for k, v in raw.headers.items() if k.lower() not in _HOP_HEADERS}
        for inst in decodes.order():
            try:
                r = await client.get(inst.url + "/v1/models", headers=headers)
            except httpx.TransportError:
                continue
            return Response(r.content, status_code=r.status_code,
                            media_type=r.headers.get("content-type"))
        return error(503, "no decode instance reachable")

    @app.get("/health")
    async def health():
        status = {}
        for role, pool in (("prefill", prefills), ("decode", decodes)):
            for inst in pool.instances:
                try:
                    ok = (await client.get(inst.url + "/health", timeout=5.0)).status_code == 200
                except httpx.TransportError:
                    ok = False
                status[inst.url] = {"role": role, "healthy": ok, "in_flight": inst.in_flight}
        healthy = all(any(status[i.url]["healthy"] for i in p.instances)
                      for p in (prefills, decodes))
        return JSONResponse(status, status_code=200 if healthy else 503)

    return app


def add_proxy_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("proxy", help="disaggregated prefill/decode proxy",
                              description="One OpenAI endpoint in front of prefill and decode "
                                          "instances (docs/disaggregation.md).")
    p.add_argument("--prefill", type=_urls, required=True, help="prefill instance URL[,URL...]")
    p.add_argument("--decode", type=_urls, required=True, help="decode instance URL[,URL...]")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--timeout", type=float, default=600.0, help="per upstream request, seconds")
    p.set_defaults(func=_cmd_proxy)
    return p


def _cmd_proxy(args) -> int:
    import uvicorn
    app = build_proxy_app(args.prefill, args.decode, args.timeout)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kvflow proxy")
    sub = parser.add_subparsers(dest="command", required=True)
    add_proxy_parser(sub)
    args = parser.parse_args(["proxy", *(argv or [])])
    return _cmd_proxy(args)
