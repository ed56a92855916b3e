"""The HTTP framing core with byte strings only: no sockets, no parser."""

from __future__ import annotations

import httptools
from hypothesis import given
from hypothesis import strategies as st

from zerodown_proxy.http.framing import (
    CHUNKED,
    HOP_BY_HOP,
    LENGTH,
    MAX_INTERIM,
    NO_BODY,
    UNTIL_CLOSE,
    Refusal,
    RequestFrame,
    ResponseFrame,
    client_body,
    parse_length,
    request_frame,
    response_frame,
)


def _split(raw: bytes) -> tuple[bytes, bytes, bool, list[tuple[bytes, bytes]], list[bytes]]:
    """A request head as bytes -> (method, target, http11, headers, lower-cased names)."""
    lines = raw.split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    headers = [tuple(x.strip() for x in line.split(b":", 1)) for line in lines[1:] if line]
    return method, target, version == b"HTTP/1.1", headers, [n.lower() for n, _ in headers]  # type: ignore[return-value]


def req(raw: bytes) -> RequestFrame | Refusal:
    method, target, http11, headers, lnames = _split(raw)
    return request_frame(method, http11, target, headers, lnames)


def resp(status: int, raw_headers: bytes, method: bytes = b"GET", http11: bool = True):
    headers = [
        tuple(x.strip() for x in line.split(b":", 1)) for line in raw_headers.split(b"\r\n") if line
    ]
    return response_frame(status, method, http11, headers, [n.lower() for n, _ in headers])  # type: ignore[arg-type]


def test_plain_get_has_no_body_and_keeps_alive():
    f = req(b"GET /a?b HTTP/1.1\r\nHost: eap\r\nUser-Agent: t")
    assert f == RequestFrame(NO_BODY, 0, b"eap", b"/a?b", False, True, HOP_BY_HOP)


