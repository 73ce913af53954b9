// Drives Sourced's Socket.IO endpoint with the real socket.io-client: run as
// `node client.mjs PORT`; prints one JSON line per step ({"step", "reply"}), then `done`.
// The Rust test crates/server/tests/api/socketio.rs runs it and checks the replies.
import { io } from "socket.io-client";

const port = Number(process.argv[2]);
if (!port) {
  console.error("usage: node client.mjs PORT");
  process.exit(2);
}
const url = `http://127.0.0.1:${port}`;
// Never hang: the Rust side has its own timeout too.
const deadline = setTimeout(() => {
  console.error("timed out");
  process.exit(1);
}, 20000);

function connect(options) {
  const socket = io(url, { reconnection: false, timeout: 10000, ...options });
  return new Promise((resolve, reject) => {
    socket.once("connect", () => resolve(socket));
    socket.once("connect_error", (e) => reject(new Error(`connect_error: ${e.message}`)));
  });
}

// Emits one command on `commands` and resolves with the next reply on `events`.
function command(socket, payload) {
  return new Promise((resolve) => {
    socket.once("events", resolve);
    socket.emit("commands", payload);
  });
}

function print(step, reply, extra = {}) {
  console.log(JSON.stringify({ step, reply, ...extra }));
}

const id = (n) => `0190a0b0-0000-7000-8000-${n.toString(16).padStart(12, "0")}`;

try {
  // The default transports: HTTP long-polling first, then the upgrade to WebSocket.
  const a = await connect({});
  const create = {
    id: id(1), type: "create", targetName: "order", targetId: "sio1",
    body: { customer: "ada", total: 0 },
  };
  print("create", await command(a, create));
  const patch = {
    id: id(2), type: "patch", targetName: "order", targetId: "sio1", version: 1,
    body: [{ op: "replace", path: "/total", value: 8 }],
  };
  print("patch", await command(a, patch));
  // Another writer still holding version 1 loses.
  const conflicting = { ...patch, id: id(3), body: [{ op: "replace", path: "/total", value: 9 }] };
  print("conflict", await command(a, conflicting));
  print("invalid", await command(a, { type: "fly" }));
  print("string", await command(a, JSON.stringify({ ...create, id: id(4), targetId: "sio2" })));
  const transport = a.io.engine.transport.name;
  a.disconnect();

  // A second connection, WebSocket only, with a fixed tenant header: the retry of the create
  // returns the original result.
  const b = await connect({ transports: ["websocket"] });
  print("retry", await command(b, create), { transport });
  b.disconnect();
  const c = await connect({ transports: ["polling"], extraHeaders: { "x-tenant": "other" } });
  print("tenant", await command(c, { ...create, id: id(5), tenant: "default" }));
  c.disconnect();
  console.log("done");
  clearTimeout(deadline);
  process.exit(0);
} catch (e) {
  console.error(String(e && e.stack || e));
  process.exit(1);
}
