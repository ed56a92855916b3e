"""HTTP/1.1 message framing, decided without I/O (in the spirit of h11's `_body_framing`).

The asyncio Protocols hand over a parsed head (method or status, version, headers as
(name, value) byte pairs with their lower-cased names) and get back a plain value: how long the
body is (none / Content-Length N / chunked / until the connection closes), which headers are
hop-by-hop, whether the exchange is an Upgrade, and whether the connection may carry another
message afterwards. Anything ambiguous is refused with a status and a reason, because a proxy
that guesses differently from the backend about where a message ends lets one client's bytes
become part of another client's exchange (request smuggling, response desync).

httptools (llhttp) already refuses some of this while parsing (CL + TE, duplicate or malformed
Content-Length, a Transfer-Encoding it cannot parse); the checks are repeated here so that this
module alone states the rules, and because llhttp accepts the head first and fails only on the
body for others (`Transfer-Encoding: xchunked`, `gzip` alone), too late for a proxy that has
already forwarded the head.
"""

from __future__ import annotations

from typing import NamedTuple

# Body framing of one message.
NO_BODY = 0
LENGTH = 1  # Content-Length bytes (LENGTH with length 0 is treated as NO_BODY for requests)
CHUNKED = 2
UNTIL_CLOSE = 3  # responses only: the body ends when the backend closes (RFC 9112 6.3 rule 7/8)

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
# A Connection header may name extra hop-by-hop fields, but never these: dropping them while the
# body is still forwarded would change where the message ends (or where it is routed).
_PROTECTED = frozenset({b"host", b"content-length", b"transfer-encoding"})
_REQUEST_SPECIAL = frozenset({b"content-length", b"transfer-encoding", b"connection", b"upgrade"})
_MAX_LENGTH_DIGITS = 18  # fits in 63 bits: no overflow games with huge lengths
_HOST_FORBIDDEN = frozenset(b" \t,/@\\?#")


class Refusal(NamedTuple):
    """The message cannot be handled: answer `status` (or, for a response, fail the attempt)."""

    status: int
    reason: str


class RequestFrame(NamedTuple):
    """How to carry one valid request."""

    body: int  # NO_BODY, LENGTH or CHUNKED
    length: int  # for LENGTH
    host: bytes  # the authority the request is for (absolute-form target wins over Host)
    target: bytes  # the request-target to forward (origin-form, or b"*")
    upgrade: bool  # Connection: upgrade + Upgrade: the exchange may become a tunnel
    keep_alive: bool  # the client allows another request on this connection
    drop: frozenset[bytes]  # lower-cased names that are not forwarded (hop-by-hop)


class ResponseFrame(NamedTuple):
    """How to carry one response head (and body) back to the client."""

    body: int  # NO_BODY, LENGTH, CHUNKED or UNTIL_CLOSE
    length: int
    codings: bytes  # transfer codings other than chunked, to re-declare (b"" almost always)
    reusable: bool  # the backend connection may carry another request after this body
    drop: frozenset[bytes]


def connection_tokens(headers: list[tuple[bytes, bytes]], lnames: list[bytes]) -> frozenset[bytes]:
    """The lower-cased tokens of every Connection header."""
    tokens: set[bytes] = set()
    for (_, value), ln in zip(headers, lnames, strict=True):
        if ln == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens)


_CONNECTION_CACHE: dict[bytes, tuple[frozenset[bytes], frozenset[bytes]]] = {}


def _connection(
    headers: list[tuple[bytes, bytes]], lnames: list[bytes]
) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """(Connection tokens, names not forwarded): HOP_BY_HOP plus the fields Connection names,
    minus the protected ones. Nearly every message has one `Connection: keep-alive` (or
    close), so the answer per distinct value is cached (bounded)."""
    if b"connection" not in lnames:
        return frozenset(), HOP_BY_HOP
    if lnames.count(b"connection") == 1:
        value = headers[lnames.index(b"connection")][1]
        hit = _CONNECTION_CACHE.get(value)
        if hit is not None:
            return hit
        tokens = connection_tokens(headers, lnames)
        hit = (tokens, HOP_BY_HOP | (tokens - _PROTECTED))
        if len(_CONNECTION_CACHE) < 64:
            _CONNECTION_CACHE[value] = hit
        return hit
    tokens = connection_tokens(headers, lnames)
    return tokens, HOP_BY_HOP | (tokens - _PROTECTED)


