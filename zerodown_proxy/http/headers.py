"""Header rewriting for the HTTP data path: what crosses a hop and what the proxy adds.

Kept as plain functions over lists of (name, value) byte pairs, as httptools hands them over, so
building a head is one filter and one join. Which fields are hop-by-hop is decided by the
framing core (`framing.RequestFrame.drop`).
"""

from __future__ import annotations

from collections.abc import Callable

from .framing import CHUNKED, RequestFrame

PREVIEW_HEADER = b"x-zerodown-preview"
TOKEN_HEADER = b"x-zerodown-token"

STATUS_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def error_response(
    status: int, message: str, close: bool, request_id: str = "", retry_after: int = 0
) -> bytes:
    """A complete plain-text error response the proxy itself produces (`retry_after`: seconds
    for a Retry-After field, on the 503s of overload)."""
    body = (message.rstrip("\n") + "\n").encode()
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, STATUS_REASONS.get(status, b"Error")),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"X-Zerodown-Error: %d\r\n" % status,
    ]
    if request_id:
        head.append(b"X-Request-Id: " + request_id.encode() + b"\r\n")
    if retry_after:
        head.append(b"Retry-After: %d\r\n" % retry_after)
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


def body_size(response: bytes) -> int:
    """The body bytes of a complete response the proxy produced (error_response's)."""
    return len(response) - response.index(b"\r\n\r\n") - 4


def upstream_head(
    method: bytes,
    frame: RequestFrame,
    headers: list[tuple[bytes, bytes]],
    lnames: list[bytes],
    peer: bytes,
    default_host: bytes,
    new_request_id: Callable[[], bytes],
) -> tuple[bytes, bytes]:
    """The request head sent to the backend, and the request id it carries.

    Hop-by-hop fields (`frame.drop`) are removed, Host is the authority the request is for (an
    absolute-form target's wins, RFC 9112 3.2.2), X-Forwarded-For/-Proto/-Host and X-Request-Id
    are set, and the body framing is re-declared (chunked is re-framed hop by hop; a validated
    Content-Length passes as is). `new_request_id()` makes one when the client sent none."""
    drop = frame.drop
    parts = [method, b" ", frame.target, b" HTTP/1.1\r\n"]
    xff = b""
    request_id = b""
    upgrade = b""
    ap = parts.append
    for field, ln in zip(headers, lnames, strict=True):
        if ln in drop:
            if ln == b"upgrade":
                upgrade = field[1]
        elif ln[0] != 120 and ln != b"host":  # not x-...: forwarded as is (the common case)
            ap(b"%s: %s\r\n" % field)  # one format: half the cost of four appends
        elif ln == b"host":
            continue  # re-added below from the frame
        elif ln == b"x-forwarded-for":
            xff = xff + b", " + field[1] if xff else field[1]
        elif ln == PREVIEW_HEADER or ln == TOKEN_HEADER or ln.startswith(b"x-forwarded-"):
            continue
        else:
            if ln == b"x-request-id":
                request_id = field[1]
            ap(b"%s: %s\r\n" % field)
    # HTTP/1.0 clients may omit Host; backends speaking 1.1 require it.
    host = frame.host or default_host
    if request_id:
        ap(b"Host: %s\r\n" % host)
    else:
        request_id = new_request_id()
        ap(b"Host: %s\r\nX-Request-Id: %s\r\n" % (host, request_id))
    ap(b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: %s\r\n"
       % (xff + b", " + peer if xff else peer, host))  # fmt: skip
    if frame.body == CHUNKED:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if frame.upgrade and upgrade:
        parts.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % upgrade)
    parts.append(b"\r\n")
    return b"".join(parts), request_id
