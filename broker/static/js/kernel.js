// The kernel WebSocket (/api/kernels/{id}/channels, legacy JSON framing).
// A browser cannot set Authorization on a WebSocket, so the page first asks
// for a single-use ticket (POST /api/sessions/{id}/ws-ticket, token in the
// header) and puts only that ticket in the URL.

import { api, sid as enc } from "./api.js";

function uuid() {
  return crypto.randomUUID ? crypto.randomUUID()
    : Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

export class Kernel {
  constructor(sessionId, onStatus) {
    this.sessionId = sessionId;
    this.clientSession = uuid();
    this.onStatus = onStatus || (() => {});
    this.pending = new Map();   // msg_id -> handlers
    this.ws = null;
    this.closed = false;
  }

  async connect() {
    const t = await api("POST", `/api/sessions/${enc(this.sessionId)}/ws-ticket`);
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${proto}//${location.host}${t.url}?session_id=${encodeURIComponent(this.clientSession)}`
      + `&ticket=${encodeURIComponent(t.ticket)}`;
    await new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      ws.onopen = () => { this.ws = ws; this.onStatus("idle"); resolve(); };
      ws.onerror = () => reject(new Error("could not open the kernel WebSocket"));
      ws.onclose = (ev) => {
        this.ws = null;
        if (!this.closed) this.onStatus(`disconnected${ev.reason ? ": " + ev.reason : ""}`);
        for (const h of this.pending.values()) h.done && h.done({ status: "aborted" });
        this.pending.clear();
      };
      ws.onmessage = (ev) => this._receive(ev.data);
    });
  }

  close() {
    this.closed = true;
    if (this.ws) this.ws.close(1000);
  }

  _receive(data) {
    if (typeof data !== "string") return;   // binary frames carry buffers (widgets): not shown here
    let msg;
    try { msg = JSON.parse(data); } catch { return; }
    const type = msg.msg_type || (msg.header && msg.header.msg_type);
    const parent = msg.parent_header && msg.parent_header.msg_id;
    if (type === "status" && msg.channel === "iopub") this.onStatus(msg.content.execution_state);
    const h = parent && this.pending.get(parent);
    if (!h) return;
    const c = msg.content || {};
    if (msg.channel === "iopub") {
      if (type === "stream" || type === "display_data" || type === "execute_result" || type === "error") {
        h.output({ output_type: type, ...c });
      } else if (type === "execute_input") {
        h.count && h.count(c.execution_count);
      } else if (type === "clear_output") {
        h.clear && h.clear();
      } else if (type === "status" && c.execution_state === "idle") {
        h.idle = true;
        this._maybeDone(parent, h);
      }
    } else if (msg.channel === "shell" && type === "execute_reply") {
      h.reply = c;
      if (h.count && c.execution_count != null) h.count(c.execution_count);
      this._maybeDone(parent, h);
    }
  }

  _maybeDone(id, h) {
    if (h.idle && h.reply) {
      this.pending.delete(id);
      h.done && h.done(h.reply);
    }
  }

  // Run code; handlers: output(out), count(n), clear(), done(reply).
  execute(code, handlers) {
    if (!this.ws) throw new Error("the kernel is not connected");
    const msgId = uuid();
    this.pending.set(msgId, { ...handlers, idle: false, reply: null });
    this.ws.send(JSON.stringify({
      header: { msg_id: msgId, msg_type: "execute_request", username: "page", session: this.clientSession,
                date: new Date().toISOString(), version: "5.3" },
      parent_header: {}, metadata: {}, channel: "shell",
      content: { code, silent: false, store_history: true, user_expressions: {}, allow_stdin: false,
                 stop_on_error: true },
    }));
    return msgId;
  }
}
