// A secs4js HSMS peer driven over stdin/stdout, one JSON object per line (tests/secs4js_peer.py).
//
//   node peer.mjs equipment --port P [--device-id N] [--linktest-ms MS] [--t3 S]
//       HSMS active (the proxy's tools): connects to 127.0.0.1:P and selects.
//   node peer.mjs host --version V [--device-id N]
//       HSMS passive (a backend instance): listens on 127.0.0.1 on a free port (printed).
//
// Out: {"event": "ready"|"connected"|"selected"|"deselected"|"disconnected"|"message"|"error", ...}
//      and {"id": K, "ok": true, ...} / {"id": K, "ok": false, "error": "..."} per command.
// In:  {"id": K, "op": "send", "s": 6, "f": 11, "w": true, "sml": "<L <U4 1> <U4 1000> <L>>"}
//      {"id": K, "op": "linktest"} | {"id": K, "op": "received"} | {"id": K, "op": "close"}
//
// Answers on its own, like a GEM peer: the host S1F1 (S1F2 <L <A "MDLN"> <A version>>),
// S1F13 (S1F14) and S6F11 (S6F12 <B 0>, DATAID recorded); the equipment S1F1, S1F13 and S2F41
// (S2F42 <L <B 0> <L>>).
import { createInterface } from "node:readline";
import {
  A,
  B,
  HsmsActiveCommunicator,
  HsmsPassiveCommunicator,
  L,
  SmlParser,
} from "secs4js";

const args = process.argv.slice(2);
const role = args[0];
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const version = opt("version", "secs4js");
const deviceId = Number(opt("device-id", "0"));
const out = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const received = []; // DATAIDs of S6F11, in arrival order
let primaries = 0;

const common = {
  ip: "127.0.0.1",
  deviceId,
  name: `${role}-${version}`,
  timeoutT3: Number(opt("t3", "10")),
  timeoutT5: 0.5,
  timeoutT6: 5,
  timeoutT7: 10,
  timeoutT8: 5,
  log: { enabled: false, console: false },
};
let comm;
if (role === "equipment") {
  comm = new HsmsActiveCommunicator({
    ...common,
    port: Number(opt("port")),
    isEquip: true,
    linkTestInterval: Number(opt("linktest-ms", "600000")),
  });
} else if (role === "host") {
  comm = new HsmsPassiveCommunicator({ ...common, port: 0, isEquip: false });
} else {
  process.stderr.write("usage: peer.mjs equipment --port P | host --version V\n");
  process.exit(2);
}

const dataid = (msg) => {
  const v = msg.body?.value;
  return Array.isArray(v) && v[0] ? Number(v[0].value) : null;
};

comm.on("connected", () => out({ event: "connected" }));
comm.on("selected", () => out({ event: "selected" }));
comm.on("deselected", () => out({ event: "deselected" }));
comm.on("disconnected", () => out({ event: "disconnected" }));
comm.on("error", (err) => out({ event: "error", error: String(err?.message ?? err) }));
comm.on("message", (msg) => {
  primaries += 1;
  const s = msg.stream;
  const f = msg.func;
  out({ event: "message", s, f, w: msg.wBit, sys: msg.systemBytes, session: msg.deviceId,
        sml: msg.body ? msg.body.toSml() : "" });
  if (!msg.wBit) return;
  let reply = null;
  if (s === 1 && f === 1) reply = [1, 2, L(A("MDLN"), A(version))];
  else if (s === 1 && f === 13) reply = [1, 14, L(B(Buffer.from([0])), L())];
  else if (role === "host" && s === 6 && f === 11) {
    received.push(dataid(msg));
    reply = [6, 12, B(Buffer.from([0]))];
  } else if (role === "equipment" && s === 2 && f === 41) reply = [2, 42, L(B(Buffer.from([0])), L())];
  if (reply) {
    comm.reply(msg, ...reply).catch((err) => out({ event: "error", error: String(err) }));
  }
});

async function run(cmd) {
  switch (cmd.op) {
    case "send": {
      const body = cmd.sml ? SmlParser.parseBody(cmd.sml) : null;
      const rsp = await comm.send(cmd.s, cmd.f, Boolean(cmd.w), body);
      return rsp
        ? { s: rsp.stream, f: rsp.func, sys: rsp.systemBytes, session: rsp.deviceId,
            sml: rsp.body ? rsp.body.toSml() : "" }
        : { sent_sys: comm._systemBytesCounter }; // no W-bit: the system bytes it went with
    }
    case "linktest":
      await comm.sendLinkTestReq();
      return {};
    case "received":
      return { received, primaries };
    case "close":
      await comm.close();
      return {};
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

createInterface({ input: process.stdin }).on("line", (line) => {
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch {
    out({ event: "error", error: `not JSON: ${line}` });
    return;
  }
  run(cmd).then(
    (res) => out({ id: cmd.id, ok: true, ...res }),
    (err) => out({ id: cmd.id, ok: false, error: String(err?.message ?? err) }),
  );
}).on("close", () => {
  comm.close().finally(() => process.exit(0));
});

await comm.open();
if (role === "host") {
  // Listening on port 0: keep the port the kernel gave for the re-listen after each session.
  comm.port = comm.server.address().port;
}
out({ event: "ready", port: comm.port });
