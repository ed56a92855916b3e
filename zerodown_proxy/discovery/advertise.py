"""The admin address a proxy advertises in Consul (service `zerodown-proxy`, Meta `admin`): the
address the CLI on another host uses to read the proxy's /v1/status (`zerodown status`, a
switch's wait for every proxy).

`[proxy] advertise_admin` (or ZERODOWN_ADVERTISE_ADMIN, --advertise-admin) says it outright,
`host:port` or `host` alone (then the port the admin API is bound to). Without it the bind
address is advertised, unless the admin API listens on every address (0.0.0.0 or ::): then the
address this host uses to reach Consul, which is reachable from Consul's network by
construction (what `consul agent` itself picks as its advertise address, a private address,
is the same idea); without a Consul address, the address the host name resolves to. Loopback is
advertised only when nothing else exists, with a warning: no other host can reach it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("zerodown.discovery.advertise")

WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def split_host_port(value: str) -> tuple[str, int | None]:
    """'host:port', '[v6]:port', 'host', '[v6]' or a bare IPv6 literal -> (host, port|None).
    ValueError with a sentence when it is neither."""
    value = value.strip()
    port: str | None = None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"not host[:port]: {value!r}")
        port = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host = value  # a host name, IPv4 address or bare IPv6 literal
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise ValueError(f"not host[:port]: {value!r}")
    if port is None:
        return host, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be 1-65535 in {value!r}")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def route_source(target_host: str, target_port: int = 9) -> str | None:
    """The local address the kernel would send from to reach `target_host` (a UDP connect sends
    nothing), or None when there is no route or the name does not resolve."""
    try:
        infos = socket.getaddrinfo(target_host, target_port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _, addr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.connect(addr)
                return str(s.getsockname()[0])
        except OSError:
            continue
    return None


def routable_host(consul_addr: str | None) -> str:
    """An address of this host another host can reach (see the module docstring)."""
    if consul_addr:
        target = urlsplit(consul_addr if "://" in consul_addr else f"http://{consul_addr}")
        if target.hostname and not _is_loopback(target.hostname):
            found = route_source(target.hostname, target.port or 8500)
            if found is not None:
                return found
    try:
        by_name = socket.gethostbyname(socket.gethostname())
    except OSError:
        by_name = ""
    if by_name and not _is_loopback(by_name):
        return by_name
    log.warning(
        "no routable address found for the admin API: advertising 127.0.0.1, which no other "
        "host can reach; set [proxy] advertise_admin"
    )
    return "127.0.0.1"


def consul_addr(cfg: Config) -> str | None:
    """The Consul address the proxy follows (None with the file registry)."""
    return cfg.consul.addr if cfg.discovery.provider == "consul" else None


def advertised_admin(
    advertise: str, bound_host: str, bound_port: int, consul_addr: str | None = None
) -> str:
    """The admin address to register: `advertise` if given, else the bound address unless it
    is a wildcard, else a routable address of this host; `bound_port` when no port is given."""
    if advertise:
        host, port = split_host_port(advertise)
        return join_host_port(host, port or bound_port)
    if bound_host.strip("[]") not in WILDCARDS:
        if (
            consul_addr
            and _is_loopback(bound_host)
            and not _is_loopback(urlsplit(consul_addr).hostname or "127.0.0.1")
        ):
            log.warning(
                "the admin API listens on %s only: a CLI on another host cannot reach it "
                "(set [proxy] admin_listen to a routable address, or advertise_admin)",
                bound_host,
            )
        return join_host_port(bound_host.strip("[]"), bound_port)
    return join_host_port(routable_host(consul_addr), bound_port)
