"""JSON over HTTP to model servers (vLLM, llama.cpp server, OpenAI-compatible endpoints), errors mapped.

The standard library's ``urllib`` is the client (no third-party HTTP client is a project dependency). Every
failure becomes a :mod:`services.common.errors` exception, so the shared interceptor gives it a status code:

=========================================================  =====================
the endpoint does not answer within the stage's timeout     UNAVAILABLE (retry)
the caller's deadline, shorter, runs out first              DEADLINE_EXCEEDED
connection refused, DNS failure, HTTP 5xx                   UNAVAILABLE
HTTP 429                                                    RESOURCE_EXHAUSTED
other HTTP 4xx (bad key, unknown model, bad field)          INTERNAL (:class:`HttpRejected`)
a body that is not JSON, or JSON that is not an object      INTERNAL ("malformed response")
=========================================================  =====================
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded, ParleyError, ResourceExhausted, Unavailable

# Time kept back from the caller's deadline to turn an HTTP failure into a status, in seconds.
DEADLINE_MARGIN_S = 0.05
# Characters of an error body quoted in an error message.
_DETAIL_CHARS = 200


class HttpRejected(ParleyError):
    """The endpoint refused the request with an HTTP 4xx other than 429; maps to INTERNAL.

    Attributes:
        status: The HTTP status code.
        detail: The start of the response body, decoded.
    """

    code = "INTERNAL"

    def __init__(self, message: str, status: int, detail: str):
        super().__init__(message)
        self.status = status
        self.detail = detail


def post_json(
    url: str,
    data: bytes,
    content_type: str,
    headers: Mapping[str, str],
    deadline: Deadline,
    timeout_s: float | None,
    what: str,
) -> dict[str, Any]:
    """POSTs ``data`` and returns the JSON object the endpoint answers with; blocking.

    Args:
        url: Full URL of the endpoint.
        data: Request body.
        content_type: The body's media type (``application/json``, ``multipart/form-data; boundary=...``).
        headers: Extra headers (``Authorization``).
        deadline: The caller's deadline; the HTTP timeout is what it leaves minus
            :data:`DEADLINE_MARGIN_S`, at most ``timeout_s``.
        timeout_s: The stage's own timeout of one call, in seconds; ``None`` or 0 for none.
        what: Names the endpoint in error messages ("LLM endpoint", "transcription endpoint").

    Returns:
        The decoded JSON object.

    Raises:
        DeadlineExceeded: Less than the margin is left, or the caller's deadline ran out while waiting.
        Unavailable: Unreachable, HTTP 5xx, or no answer within ``timeout_s``.
        ResourceExhausted: HTTP 429.
        HttpRejected: Any other HTTP 4xx.
        ParleyError: A body that is not a JSON object.
    """
    request = urllib.request.Request(
        url, data=data, headers={**headers, "Content-Type": content_type}, method="POST"
    )
    return _call(request, deadline, timeout_s, what)


def get_json(
    url: str, headers: Mapping[str, str], deadline: Deadline, timeout_s: float | None, what: str
) -> dict[str, Any]:
    """GETs ``url`` and returns its JSON object; same arguments and errors as :func:`post_json`."""
    return _call(urllib.request.Request(url, headers=dict(headers), method="GET"), deadline, timeout_s, what)


def _call(
    request: urllib.request.Request, deadline: Deadline, timeout_s: float | None, what: str
) -> dict[str, Any]:
    url = request.full_url
    limit_s = deadline.timeout_for(timeout_s, DEADLINE_MARGIN_S)
    caller_limited = limit_s is not None and (not timeout_s or limit_s < timeout_s)
    try:
        with urllib.request.urlopen(request, timeout=limit_s) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:_DETAIL_CHARS].decode("utf-8", "replace")
        if exc.code == 429:
            raise ResourceExhausted(f"{what} {url} is overloaded (HTTP 429): {detail}") from exc
        if exc.code >= 500:
            raise Unavailable(f"{what} {url} failed with HTTP {exc.code}: {detail}") from exc
        raise HttpRejected(
            f"{what} {url} rejected the request with HTTP {exc.code}: {detail}", exc.code, detail
        ) from exc
    except (TimeoutError, urllib.error.URLError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            if caller_limited:
                raise DeadlineExceeded(
                    f"the caller's deadline ran out after {limit_s:.2f} s waiting for {what} {url}"
                ) from exc
            raise Unavailable(f"{what} {url} did not answer within {limit_s} s") from exc
        raise Unavailable(f"cannot reach {what} {url}: {reason}") from exc
    except OSError as exc:
        raise Unavailable(f"{what} {url} connection failed: {exc}") from exc
    try:
        data = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ParleyError(f"{what} {url} returned a malformed response (not JSON): {payload[:80]!r}") from exc
    if not isinstance(data, dict):
        raise ParleyError(f"{what} {url} returned a malformed response: a JSON {type(data).__name__}")
    return data


def multipart_form(
    fields: Mapping[str, str], files: Mapping[str, tuple[str, str, bytes]]
) -> tuple[bytes, str]:
    """Encodes an HTML form as ``multipart/form-data`` (RFC 7578).

    Args:
        fields: Text fields, name -> value.
        files: File fields, name -> (file name, media type, content).

    Returns:
        The body and its ``Content-Type`` (with the boundary).
    """
    boundary = "parley-" + secrets.token_hex(16)
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, (filename, media_type, content) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {media_type}\r\n\r\n"
        )
        parts.append(head.encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
