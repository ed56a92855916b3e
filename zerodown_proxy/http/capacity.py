"""How many sockets the HTTP side may hold, so that it can never take the process's last file
descriptors: the HSMS listener lives in the same process, and a tool that cannot connect
because idle browsers hold every fd is a line stop.

The HTTP side gets a budget of `RLIMIT_NOFILE - fd_reserve` descriptors for client and backend
sockets together; client connections are capped at `max_client_connections` and at half the
budget (each client may need one backend connection). A client over the cap is accepted, told
`503` with the reason, and closed at once (see README, "HTTP limits", for why this and not
"stop accepting").
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("zerodown.http")

_UNLIMITED = 1 << 20  # RLIM_INFINITY: count as a large, finite number


def nofile_limit() -> int:
    """The soft RLIMIT_NOFILE in force now."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return _UNLIMITED if soft == resource.RLIM_INFINITY else soft


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as HAProxy does for its maxconn) and
    return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit to %s: %s", hard, exc)
    return _UNLIMITED if soft == resource.RLIM_INFINITY else soft


class Capacity:
    """The client-connection cap and the file-descriptor budget of the HTTP side."""

    __slots__ = ("nofile", "fd_budget", "client_limit", "upstreams", "refused", "_max_clients",
                 "_reserve")  # fmt: skip

    def __init__(self, max_client_connections: int, fd_reserve: int, nofile: int) -> None:
        self.upstreams = 0  # backend sockets open or being connected
        self.refused = 0
        self._max_clients = max_client_connections
        self._reserve = fd_reserve
        self.nofile = 0
        self.resize(nofile)

    def resize(self, nofile: int) -> None:
        """Size the budget for an open-files limit (at start, and when the limit is changed
        under the running process, e.g. with prlimit)."""
        if nofile == self.nofile:
            return
        self.nofile = nofile
        self.fd_budget = max(nofile - self._reserve, 8)
        if nofile - self._reserve < 8:
            log.warning("open-files limit %d leaves no room after fd_reserve %d; HTTP gets %d",
                        nofile, self._reserve, self.fd_budget)  # fmt: skip
        self.client_limit = max(1, min(self._max_clients, self.fd_budget // 2))

    def admit(self, clients: int) -> str | None:
        """Whether one more client fits next to `clients` open ones; if not, why (the 503)."""
        if clients >= self.client_limit:
            self.refused += 1
            return (
                f"the proxy is at its limit of {self.client_limit} client connections; "
                "try again later"
            )
        return None

    def upstream_room(self, clients: int) -> bool:
        """Whether one more backend socket fits in the budget next to `clients` open ones."""
        return clients + self.upstreams < self.fd_budget

    def status(self) -> dict[str, int]:
        return {
            "client_connection_limit": self.client_limit,
            "upstream_connections": self.upstreams,
            "fd_budget": self.fd_budget,
            "open_files_limit": self.nofile,
            "refused_connections": self.refused,
        }
