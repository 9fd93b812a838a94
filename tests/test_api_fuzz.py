"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (the health watchdog is
tested in test_server_errors.py::test_stalled_engine_is_unhealthy).

Bodies are built from the request schemas' field names with values of every JSON type (wrong
types, out-of-range numbers, nested junk), plus raw non-JSON bodies. Whatever arrives, the server
must answer below 500 and stay healthy with no KV block leaked.
"""
from __future__ import annotations

import httpx
import pytest

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_server import MODEL, chat_model_dir, live_server, wait_engine_clean  # noqa: E402,F401

pytestmark = pytest.mark.timeout(240)

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 40), 2 ** 40),
                     st.floats(allow_nan=False, allow_infinity=False, width=32),
                     st.text(max_size=20))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                     max_leaves=6)
# Values that keep a valid request cheap on CPU (the fuzz is about validation, not load).
_CAPS = {"max_tokens": 3, "max_completion_tokens": 3, "n": 2, "best_of": 2, "logprobs": 3,
         "top_logprobs": 3, "min_tokens": 2}


@pytest.fixture(scope="module")
def server(chat_model_dir):
    with live_server(chat_model_dir) as srv:
        schema = httpx.get(srv.url + "/openapi.json", timeout=10).json()
        srv.fields = {path: _request_fields(schema, path)
                      for path in ("/v1/completions", "/v1/chat/completions")}
        yield srv


def _request_fields(schema: dict, path: str) -> list[str]:
    body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    ref = body.get("$ref") or next(s["$ref"] for s in body.get("anyOf", []) if "$ref" in s)
    props = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    return sorted(props)


def _cap(body: dict) -> dict:
    for k, cap in _CAPS.items():
        if isinstance(body.get(k), int) and not isinstance(body[k], bool) and body[k] > cap:
            body[k] = cap
    return body


@st.composite
def _bodies(draw, fields: list[str]):
    body = {"model": MODEL}
    for name in draw(st.lists(st.sampled_from(fields), max_size=6, unique=True)):
        body[name] = draw(_json)
    if draw(st.booleans()):  # often a well-formed core so deeper validation is reached
        body.setdefault("prompt", "hello")
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return _cap(body)


def test_openapi_schema_lists_the_endpoints(server):
    assert server.fields["/v1/completions"] and "messages" in server.fields["/v1/chat/completions"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzzed_bodies_never_5xx(server, path):
    client = httpx.Client(base_url=server.url, timeout=60)

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(body=_bodies(server.fields[path]))
    def check(body):
        r = client.post(path, json=body)
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert "error" in r.json()

    check()
    for raw in (b"", b"{", b"[1,2]", b"\xff\xfe", b'{"model": ' + b"1" * 5000 + b"}"):
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (raw[:20], r.status_code)
    assert client.get("/health").status_code == 200
    wait_engine_clean(server.engine)
