"""The Python cost of the HSMS proxy's data path per transaction, without sockets.

The real HsmsProxy, ToolLink and BackendLink forward S6F11 W / S6F12 (a tool transaction) and
S2F41 W / S2F42 (a host transaction) through in-memory transports, so what is timed is only the
proxy's own Python work (decoding headers, renumbering, the transaction table, Stream 9 memory,
the message-log test, metrics); and S2F99 W answered by the tool with S9F5 (Stream 9 routing). CPU time (process_time), best of several rounds: robust on a busy
machine, for before/after comparisons. Run from a checkout:

    python -m benchmarks.hsms_datapath                       # message log off (the default)
    python -m benchmarks.hsms_datapath --message-log DIR     # message log on, files in DIR
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
from typing import Any

import orjson

from .datapath import _MemoryTransport

S6F11_BODY = b"\x01\x03\xb1\x04\x00\x00\x00\x07\xb1\x04\x00\x00\x03\xe8\x01\x00"
_SYS = struct.Struct(">I")


def _msg(sid: int, b2: int, b3: int, system: int, body: bytes = b"") -> bytes:
    return struct.pack(">IHBBBBI", 10 + len(body), sid, b2, b3, 0, 0, system) + body


def measure(
    transactions: int = 20000, rounds: int = 7, message_log: str = "",
    kinds: tuple[str, ...] = ("tool", "host", "s9"),
) -> dict[str, Any]:  # fmt: skip
    """Best-of-`rounds` CPU microseconds per transaction of each kind in `kinds` (tool: S6F11 W
    / S6F12, host: S2F41 W / S2F42, s9: S2F99 W then S9F5; s9 only in a tree that has it)."""
    from zerodown_proxy.config import HsmsSection
    from zerodown_proxy.discovery.file import parse_registry
    from zerodown_proxy.hsms import codec
    from zerodown_proxy.hsms.backend_link import BackendLink
    from zerodown_proxy.hsms.proxy import HsmsProxy
    from zerodown_proxy.hsms.tool_link import ToolLink
    from zerodown_proxy.metrics import Registry
    from zerodown_proxy.routing import Router
    from zerodown_proxy.watcher import Watcher

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        router = Router()
        inst = {"id": "drimeap-blue-1", "group": "blue", "version": "v1",
                "address": "127.0.0.1", "http_port": 9000, "hsms_port": 9500, "healthy": True}  # fmt: skip
        doc = {"generation": 1, "apps": {"drimeap": {"active": "blue", "instances": [inst]}}}
        Watcher(router).submit(parse_registry(orjson.dumps({**doc, "proxies": []})))
        kw = {"message_log_dir": message_log} if message_log else {}
        proxy = HsmsProxy(router, HsmsSection(linktest_interval=0, **kw), Registry())  # type: ignore[arg-type]
        tool = ToolLink(proxy)
        tool_out = _MemoryTransport(("127.0.0.1", 40000))
        tool.connection_made(tool_out)  # type: ignore[arg-type]
        (instance,) = router.snapshot.apps["drimeap"].active
        link = BackendLink(proxy, tool, instance, 0)
        tool.current = link  # the session is "opened" here, not by a real connect
        back_out = _MemoryTransport(("127.0.0.1", 9500))
        link.connection_made(back_out)  # type: ignore[arg-type]
        tool.data_received(codec.select_req(1))
        link.data_received(codec.select_rsp(_SYS.unpack_from(back_out.out[-1], 10)[0]))
        if not (tool.session.selected and link.selected):
            raise RuntimeError("the in-memory sessions did not select")
        n = [0]

        def tool_tx() -> None:
            n[0] = sb = (n[0] % 0xFFFFFFFF) + 1
            tool.data_received(_msg(0, 0x86, 11, sb, S6F11_BODY))
            psb = _SYS.unpack_from(back_out.out[-1], 10)[0]
            link.data_received(_msg(0, 6, 12, psb, b"\x21\x01\x00"))

        def host_tx() -> None:
            n[0] = sb = (n[0] % 0xFFFFFFFF) + 1
            link.data_received(_msg(0, 0x82, 41, sb, b"\x01\x00"))
            tsb = _SYS.unpack_from(tool_out.out[-1], 10)[0]
            tool.data_received(_msg(0, 2, 42, tsb, b"\x01\x02\x21\x01\x00\x01\x00"))

        def s9_tx() -> None:  # a host primary the tool cannot handle: S9F5 naming it
            n[0] = sb = (n[0] % 0xFFFFFFFF) + 1
            link.data_received(_msg(0, 0x82, 99, sb))
            head = tool_out.out[-1][4:14]
            tool.data_received(_msg(0, 9, 5, sb, b"\x21\x0a" + head))

        out: dict[str, Any] = {"transactions": transactions, "rounds": rounds,
                               "message_log": bool(message_log)}  # fmt: skip
        runs = [("tool", tool_tx, tool_out, (b"\x06\x0c",)),
                 ("host", host_tx, back_out, (b"\x02\x2a",))]  # fmt: skip
        if hasattr(tool, "recent"):  # Stream 9 routing (absent in a checkout from before it)
            runs.append(("s9", s9_tx, back_out, (b"\x09\x05",)))
        for name, one, check, want in runs:
            if name not in kinds:
                continue
            for _ in range(2000):
                one()
            if check.out[-1][6:8] not in want:
                raise RuntimeError(f"unexpected reply on the data path: {check.out[-1][:14]!r}")
            if name == "s9" and _SYS.unpack_from(check.out[-1], 22)[0] != n[0]:
                raise RuntimeError("the S9's header does not carry the backend's system bytes")
            best = float("inf")
            for _ in range(rounds):
                tool_out.out.clear()
                back_out.out.clear()
                t = time.process_time()
                for _ in range(transactions):
                    one()
                best = min(best, (time.process_time() - t) / transactions)
            out[f"us_per_{name}_transaction"] = best * 1e6
        if len(tool.tx):
            raise RuntimeError(f"{len(tool.tx)} transactions left open")
        msglog = getattr(proxy, "msglog", None)  # absent in a checkout from before it
        if msglog is not None:
            msglog.close()
        return out
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hsms_datapath", description=__doc__)
    ap.add_argument("--transactions", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--message-log", default="", help="directory: message log on (default off)")
    args = ap.parse_args()
    r = measure(args.transactions, args.rounds, args.message_log)
    state = "on" if r["message_log"] else "off"
    print(
        f"HSMS data path, message log {state}: {r['us_per_tool_transaction']:.2f} us per tool "
        f"transaction (S6F11 W/S6F12), {r['us_per_host_transaction']:.2f} us per host "
        f"transaction (S2F41 W/S2F42); best of {r['rounds']} x {r['transactions']}"
    )
    if "us_per_s9_transaction" in r:
        print(
            f"Stream 9: {r['us_per_s9_transaction']:.2f} us per S2F99 W forwarded to the tool and "
            "the tool's S9F5 naming it, mapped and sent to the backend session that sent it"
        )


if __name__ == "__main__":
    main()