def test_content_length_and_chunked_bodies():
    assert req(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 12").body == LENGTH  # type: ignore[union-attr]
    assert req(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0").body == NO_BODY  # type: ignore[union-attr]
    f = req(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked")
    assert f.body == CHUNKED  # type: ignore[union-attr]


def test_refusals_name_the_reason():
    cases = {
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b": (400, "more than one Host"),
        b"GET / HTTP/1.1": (400, "needs a Host"),
        b"CONNECT h:443 HTTP/1.1\r\nHost: h:443": (405, "CONNECT"),
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked": (
            400, "both Content-Length and Transfer-Encoding"),
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3": (
            400, "more than one Content-Length"),
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1": (400, "not a number"),
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3": (400, "not a number"),
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked": (400, "end with chunked"),
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip": (400, "end with chunked"),
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip": (400, "end with"),
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked":
            (400, "exactly once"),
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked": (501, "gzip"),
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked": (400, "HTTP/1.0"),
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: ws\r\nContent-Length: 49":
            (400, "Upgrade request must not carry a body"),
        b"GET ftp://h/ HTTP/1.1\r\nHost: h": (400, "http:// URL"),
        b"GET http://u@h/ HTTP/1.1\r\nHost: h": (400, "user information"),
        b"GET http:/// HTTP/1.1\r\nHost: h": (400, "no valid host"),
        b"GET h/x HTTP/1.1\r\nHost: h": (400, "http:// URL"),
        b"GET / HTTP/1.1\r\nHost: a b": (400, "not a valid host"),
        b"GET / HTTP/1.1\r\nHost: a,b": (400, "not a valid host"),
    }  # fmt: skip
    for raw, (status, words) in cases.items():
        f = req(raw)
        assert isinstance(f, Refusal), raw
        assert f.status == status and words in f.reason, (raw, f)


def test_absolute_form_authority_wins_over_host():
    f = req(b"GET http://B.example:81/p?q=1 HTTP/1.1\r\nHost: a.example")
    assert (f.host, f.target) == (b"B.example:81", b"/p?q=1")  # type: ignore[union-attr]
    f = req(b"GET https://b?x HTTP/1.1\r\nHost: a")
    assert (f.host, f.target) == (b"b", b"/?x")  # type: ignore[union-attr]
    f = req(b"GET http://b HTTP/1.0")  # HTTP/1.0 without Host: the target names the host
    assert (f.host, f.target) == (b"b", b"/")  # type: ignore[union-attr]


def test_options_star_is_accepted_and_only_for_options():
    assert req(b"OPTIONS * HTTP/1.1\r\nHost: h").target == b"*"  # type: ignore[union-attr]
    assert isinstance(req(b"GET * HTTP/1.1\r\nHost: h"), Refusal)


def test_connection_never_drops_host_length_or_transfer_encoding():
    f = req(
        b"POST / HTTP/1.1\r\nHost: h\r\nConnection: Host, Content-Length, X-A\r\nContent-Length: 2"
    )
    assert b"x-a" in f.drop  # type: ignore[union-attr]
    assert not {b"host", b"content-length"} & f.drop  # type: ignore[union-attr]
    assert f.body == LENGTH and f.length == 2  # type: ignore[union-attr]
    f = resp(200, b"Connection: Content-Length\r\nContent-Length: 4")
    assert f.body == LENGTH and b"content-length" not in f.drop


def test_upgrade_and_keep_alive_from_connection_tokens():
    f = req(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket")
    assert f.upgrade and f.keep_alive  # type: ignore[union-attr]
    assert not req(b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket").upgrade  # type: ignore[union-attr]
    assert not req(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close").keep_alive  # type: ignore[union-attr]
    assert not req(b"GET / HTTP/1.0").keep_alive  # type: ignore[union-attr]
    assert req(b"GET / HTTP/1.0\r\nConnection: Keep-Alive").keep_alive  # type: ignore[union-attr]


def test_response_framing():
    assert resp(200, b"Content-Length: 5")[:2] == (LENGTH, 5)
    assert resp(200, b"Content-Length: 5", method=b"HEAD").body == NO_BODY
    assert resp(204, b"").body == NO_BODY and resp(204, b"").reusable
    assert resp(304, b"Content-Length: 10").body == NO_BODY
    assert resp(200, b"Transfer-Encoding: chunked").body == CHUNKED
    gz = resp(200, b"Transfer-Encoding: gzip")
    assert gz.body == UNTIL_CLOSE and gz.codings == b"gzip" and not gz.reusable
    both = resp(200, b"Transfer-Encoding: gzip, chunked")
    assert both.body == CHUNKED and both.codings == b"gzip" and both.reusable
    assert resp(200, b"").body == UNTIL_CLOSE and not resp(200, b"").reusable
    assert not resp(200, b"Content-Length: 1\r\nConnection: close").reusable
    assert not resp(200, b"Content-Length: 1", http11=False).reusable
    assert resp(200, b"Content-Length: 1\r\nConnection: keep-alive", http11=False).reusable
    for bad in (
        b"Content-Length: 1\r\nContent-Length: 2",
        b"Content-Length: 1\r\nTransfer-Encoding: chunked",
        b"Content-Length: x",
        b"Transfer-Encoding: chunked, gzip",
    ):
        r = resp(200, bad)
        assert isinstance(r, Refusal) and r.status == 502, bad


def test_client_body_rechunks_for_http11_and_closes_for_http10():
    chunked = ResponseFrame(CHUNKED, 0, b"", True, HOP_BY_HOP)
    assert client_body(chunked, True) == (True, False)
    assert client_body(chunked, False) == (False, True)
    fixed = ResponseFrame(LENGTH, 3, b"", True, HOP_BY_HOP)
    assert client_body(fixed, False) == (False, False)
    assert MAX_INTERIM >= 2


@given(st.binary(max_size=24))
def test_parse_length_accepts_exactly_1_digit_strings(value: bytes):
    got = parse_length(value)
    stripped = value.strip(b" \t")
    if stripped.isdigit() and len(stripped) <= 18:
        assert got == int(stripped)
    else:
        assert got is None


_token = st.sampled_from([b"chunked", b"gzip", b"xchunked", b"identity", b"", b"CHUNKED"])


@given(st.lists(st.lists(_token, min_size=1, max_size=3), min_size=1, max_size=3))
def test_request_transfer_encoding_is_a_token_list(te_headers: list[list[bytes]]):
    headers = [(b"Host", b"h")] + [(b"Transfer-Encoding", b", ".join(t)) for t in te_headers]
    f = request_frame(b"POST", True, b"/", headers, [n.lower() for n, _ in headers])
    tokens = [t.lower() for group in te_headers for t in group if t]
    if tokens == [b"chunked"]:
        assert isinstance(f, RequestFrame) and f.body == CHUNKED
    else:
        assert isinstance(f, Refusal) and f.status in (400, 501)
        if tokens and tokens[-1] == b"chunked" and tokens.count(b"chunked") == 1:
            assert f.status == 501


class _Heads:
    """Collects what httptools parsed, to cross-check the core against a real parser."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


_name = st.sampled_from(
    [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"X-A"]
)
_value = st.sampled_from(
    [b"h", b"5", b"0", b"chunked", b"gzip", b"close", b"upgrade", b"Content-Length", b"a, b"]
)


@given(st.lists(st.tuples(_name, _value), max_size=6))
def test_the_core_never_accepts_a_framing_httptools_rejects(fields):
    """Where httptools refuses a head for its framing, the core refuses it too (or the head
    never reached it); where the core accepts, its length matches what httptools reads."""
    raw = b"POST /x HTTP/1.1\r\n" + b"".join(b"%s: %s\r\n" % f for f in fields) + b"\r\n"
    sink = _Heads()
    parser = httptools.HttpRequestParser(sink)
    try:
        parser.feed_data(raw)
        parsed_ok = True
    except httptools.HttpParserUpgrade:
        parsed_ok = True
    except httptools.HttpParserError:
        parsed_ok = False
    if not sink.complete:
        return  # rejected while parsing fields: the core is never asked
    f = request_frame(b"POST", True, sink.url, sink.headers, [n.lower() for n, _ in sink.headers])
    if isinstance(f, RequestFrame):
        assert parsed_ok or f.body == LENGTH, (raw, f)
        if f.body == LENGTH:
            assert f.length == 5
