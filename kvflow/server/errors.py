"""OpenAI error bodies: {"error": {"message", "type", "param", "code"}}.

Every failure the server reports goes through `APIError` (or is converted to one here), so the
official `openai` client raises the matching exception class (BadRequestError for 400,
NotFoundError for 404, ...) with a message that names the bad field.
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Any, Optional, Union

from fastapi.responses import JSONResponse

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
          404: "NotFoundError", 405: "MethodNotAllowedError", 413: "RequestTooLargeError",
          422: "UnprocessableEntityError", 429: "RateLimitError", 500: "InternalServerError",
          503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Union[str, int, None] = None, type: Optional[str] = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = status if code is None else code
        self.type = type or _TYPES.get(self.status) or HTTPStatus(self.status).phrase.replace(" ", "")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self, headers: Optional[dict] = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param)


def from_value_error(e: ValueError) -> APIError:
    """SamplingParamError carries the field in `.param`; other ValueErrors from config-style
    validation start with "field: ..."."""
    param = getattr(e, "param", None)
    return bad_request(str(e), param)


_TYPE_TAGS = {"str", "int", "float", "bool", "bytes", "none", "dict", "list"}


def _is_type_tag(part: str) -> bool:
    """Pydantic puts the union member it tried into `loc` ('str', 'list[str]', 'StreamOptions',
    'function-after[...]'): not a field name. OpenAI field names are lower_snake_case."""
    return part in _TYPE_TAGS or "[" in part or "(" in part or part[:1].isupper()


def format_loc(loc: tuple) -> Optional[str]:
    """('body', 'messages', 0, 'role') -> 'messages[0].role' (the body prefix is implicit)."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    parts = [p for p in parts if not (isinstance(p, str) and _is_type_tag(p))]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def from_validation_errors(errors: list[dict]) -> APIError:
    """Pydantic errors as one 400. `param` is the most specific location of the first failing
    field: for `stop: [1]` pydantic reports both union members ('stop' is not a string,
    'stop[0]' is not a string) and the client is best served by 'stop[0]'."""
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = ctx.get("error") or first.get("msg", "")
        return bad_request(f"invalid JSON body: {detail}")
    items = []
    for err in errors:
        msg = err.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        items.append((format_loc(tuple(err.get("loc", ()))), msg))
    params = [p for p, _ in items if p]

    def refined(p: str) -> bool:  # a deeper location of the same field also failed
        return any(q != p and (q.startswith(p + ".") or q.startswith(p + "[")) for q in params)

    kept = [(p, m) for p, m in items if not (p and refined(p))]
    param = items[0][0]
    if param is not None:
        param = next((p for p, _ in kept if p == param or p.startswith(param + ".")
                      or p.startswith(param + "[")), param)
    msgs = list(dict.fromkeys(f"{p}: {m}" if p else m for p, m in kept))
    more = f" (and {len(msgs) - 5} more errors)" if len(msgs) > 5 else ""
    return bad_request("; ".join(msgs[:5]) + more, param)
