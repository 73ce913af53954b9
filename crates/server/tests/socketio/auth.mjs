// Socket.IO with AUTH on: `node auth.mjs PORT TOKEN`. Connects without a credential (the server
// answers on `events` with a 401 problem and disconnects), then with `auth: {token}` in the
// CONNECT packet (what a browser can send) and sends one command; prints one JSON line per
// step ({"step", "reply"}), then `done`.
import { io } from "socket.io-client";

const [port, token] = [Number(process.argv[2]), process.argv[3]];
if (!port || !token) {
  console.error("usage: node auth.mjs PORT TOKEN");
  process.exit(2);
}
const url = `http://127.0.0.1:${port}`;
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

try {
  // Without a credential: the refusal comes on `events`, then the server disconnects.
  const anonymous = io(url, { reconnection: false, timeout: 10000 });
  const refused = await new Promise((resolve) => anonymous.once("events", resolve));
  console.log(JSON.stringify({ step: "anonymous", reply: refused }));
  anonymous.disconnect();
  const a = await connect({ auth: { token } });
  const reply = await new Promise((resolve) => {
    a.once("events", resolve);
    a.emit("commands", { type: "create", targetName: "order", targetId: "sa1", body: {} });
  });
  console.log(JSON.stringify({ step: "create", reply }));
  a.disconnect();
  console.log("done");
} catch (e) {
  console.error(String(e));
  process.exit(1);
} finally {
  clearTimeout(deadline);
}
