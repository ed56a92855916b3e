"""secsgem 0.3.0 glue shared by the sample HSMS host and the equipment simulator.

secsgem is thread-based and, as shipped, has four traits that matter for a peer that must survive
a proxy, switches and many sessions: its passive side accepts ONE connection at a time (it closes
the listening socket after accept); a send to a dead socket blocks its caller forever; the system
counter is not thread-safe; and a received Separate.req is ignored. This module keeps secsgem's
HSMS framing, state machine and SECS-II codec, and fixes those four points (and a fifth: starting
a session could hang its caller forever, see `_QuietStop`):

- `PeerSettings(sock=...)` runs one secsgem protocol over an already-accepted socket, so a host can
  own the listening socket and serve any number of sessions;
- sends wait at most `send_timeout`; a lost connection fails the transactions waiting on it at
  once (ConnectionLost) instead of letting them run into T3;
- system bytes come from a locked counter;
- Separate.req closes the connection, as SEMI E37 says.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from typing import Any

import secsgem.common
import secsgem.hsms
import secsgem.secs
from secsgem.common.block_send_info import BlockSendInfo
from secsgem.common.tcp_client_connection import TcpClientConnection
from secsgem.common.tcp_connection import TcpConnection
from secsgem.hsms import HsmsConnectMode, HsmsSType
from secsgem.hsms.connection_state_machine import ConnectionState

log = logging.getLogger("zerodown.hsms_peer")

# How often secsgem's receiver thread wakes to check for a stop request: lower than its 0.5 s
# default so that stopping a peer (and a sample-app on SIGTERM) is quick.
SELECT_TIMEOUT = 0.05
SEND_TIMEOUT = 5.0


class PeerError(Exception):
    """A transaction did not get a usable reply; the message says why, for a user to act on."""


class NotSelected(PeerError):
    pass


class TransactionTimeout(PeerError):
    pass


class TransactionRejected(PeerError):
    pass


class ConnectionLost(PeerError):
    pass


_LOST = object()  # put in a waiting transaction's queue when its connection goes away


class _BoundedSend(BlockSendInfo):
    def wait_for(self, timeout: float) -> bool:
        # BlockSendInfo.wait() has no timeout: a block queued on a dead connection never resolves.
        if not self._result_trigger.wait(timeout):
            return False
        return self.wait()


class _Protocol(secsgem.hsms.HsmsProtocol):
    def __init__(self, settings: PeerSettings) -> None:
        super().__init__(settings)
        self._counter_lock = threading.Lock()
        self._waiting: set[int] = set()
        self._no_separate = False

    def get_next_system_counter(self) -> int:
        with self._counter_lock:
            return super().get_next_system_counter()

    def send_message(self, message: secsgem.common.Message) -> bool:
        if not self._connected:
            return False
        for block in message.blocks:
            info = _BoundedSend(block.encode())
            self._send_queue.put(info)
            self._thread.trigger_receiver()
            if not info.wait_for(SEND_TIMEOUT):
                return False
        return True

    def _on_connection_message_received(self, source: object, message: Any) -> None:
        if message.header.s_type == HsmsSType.SEPARATE_REQ:
            # E37: the receiver of Separate.req closes the connection without answering.
            self._no_separate = True
            threading.Thread(target=self._connection.disconnect, daemon=True).start()
            return
        super()._on_connection_message_received(source, message)

    def _on_disconnecting(self, data: dict[str, Any]) -> None:
        if not self._no_separate:
            super()._on_disconnecting(data)

    def _on_connected(self, data: dict[str, Any]) -> None:
        self._no_separate = False
        super()._on_connected(data)

    def _on_disconnected(self, data: dict[str, Any]) -> None:
        super()._on_disconnected(data)
        while True:  # senders blocked on this connection learn now, not after SEND_TIMEOUT
            try:
                self._send_queue.get_nowait().resolve(False)
            except queue.Empty:
                break
        for system in list(self._waiting):
            q = self._response_queues.get(system)
            if q is not None:
                q.put_nowait(_LOST)
        # ProtocolDispatcher.stop() leaves the dispatcher thread waiting forever; end it too.
        self._thread._stop_dispatcher_thread = True
        self._thread._dispatcher_thread_trigger.set()

    def close_without_separate(self) -> None:
        """Close the TCP connection with no Separate.req (E37: e.g. T7 expired while NOT SELECTED)."""
        self._no_separate = True
        self._connection.disconnect()

    def transact(self, function: secsgem.secs.SecsStreamFunction, timeout: float) -> Any:
        """Send a primary and wait up to `timeout` s for its reply; raise PeerError otherwise."""
        if self._connection_state.current != ConnectionState.CONNECTED_SELECTED:
            raise NotSelected(f"HSMS session to {self._peer()} is not SELECTED")
        system = self.get_next_system_counter()
        replies = self._get_queue_for_system(system)
        self._waiting.add(system)
        try:
            if not self.send_message(self._create_message_for_function(function, system)):
                raise ConnectionLost(f"could not send {_sf(function)} to {self._peer()}")
            try:
                reply = replies.get(True, timeout)
            except queue.Empty:
                raise TransactionTimeout(
                    f"no reply to {_sf(function)} from {self._peer()} within {timeout:g} s (T3)"
                ) from None
        finally:
            self._waiting.discard(system)
            self._response_queues.pop(system, None)
        if reply is _LOST:
            raise ConnectionLost(f"connection to {self._peer()} lost before {_sf(function)} reply")
        if reply.header.s_type == HsmsSType.REJECT_REQ:
            raise TransactionRejected(
                f"{_sf(function)} rejected by {self._peer()} (Reject.req reason {reply.header.function})"
            )
        return reply

    def _peer(self) -> str:
        return f"{self._settings.address}:{self._settings.port}"


def _sf(function: secsgem.secs.SecsStreamFunction) -> str:
    return f"S{function.stream}F{function.function}"


class _QuietStop:
    """secsgem busy-spins while its receiver thread starts and stops. Starting, the spin can last
    forever: it waits to see `_thread_running` True, and a receiver whose peer closes at once (a
    TCP health check: connect, close) sets it True and back to False before the spinning thread
    looks, so the host's accept thread hung for good and its listen queue filled. Start without
    the spin; stop with a bounded sleep (2 shared cores)."""

    select_timeout = SELECT_TIMEOUT

    def _start_receiver(self) -> None:
        self._thread_running = True  # the thread is started now: disconnect() must wait for it
        threading.Thread(
            target=self._TcpConnection__receiver_thread,  # type: ignore[attr-defined]
            name=f"secsgem_receiver_{self._settings.address}:{self._settings.port}",  # type: ignore[attr-defined]
        ).start()

    def disconnect(self) -> None:
        if not self._thread_running:  # type: ignore[attr-defined]
            return
        self._disconnecting = True
        self._stop_thread = True
        deadline = time.monotonic() + 5.0
        while self._thread_running and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.005)
        self._disconnecting = False


class _AcceptedConnection(_QuietStop, TcpConnection):
    """One HSMS session over a socket the host has already accepted; never reconnects."""

    def __init__(self, settings: PeerSettings, sock: socket.socket) -> None:
        super().__init__(settings)
        self._accepted = sock

    def enable(self) -> None:
        self._sock = self._accepted
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.setblocking(False)
        self._connected = True
        # secsgem starts the receiver first and only then moves the HSMS state to CONNECTED: a
        # Select.req that arrives in between is answered but the state change fails, and every
        # later data message is rejected. Reach CONNECTED first, then read.
        self.on_connected({"source": self})
        self._start_receiver()

    def disable(self) -> None:
        self.disconnect()


class _ClientConnection(_QuietStop, TcpClientConnection):
    """secsgem's active connection (reconnects after T5), with the quick stop and TCP_NODELAY."""

    def __init__(self, settings: PeerSettings) -> None:
        super().__init__(settings)
        self.on_connected.register(self._nodelay)  # registered before the protocol's handler

    def _nodelay(self, _: dict[str, Any]) -> None:
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PeerSettings(secsgem.hsms.HsmsSettings):
    """HsmsSettings whose protocol and connection are the fixed ones above.

    With `sock`, the session runs over that accepted socket (passive side); without, it connects
    to address:port (active side) and reconnects after T5 when the connection drops.
    """

    def __init__(self, sock: socket.socket | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._accepted_sock = sock

    def create_protocol(self) -> secsgem.common.Protocol:
        return _Protocol(self)

    def create_connection(self) -> secsgem.common.Connection:
        if self._accepted_sock is not None:
            return _AcceptedConnection(self, self._accepted_sock)
        return _ClientConnection(self)


class PeerHandler(secsgem.secs.SecsHandler):
    """A SECS handler that checks the device id of incoming data messages.

    A primary for another device id gets S9F1 (Unrecognized Device ID) with its header, per E5,
    instead of a silent drop: the sender still waits for T3, but the cause is on the wire and in
    the log.
    """

    def __init__(self, settings: PeerSettings) -> None:
        super().__init__(settings)
        self.wrong_device_id = 0

    @property
    def hsms(self) -> _Protocol:
        return self._protocol  # type: ignore[return-value]

    def _on_message_received(self, data: dict[str, Any]) -> None:
        message = data["message"]
        if message.header.session_id != self.settings.session_id:
            self.wrong_device_id += 1
            if message.header.stream == 9:  # never answer an S9 with an S9: two peers would loop
                log.warning(
                    "S9F%d for device id %d dropped",
                    message.header.function,
                    message.header.session_id,
                )
                return
            log.warning(
                "S%dF%d for device id %d received, this peer is device id %d: answered S9F1",
                message.header.stream,
                message.header.function,
                message.header.session_id,
                self.settings.session_id,
            )
            self.send_stream_function(self.stream_function(9, 1)(message.header.encode()))
            return
        super()._on_message_received(data)

    def selected(self) -> bool:
        state = self.hsms.connection_state.current
        return state == ConnectionState.CONNECTED_SELECTED

    def decode(self, message: Any) -> Any:
        return self.settings.streams_functions.decode(message)


def peer_settings(
    *,
    passive: bool,
    address: str,
    port: int,
    device_id: int,
    t3: float = 45.0,
    t5: float = 10.0,
    t6: float = 5.0,
    t7: float = 10.0,
    sock: socket.socket | None = None,
) -> PeerSettings:
    return PeerSettings(
        sock=sock,
        connect_mode=HsmsConnectMode.PASSIVE if passive else HsmsConnectMode.ACTIVE,
        address=address,
        port=port,
        session_id=device_id,
        device_type=(
            secsgem.common.DeviceType.HOST if passive else secsgem.common.DeviceType.EQUIPMENT
        ),
        t3=t3,
        t5=t5,
        t6=t6,
        t7=t7,
    )
