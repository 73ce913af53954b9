// Socket.IO authorization matrix: `node matrix.mjs PORT CELLS.json`. CELLS.json is a list of
// cells written by the Rust test (crates/server/tests/api/socketio.rs), each
// {"name", "auth": {"token"} | null, "headers": {…}, "command": {envelope}}. For each cell, in
// order: connect with that CONNECT `auth` payload and those handshake headers, emit the command
// on `commands`, and print the first reply on `events` as {"step": name, "reply"}: the
// refusal of the connection (sent before the server disconnects) or the command's outcome.
// Prints `done` at the end.
import { readFileSync } from "node:fs";
import { io } from "socket.io-client";

const [port, file] = [Number(process.argv[2]), process.argv[3]];
if (!port || !file) {
  console.error("usage: node matrix.mjs PORT CELLS.json");
  process.exit(2);
}
const cells = JSON.parse(readFileSync(file, "utf8"));
const url = `http://127.0.0.1:${port}`;
const deadline = setTimeout(() => {
  console.error("timed out");
  process.exit(1);
}, 50000);

function run(cell) {
  const options = { reconnection: false, timeout: 10000, forceNew: true, extraHeaders: cell.headers };
  if (cell.auth) options.auth = cell.auth;
  const socket = io(url, options);
  return new Promise((resolve, reject) => {
    socket.once("events", (reply) => {
      socket.disconnect();
      resolve(reply);
    });
    socket.once("connect", () => socket.emit("commands", cell.command));
    socket.once("connect_error", (e) => reject(new Error(`${cell.name}: connect_error: ${e.message}`)));
  });
}

try {
  for (const cell of cells) {
    const reply = await run(cell);
    console.log(JSON.stringify({ step: cell.name, reply }));
  }
  console.log("done");
} catch (e) {
  console.error(String(e));
  process.exit(1);
} finally {
  clearTimeout(deadline);
}
