// The page: sign in, sessions, notebook, shell, files, transcript, admin.

import { api, ApiError, clearToken, filePath, getToken, saveBlob, setToken, sid } from "./api.js";
import { Kernel } from "./kernel.js";
import { OutputArea, renderOutput } from "./render.js";

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e[k] = v;
  }
  e.append(...children);
  return e;
};

const state = { owner: null, admin: false, current: null, kernel: null };

function showError(err) {
  const msg = err instanceof ApiError ? `${err.message} (HTTP ${err.status})` : String(err.message || err);
  $("error").textContent = msg;
  if (err instanceof ApiError && err.status === 401) signOut("Your token was refused; sign in again.");
}

function clearError() {
  $("error").textContent = "";
}

// Run an async UI action, reporting any error on the page.
const guarded = (fn) => async (...args) => {
  clearError();
  try {
    await fn(...args);
  } catch (err) {
    showError(err);
  }
};

function fmtBytes(n) {
  if (n == null) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${u[i]}`;
}

function fmtSeconds(s) {
  if (s == null) return "";
  s = Math.round(s);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// -- sign in ------------------------------------------------------------------------

async function signIn(token) {
  // Any authenticated call proves the token; whoami (when the broker has it)
  // also says who we are and whether we are an admin.
  await api("GET", "/api/sessions", { token });
  setToken(token);
  let who = null;
  try {
    who = await api("GET", "/api/whoami");
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) throw err;
  }
  state.owner = who ? who.owner : null;
  state.admin = !!(who && who.admin);
  $("signin").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  $("whoami").hidden = !state.owner;
  $("whoami").textContent = state.owner ? `${state.owner}${state.admin ? " (admin)" : ""}` : "";
  $("admin").hidden = !state.admin;
  await refreshSessions();
  if (state.admin) await refreshAdmin();
}

function signOut(message = "") {
  clearToken();
  closeSession();
  state.owner = null;
  state.admin = false;
  $("app").hidden = true;
  $("signout").hidden = true;
  $("whoami").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message;
  $("token").value = "";
}

$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("signin-error").textContent = "";
  const token = $("token").value.trim();
  try {
    await signIn(token);
    $("token").value = "";
  } catch (err) {
    clearToken();
    $("signin-error").textContent = err instanceof ApiError && err.status === 401
      ? "That token was refused." : `Could not sign in: ${err.message}`;
  }
});
$("signout").addEventListener("click", () => signOut());

// -- sessions -------------------------------------------------------------------------

async function refreshSessions() {
  const list = await api("GET", "/api/sessions");
  const ul = $("sessions");
  ul.replaceChildren(...list.map((s) => el("li", { dataset: { id: s.id } },
    el("button", { type: "button", className: "link" + (state.current === s.id ? " current" : ""),
                   textContent: s.id, title: `created ${s.created}, ${s.state}`,
                   onclick: guarded(() => openSession(s.id)) }),
    el("span", { className: "muted", textContent: ` ${s.state}` }))));
  if (!list.length) ul.append(el("li", { className: "muted", textContent: "No sessions yet." }));
}

$("new-session").addEventListener("click", guarded(async () => {
  $("new-session").disabled = true;
  try {
    const s = await api("POST", "/api/sessions");
    await refreshSessions();
    await openSession(s.id);
  } finally {
    $("new-session").disabled = false;
  }
}));

function closeSession() {
  if (state.kernel) state.kernel.close();
  state.kernel = null;
  state.current = null;
  $("session").hidden = true;
  setStatus("disconnected");
}

function setStatus(s) {
  $("kernel-status").textContent = s;
  $("kernel-status").dataset.state = s.split(":")[0];
}

async function openSession(id) {
  closeSession();
  state.current = id;
  $("session").hidden = false;
  $("session").dataset.id = id;
  $("session-title").textContent = `Session ${id}`;
  $("cells").replaceChildren();
  $("shell-output").replaceChildren();
  $("transcript").replaceChildren();
  addCell();
  selectTab("notebook");
  await refreshSessions();
  setStatus("connecting");
  const k = new Kernel(id, setStatus);
  state.kernel = k;
  await k.connect();
}

$("delete-session").addEventListener("click", guarded(async () => {
  const id = state.current;
  if (!id || !confirm(`Delete session ${id} and all its files?`)) return;
  closeSession();
  await api("DELETE", `/api/sessions/${sid(id)}`);
  await refreshSessions();
}));

$("interrupt").addEventListener("click", guarded(async () => {
  if (state.current) await api("POST", `/api/kernels/${sid(state.current)}/interrupt`);
}));

// -- tabs ---------------------------------------------------------------------------------

function selectTab(name) {
  for (const b of document.querySelectorAll("[role=tab]")) b.setAttribute("aria-selected", String(b.dataset.tab === name));
  for (const t of document.querySelectorAll(".tab")) t.hidden = t.id !== `tab-${name}`;
  if (name === "files") guarded(refreshFiles)();
  if (name === "transcript") guarded(loadTranscript)();
}

for (const b of document.querySelectorAll("[role=tab]")) b.addEventListener("click", () => selectTab(b.dataset.tab));

// -- notebook ---------------------------------------------------------------------------

function addCell(code = "") {
  const prompt = el("span", { className: "prompt", textContent: "In [ ]:" });
  const input = el("textarea", { className: "code", rows: 3, spellcheck: false, value: code });
  const fit = () => { input.rows = Math.min(30, Math.max(3, input.value.split("\n").length)); };
  input.addEventListener("input", fit);
  fit();
  const outputs = el("div", { className: "outputs" });
  const area = new OutputArea(outputs);
  const cell = el("div", { className: "cell" });
  const run = async () => {
    if (!state.kernel) throw new Error("open a session first");
    if (!state.kernel.ws) {
      // Dropped (broker restarted, network): a fresh ticket, the same client session.
      setStatus("connecting");
      await state.kernel.connect();
    }
    area.clear();
    prompt.textContent = "In [*]:";
    cell.dataset.state = "running";
    await new Promise((resolve) => {
      state.kernel.execute(input.value, {
        output: (out) => area.add(out),
        clear: () => area.clear(),
        count: (n) => { prompt.textContent = `In [${n}]:`; },
        done: (reply) => {
          cell.dataset.state = reply.status || "ok";
          if (reply.status === "aborted" && prompt.textContent === "In [*]:") prompt.textContent = "In [ ]:";
          resolve();
        },
      });
    });
    const cells = [...$("cells").children];
    if (cells[cells.length - 1] === cell) addCell().querySelector("textarea").focus();
  };
  const runButton = el("button", { type: "button", className: "run", textContent: "Run", onclick: guarded(run) });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && ev.shiftKey) {
      ev.preventDefault();
      guarded(run)();
    }
  });
  cell.append(el("div", { className: "cell-input" }, prompt, input, runButton), outputs);
  $("cells").append(cell);
  return cell;
}

$("add-cell").addEventListener("click", () => addCell().querySelector("textarea").focus());

// -- shell ----------------------------------------------------------------------------------

$("shell-form").addEventListener("submit", guarded(async (ev) => {
  ev.preventDefault();
  const command = $("shell-command").value;
  if (!command.trim() || !state.current) return;
  const box = el("div", { className: "shell-run" }, el("pre", { className: "shell-cmd", textContent: `$ ${command}` }));
  const out = new OutputArea(box);
  $("shell-output").prepend(box);
  $("shell-run").disabled = true;
  try {
    const r = await api("POST", `/api/sessions/${sid(state.current)}/tools/RunShellCommand`, { json: { command } });
    if (r.stdout) out.add({ output_type: "stream", name: "stdout", text: r.stdout });
    if (r.stderr) out.add({ output_type: "stream", name: "stderr", text: r.stderr });
    const ok = r.status === "success";
    const status = ok ? "exit 0" : (r.error ? `${r.error.ename}: ${r.error.evalue}` : `exit ${r.exit_code}`);
    box.append(el("p", { className: `exit ${ok ? "ok" : "bad"}`, textContent: status }));
    if (r.notice) box.append(el("p", { className: "muted", textContent: r.notice }));
  } finally {
    $("shell-run").disabled = false;
  }
}));

// -- files ----------------------------------------------------------------------------------

async function refreshFiles() {
  if (!state.current) return;
  const id = state.current;
  const files = await api("GET", `/api/sessions/${sid(id)}/files`);
  const tbody = $("files").querySelector("tbody");
  tbody.replaceChildren(...files.map((f) => el("tr", { dataset: { path: f.path } },
    el("td", { textContent: f.path }),
    el("td", { textContent: fmtBytes(f.size) }),
    el("td", { textContent: f.modified.replace("T", " ").replace(/\.\d+Z$/, "Z") }),
    el("td", {},
      el("button", { type: "button", className: "download", textContent: "Download",
                     onclick: guarded(() => downloadFile(id, f.path)) }),
      el("button", { type: "button", className: "delete danger", textContent: "Delete",
                     onclick: guarded(() => deleteFile(id, f.path)) })))));
  if (!files.length) tbody.append(el("tr", {}, el("td", { colSpan: 4, className: "muted", textContent: "No files." })));
}

async function downloadFile(id, path) {
  const r = await api("GET", `/api/sessions/${sid(id)}/files/${filePath(path)}`, { raw: true });
  saveBlob(await r.blob(), path.split("/").pop());
}

async function deleteFile(id, path) {
  if (!confirm(`Delete ${path}?`)) return;
  await api("DELETE", `/api/sessions/${sid(id)}/files/${filePath(path)}`);
  await refreshFiles();
}

async function upload(fileList) {
  if (!state.current) return;
  const files = [...fileList];
  for (const f of files) {
    $("files-message").textContent = `Uploading ${f.name} (${fmtBytes(f.size)})…`;
    const form = new FormData();
    form.append("file", f, f.name);
    await api("POST", `/api/sessions/${sid(state.current)}/files`, { body: form });
  }
  $("files-message").textContent = `Uploaded ${files.map((f) => f.name).join(", ")}.`;
  await refreshFiles();
}

const drop = $("dropzone");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", guarded(async (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  await upload(ev.dataTransfer.files);
}));
$("file-input").addEventListener("change", guarded(async (ev) => {
  await upload(ev.target.files);
  ev.target.value = "";
}));

// -- transcript ---------------------------------------------------------------------------

async function loadTranscript() {
  if (!state.current) return;
  const nb = await api("GET", `/api/sessions/${sid(state.current)}/transcript`);
  const box = $("transcript");
  box.replaceChildren();
  if (!nb.cells || !nb.cells.length) {
    box.append(el("p", { className: "muted", textContent: "Nothing has run in this session yet." }));
    return;
  }
  for (const c of nb.cells) {
    const source = Array.isArray(c.source) ? c.source.join("") : c.source;
    const meta = (c.metadata && c.metadata.broker) || {};
    const label = c.cell_type === "code" ? `In [${c.execution_count ?? " "}]:` : c.cell_type;
    const cell = el("div", { className: `cell transcript-cell ${c.cell_type}` },
      el("div", { className: "cell-input" },
        el("span", { className: "prompt", textContent: label }),
        el("pre", { className: "code", textContent: source })));
    if (meta.tool) cell.prepend(el("p", { className: "muted", textContent: `via ${meta.tool}` }));
    const outs = el("div", { className: "outputs" });
    for (const o of c.outputs || []) outs.append(renderOutput(o));
    cell.append(outs);
    box.append(cell);
  }
}

$("transcript-reload").addEventListener("click", guarded(loadTranscript));
$("transcript-download").addEventListener("click", guarded(async () => {
  const id = state.current;
  const r = await api("GET", `/api/sessions/${sid(id)}/transcript`, { raw: true });
  saveBlob(new Blob([await r.arrayBuffer()], { type: "application/x-ipynb+json" }), `session-${id}.ipynb`);
}));

// -- admin ------------------------------------------------------------------------------------

async function refreshAdmin() {
  const r = await api("GET", "/api/admin/sessions");
  const tbody = $("admin-table").querySelector("tbody");
  tbody.replaceChildren(...r.sessions.map((s) => el("tr", { dataset: { id: s.id } },
    el("td", { textContent: s.id, title: s.id, className: "id" }),
    el("td", { textContent: s.owner }),
    el("td", { textContent: s.state + (s.executing ? " (running)" : "") }),
    el("td", { textContent: fmtSeconds(s.age_seconds) }),
    el("td", { textContent: fmtSeconds(s.idle_seconds) }),
    el("td", { textContent: fmtBytes(s.memory_bytes) }),
    el("td", { textContent: s.cpu_seconds == null ? "" : `${s.cpu_seconds.toFixed(1)} s` }),
    el("td", { textContent: fmtBytes(s.disk_bytes) }),
    el("td", {}, el("button", { type: "button", className: "end danger", textContent: "End",
      onclick: guarded(async () => {
        if (!confirm(`End ${s.owner}'s session ${s.id}?`)) return;
        await api("DELETE", `/api/admin/sessions/${sid(s.id)}`);
        if (s.id === state.current) closeSession();
        await refreshAdmin();
        await refreshSessions();
      }) })))));
  if (!r.sessions.length) tbody.append(el("tr", {}, el("td", { colSpan: 9, className: "muted", textContent: "No sessions." })));
}

$("admin-refresh").addEventListener("click", guarded(refreshAdmin));

// -- start --------------------------------------------------------------------------------------

if (getToken()) {
  signIn(getToken()).catch(() => signOut("Your saved token was refused; sign in again."));
}
document.body.dataset.ready = "1";