def parse_length(value: bytes) -> int | None:
    """A Content-Length value: 1*DIGIT (no sign, no list, no spaces inside), else None."""
    if not value.isdigit():  # bytes.isdigit is ASCII-only
        value = value.strip(b" \t")
        if not value.isdigit():
            return None
    if len(value) > _MAX_LENGTH_DIGITS:
        return None
    return int(value)


def transfer_codings(headers: list[tuple[bytes, bytes]], lnames: list[bytes]) -> list[bytes]:
    """Every Transfer-Encoding header as one token list, lower-cased, empty elements ignored
    (RFC 9110 5.6.1)."""
    codings: list[bytes] = []
    for (_, value), ln in zip(headers, lnames, strict=True):
        if ln == b"transfer-encoding":
            codings.extend(t for t in (c.strip(b" \t").lower() for c in value.split(b",")) if t)
    return codings


def _authority_ok(host: bytes) -> bool:
    return bool(host) and _HOST_FORBIDDEN.isdisjoint(host) and host.isascii()


_GOOD_HOSTS: dict[bytes, bytes] = {}  # raw Host value -> checked, stripped (bounded cache)
_new = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (hot path)


def _split_absolute(target: bytes) -> tuple[bytes, bytes] | Refusal:
    """absolute-form `http://authority/path?q` -> (authority, origin-form target)."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return Refusal(400, "the request target must be a path (/...) or an http:// URL")
    cut = len(rest)
    for ch in (b"/", b"?", b"#"):
        i = rest.find(ch)
        if 0 <= i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:]
    if b"@" in authority:
        return Refusal(400, "the request target must not carry user information (user@host)")
    if not _authority_ok(authority):
        return Refusal(400, "the request target URL has no valid host")
    if not path.startswith(b"/"):
        path = b"/" + path  # http://host?q -> /?q (RFC 9112 3.2.1: empty path is "/")
    return authority, path


def request_frame(
    method: bytes,
    http11: bool,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    lnames: list[bytes],
) -> RequestFrame | Refusal:
    """Decide how a request is framed and forwarded, or why it is refused (RFC 9112 3, 6, 7.6).

    `lnames` are the lower-cased header names, parallel to `headers`."""
    if target[:1] == b"/" and _REQUEST_SPECIAL.isdisjoint(lnames) and lnames.count(b"host") == 1:
        # The common case (a GET with one Host and no body), decided in a few C calls.
        host = _GOOD_HOSTS.get(headers[lnames.index(b"host")][1])
        if host is not None:
            return _new(RequestFrame, (NO_BODY, 0, host, target, False, http11, HOP_BY_HOP))
    if method == b"CONNECT":
        return Refusal(405, "CONNECT is not supported: zerodown is a reverse proxy, not a tunnel")
    hosts = lnames.count(b"host")
    if hosts > 1:
        return Refusal(400, "the request has more than one Host header")
    host = b""
    if hosts:
        raw = headers[lnames.index(b"host")][1]
        host = raw.strip(b" \t")
        if host and not _authority_ok(host):
            return Refusal(400, "the Host header is not a valid host[:port]")
        if host and len(_GOOD_HOSTS) < 256:
            _GOOD_HOSTS[raw] = host
    if target[:1] != b"/":
        if target == b"*" and method == b"OPTIONS":
            pass  # asterisk-form: the server as a whole (routed by Host, forwarded as is)
        else:
            split = _split_absolute(target)
            if isinstance(split, Refusal):
                return split
            host, target = split  # RFC 9112 3.2.2: the target's authority replaces Host
    if not host and http11:
        return Refusal(400, "an HTTP/1.1 request needs a Host header")

    if _REQUEST_SPECIAL.isdisjoint(lnames):  # no body
        return _new(RequestFrame, (NO_BODY, 0, host, target, False, http11, HOP_BY_HOP))

    body, length = NO_BODY, 0
    n_length = lnames.count(b"content-length")
    if b"transfer-encoding" in lnames:
        if n_length:
            return Refusal(400, "the request has both Content-Length and Transfer-Encoding")
        if not http11:
            return Refusal(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
        codings = transfer_codings(headers, lnames)
        if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
            # RFC 9112 6.3: chunked must be the final coding, or the length is unknowable.
            return Refusal(400, "Transfer-Encoding must end with chunked, exactly once")
        if len(codings) > 1:
            other = b", ".join(codings[:-1]).decode("latin-1")
            return Refusal(501, f"transfer coding {other} is not supported (only chunked)")
        body = CHUNKED
    elif n_length:
        if n_length > 1:
            return Refusal(400, "the request has more than one Content-Length header")
        parsed = parse_length(headers[lnames.index(b"content-length")][1])
        if parsed is None:
            return Refusal(400, "the Content-Length header is not a number")
        if parsed:
            body, length = LENGTH, parsed

    tokens, drop = _connection(headers, lnames)
    upgrade = b"upgrade" in tokens and b"upgrade" in lnames
    if upgrade and body != NO_BODY:
        # The backend may switch protocols right after the head, so a body could not be
        # delimited reliably: the client's next bytes would be read as whatever comes next.
        return Refusal(400, "an Upgrade request must not carry a body")
    keep_alive = b"close" not in tokens if http11 else b"keep-alive" in tokens
    return RequestFrame(body, length, host, target, upgrade, keep_alive, drop)


def response_frame(
    status: int,
    request_method: bytes,
    http11: bool,
    headers: list[tuple[bytes, bytes]],
    lnames: list[bytes],
) -> ResponseFrame | Refusal:
    """Decide how a final response (status >= 200, or 101) is framed (RFC 9112 6.3), or why
    the backend's answer cannot be trusted (-> 502 and the connection closed).

    `http11` only matters when Connection says neither close nor keep-alive: then an HTTP/1.1
    connection persists and an HTTP/1.0 one does not (RFC 9112 9.3)."""
    # Each `in`/count/index is a scan of the names: the common head costs four of them.
    n_connection = lnames.count(b"connection")
    if n_connection == 1:
        value = headers[lnames.index(b"connection")][1]
        hit = _CONNECTION_CACHE.get(value)
        tokens, drop = hit if hit is not None else _connection(headers, lnames)
        reusable = b"close" not in tokens and (http11 or b"keep-alive" in tokens)
    elif n_connection:
        tokens, drop = _connection(headers, lnames)
        reusable = b"close" not in tokens and (http11 or b"keep-alive" in tokens)
    else:
        drop, reusable = HOP_BY_HOP, http11
    n_length = lnames.count(b"content-length")
    has_te = b"transfer-encoding" in lnames
    length = 0
    if n_length:
        if n_length > 1:
            return Refusal(502, "the backend sent more than one Content-Length")
        if has_te:
            return Refusal(502, "the backend sent both Content-Length and Transfer-Encoding")
        value = headers[lnames.index(b"content-length")][1]
        if value.isdigit() and len(value) <= _MAX_LENGTH_DIGITS:  # the common case, inline
            length = int(value)
        else:
            parsed = parse_length(value)
            if parsed is None:
                return Refusal(502, "the backend sent a Content-Length that is not a number")
            length = parsed
    if request_method == b"HEAD" or status == 204 or status == 304 or status < 200:
        return ResponseFrame(NO_BODY, length, b"", reusable, drop)
    if has_te:
        codings = transfer_codings(headers, lnames)
        if codings.count(b"chunked") > 1 or (b"chunked" in codings and codings[-1] != b"chunked"):
            return Refusal(502, "the backend sent an invalid Transfer-Encoding")
        others = b", ".join(c for c in codings if c != b"chunked")
        if codings and codings[-1] == b"chunked":
            return ResponseFrame(CHUNKED, 0, others, reusable, drop)
        # Not chunked last: the body runs until the backend closes (RFC 9112 6.3 rule 4b).
        return ResponseFrame(UNTIL_CLOSE, 0, others, False, drop)
    if n_length:
        return _new(ResponseFrame, (LENGTH, length, b"", reusable, drop))
    return ResponseFrame(UNTIL_CLOSE, 0, b"", False, drop)


class ClientBody(NamedTuple):
    """How a response body is written to the client."""

    rechunk: bool  # re-frame as chunked (the client speaks HTTP/1.1)
    close: bool  # the body is delimited by closing the client connection


_AS_IS = ClientBody(False, False)
_RECHUNK = ClientBody(True, False)
_CLOSE_DELIMITED = ClientBody(False, True)


def client_body(frame: ResponseFrame, client_http11: bool) -> ClientBody:
    """Bodies of unknown length (chunked from the backend, or until close) are re-chunked for
    HTTP/1.1 clients, and delimited by closing the connection for HTTP/1.0 clients."""
    if frame.body == NO_BODY or frame.body == LENGTH:
        return _AS_IS
    return _RECHUNK if client_http11 else _CLOSE_DELIMITED


# An upper bound on interim (1xx) responses before the final one: each is relayed as received,
# so a backend that sends them without end cannot make the proxy loop or write without bound.
MAX_INTERIM = 16
