"""HSMS side of the sample drimEAP app: a GEM-style host, HSMS passive, on secsgem.

Contract (HSMS_PEERS.md): S1F1 -> S1F2 <L <A MDLN=instance[:20]> <A SOFTREV=version>>, so tests
read which version answered; S1F13 -> S1F14 <L <B 0> <L>>; S6F11 -> S6F12 <B 0>, recording the
DATAID and CEID so tests can count lost or duplicated event reports; S2F41 -> S2F42 <L <B 0> <L>>.
The host initiates S2F41 itself through `send_command` (the sample app's POST /hsms/command).

Unlike secsgem's own passive server (one connection at a time) this host owns the listening socket
and runs one secsgem session per accepted connection, so several tools (or a proxy opening one
backend session per tool) can be connected at once. It never sends a primary on its own after
Select: a proxy moving tools between versions must not meet unsolicited S1F13s.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from .hsms_secsgem import NotSelected, PeerHandler, peer_settings

log = logging.getLogger("zerodown.sample_hsms")

# The record of received S6F11s is for tests and benchmarks; bound it so a sample app left running
# under load (zerodown up + hsms-sim) does not grow without limit. Past the limit the oldest half
# is dropped and counted (`received_total()` keeps counting).
RECEIVED_LIMIT = 200_000


class HsmsHost:
    """Passive HSMS host serving any number of sessions on one port."""

    def __init__(
        self,
        port: int,
        version: str,
        device_id: int = 0,
        instance_id: str = "",
        host: str = "127.0.0.1",
        t7: float = 10.0,
    ) -> None:
        self.version = version
        self.t7 = t7
        self.instance_id = instance_id
        self.device_id = device_id
        self.address = host
        self._listener = socket.create_server((host, port), backlog=64, reuse_port=False)
        self._listener.settimeout(0.1)  # the accept loop checks for stop this often
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sessions: list[PeerHandler] = []  # most recently selected last
        self._received: list[tuple[Any, Any, float]] = []  # (dataid, ceid, t)
        self._dropped = 0
        self._stopping = threading.Event()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"hsms-host-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()

    # -- public -----------------------------------------------------------------------------

    def received(self) -> list[dict[str, Any]]:
        """Every S6F11 received so far (the last RECEIVED_LIMIT at most), in arrival order:
        {"dataid", "ceid", "t"}."""
        with self._lock:
            entries = list(self._received)
        return [{"dataid": d, "ceid": c, "t": t} for d, c, t in entries]

    def received_dataids(self) -> tuple[list[Any], int]:
        """(DATAIDs as in received(), total S6F11 ever received) — cheap enough for HTTP."""
        with self._lock:
            return [e[0] for e in self._received], self._dropped + len(self._received)

    def sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def send_command(self, rcmd: str, timeout: float) -> dict[str, Any]:
        """Host-initiated S2F41 to the most recently selected equipment session.

        Returns {"hcack", "version"}; raises PeerError (NotSelected, TransactionTimeout, ...).
        """
        with self._lock:
            candidates = [h for h in reversed(self._sessions) if h.selected()]
        if not candidates:
            raise NotSelected(f"no equipment session is SELECTED on HSMS port {self.port}")
        handler = candidates[0]
        s2f41 = handler.stream_function(2, 41)({"RCMD": rcmd, "PARAMS": []})
        reply = handler.hsms.transact(s2f41, timeout)
        decoded = handler.decode(reply)
        if reply.header.stream != 2 or reply.header.function != 42:
            raise NotSelected(f"S2F41 answered by S{reply.header.stream}F{reply.header.function}")
        return {"hcack": int(decoded.HCACK.get()), "version": self.version}

    def stop(self) -> None:
        """Stop accepting, send Separate.req on every session, and close them; returns when closed."""
        self._stopping.set()
        self._accept_thread.join(5)  # bounded: a stuck accept must not hang the app's exit
        self._listener.close()
        with self._lock:
            sessions = list(self._sessions)
        # disconnect in parallel: each waits for its secsgem receiver thread to notice
        threads = [threading.Thread(target=h.disable, daemon=True) for h in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)

    # -- sessions -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._stopping.is_set():
                    log.warning("HSMS accept on port %d failed: %s", self.port, exc)
                    time.sleep(0.1)
                continue
            try:
                self._start_session(sock, peer)
            except Exception:  # one bad session must not end the listener
                log.exception("HSMS session from %s:%d could not start", *peer[:2])
                sock.close()

    def _start_session(self, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        settings = peer_settings(
            passive=True, address=peer[0], port=peer[1], device_id=self.device_id, sock=sock
        )
        handler = PeerHandler(settings)
        handler.register_stream_function(1, 1, self._on_s1f1)
        handler.register_stream_function(1, 13, self._on_s1f13)
        handler.register_stream_function(6, 11, self._on_s6f11)
        handler.register_stream_function(2, 41, self._on_s2f41)
        handler.events.communicating += lambda _data: self._on_selected(handler)
        handler.events.disconnected += lambda _data: self._on_closed(handler)
        with self._lock:
            self._sessions.append(handler)
        # T7: a connection that does not select in time is closed (secsgem itself never does)
        t7 = threading.Timer(self.t7, self._t7_expired, args=(handler, peer))
        t7.daemon = True
        handler.events.communicating += lambda _data: t7.cancel()
        handler.events.disconnected += lambda _data: t7.cancel()
        handler.enable()
        t7.start()

    def _t7_expired(self, handler: PeerHandler, peer: tuple[Any, ...]) -> None:
        if not handler.selected() and not self._stopping.is_set():
            log.warning(
                "HSMS connection from %s:%d not selected within T7 (%g s): closed",
                peer[0],
                peer[1],
                self.t7,
            )
            handler.hsms.close_without_separate()

    def _on_selected(self, handler: PeerHandler) -> None:
        with self._lock:  # the newest selected session is the one send_command talks to
            if handler in self._sessions:
                self._sessions.remove(handler)
            self._sessions.append(handler)

    def _on_closed(self, handler: PeerHandler) -> None:
        with self._lock:
            if handler in self._sessions:
                self._sessions.remove(handler)

    # -- callbacks (secsgem dispatcher thread of the session; keep them short) ---------------

    def _on_s1f1(self, handler: PeerHandler, message: Any) -> Any:
        return handler.stream_function(1, 2)([self.instance_id[:20], self.version[:20]])

    def _on_s1f13(self, handler: PeerHandler, message: Any) -> Any:
        return handler.stream_function(1, 14)({"COMMACK": 0, "MDLN": []})

    def _on_s6f11(self, handler: PeerHandler, message: Any) -> Any:
        s6f11 = handler.decode(message)
        entry = (s6f11.DATAID.get(), s6f11.CEID.get(), time.time())
        with self._lock:
            self._received.append(entry)
            if len(self._received) > RECEIVED_LIMIT:
                half = RECEIVED_LIMIT // 2
                del self._received[:half]
                self._dropped += half
        return handler.stream_function(6, 12)(0)

    def _on_s2f41(self, handler: PeerHandler, message: Any) -> Any:
        return handler.stream_function(2, 42)({"HCACK": 0, "PARAMS": []})


def start_hsms_host(
    port: int,
    version: str,
    device_id: int = 0,
    instance_id: str = "",
    host: str = "127.0.0.1",
    t7: float = 10.0,
) -> HsmsHost:
    """Listen on host:port (0 = any free port; read `.port`) and serve HSMS sessions."""
    return HsmsHost(port, version, device_id=device_id, instance_id=instance_id, host=host, t7=t7)
