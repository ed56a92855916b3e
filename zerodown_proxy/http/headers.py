"""Header rewriting for the HTTP data path: what crosses a hop and what the proxy adds.

Kept as plain functions over lists of (name, value) byte pairs, as httptools hands them over, so
building a head is one filter and one join.
"""

from __future__ import annotations

# RFC 9110 7.6.1 connection-specific fields, plus the de-facto ones proxies strip.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

PREVIEW_HEADER = b"x-zerodown-preview"
TOKEN_HEADER = b"x-zerodown-token"

STATUS_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in Connection (they are hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


_DROP_CACHE: dict[bytes, frozenset[bytes]] = {}


def hop_by_hop_for(headers: list[tuple[bytes, bytes]], lnames: list[bytes]) -> frozenset[bytes]:
    """HOP_BY_HOP plus the names listed in Connection; `lnames` are the lower-cased names.

    Nearly every message says `Connection: keep-alive` (or close), so the set per distinct
    value is cached (bounded) instead of being rebuilt for each message."""
    if b"connection" not in lnames:
        return HOP_BY_HOP
    if lnames.count(b"connection") > 1:
        return HOP_BY_HOP | connection_tokens(headers)
    value = headers[lnames.index(b"connection")][1]
    drop = _DROP_CACHE.get(value)
    if drop is None:
        drop = HOP_BY_HOP | frozenset(t.strip().lower() for t in value.split(b","))
        if len(_DROP_CACHE) < 64:
            _DROP_CACHE[value] = drop
    return drop


def error_response(status: int, message: str, close: bool, request_id: str = "") -> bytes:
    """A complete plain-text error response the proxy itself produces."""
    body = (message.rstrip("\n") + "\n").encode()
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, STATUS_REASONS.get(status, b"Error")),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"X-Zerodown-Error: %d\r\n" % status,
    ]
    if request_id:
        head.append(b"X-Request-Id: " + request_id.encode() + b"\r\n")
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body
