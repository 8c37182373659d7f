// Output of user code, shown without ever running as this page:
// text via textContent (ANSI colours become classes), images as data: URLs,
// HTML inside <iframe sandbox srcdoc> (an opaque origin with no scripts; the
// page's CSP is inherited by srcdoc frames as well).

const ANSI_RE = /\x1b\[([0-9;]*)m/g;
const OTHER_ESC_RE = /\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07/g;

// Text with ANSI SGR colour codes -> a DocumentFragment of <span>s.
export function ansiToFragment(text) {
  const frag = document.createDocumentFragment();
  let fg = null, bold = false, last = 0;
  const push = (s) => {
    if (!s) return;
    s = s.replace(OTHER_ESC_RE, "");
    if (fg === null && !bold) { frag.append(document.createTextNode(s)); return; }
    const span = document.createElement("span");
    if (fg !== null) span.className = `ansi-fg-${fg}`;
    if (bold) span.classList.add("ansi-bold");
    span.textContent = s;
    frag.append(span);
  };
  for (const m of text.matchAll(ANSI_RE)) {
    push(text.slice(last, m.index));
    last = m.index + m[0].length;
    const codes = m[1] === "" ? [0] : m[1].split(";").map(Number);
    for (const c of codes) {
      if (c === 0) { fg = null; bold = false; }
      else if (c === 1) bold = true;
      else if (c === 22) bold = false;
      else if (c === 39) fg = null;
      else if (c >= 30 && c <= 37) fg = c - 30;
      else if (c >= 90 && c <= 97) fg = c - 90 + 8;
    }
  }
  push(text.slice(last));
  return frag;
}

export function stripAnsi(text) {
  return text.replace(ANSI_RE, "").replace(OTHER_ESC_RE, "");
}

function joined(v) {
  return Array.isArray(v) ? v.join("") : (v == null ? "" : String(v));
}

function pre(text, cls) {
  const p = document.createElement("pre");
  p.className = cls;
  p.append(ansiToFragment(text));
  return p;
}

function htmlFrame(html) {
  const f = document.createElement("iframe");
  f.className = "html-output";
  f.setAttribute("sandbox", "");            // no scripts, no forms, opaque origin
  f.setAttribute("referrerpolicy", "no-referrer");
  f.title = "HTML output (sandboxed)";
  f.srcdoc = html;
  return f;
}

const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];

// A mime bundle (display_data / execute_result data) -> one element.
export function renderData(data) {
  for (const t of IMAGE_TYPES) {
    if (data[t]) {
      const img = document.createElement("img");
      img.className = "image-output";
      img.alt = joined(data["text/plain"]) || t;
      img.src = `data:${t};base64,${joined(data[t]).replace(/\s/g, "")}`;
      return img;
    }
  }
  if (data["image/svg+xml"]) {
    // As an <img>: an SVG shown this way cannot run script.
    const img = document.createElement("img");
    img.className = "image-output";
    img.alt = "SVG output";
    img.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(joined(data["image/svg+xml"]));
    return img;
  }
  if (data["text/html"]) return htmlFrame(joined(data["text/html"]));
  if (data["text/markdown"]) return pre(joined(data["text/markdown"]), "output text");
  if (data["application/json"]) return pre(JSON.stringify(data["application/json"], null, 2), "output text");
  if (data["text/plain"] !== undefined) return pre(joined(data["text/plain"]), "output text");
  const p = document.createElement("pre");
  p.className = "output text";
  p.textContent = `[output of type ${Object.keys(data).join(", ")} not shown]`;
  return p;
}

// One nbformat-style output ({output_type, ...}) -> element.
export function renderOutput(out) {
  switch (out.output_type) {
    case "stream":
      return pre(joined(out.text), `output stream ${out.name === "stderr" ? "stderr" : "stdout"}`);
    case "error": {
      const tb = out.traceback && out.traceback.length ? out.traceback.join("\n")
        : `${out.ename}: ${out.evalue}`;
      return pre(tb, "output error");
    }
    case "display_data":
    case "execute_result":
    case "update_display_data":
      return renderData(out.data || {});
    default: {
      const p = document.createElement("pre");
      p.className = "output text";
      p.textContent = `[${out.output_type}]`;
      return p;
    }
  }
}

// Outputs area that merges consecutive stream chunks of the same name, so
// streaming text reads as one block (as in Jupyter).
export class OutputArea {
  constructor(el) {
    this.el = el;
    this.lastStream = null;
  }
  clear() {
    this.el.replaceChildren();
    this.lastStream = null;
  }
  add(out) {
    if (out.output_type === "stream" && this.lastStream && this.lastStream.name === out.name) {
      this.lastStream.text += joined(out.text);
      this.lastStream.node.replaceChildren(ansiToFragment(this.lastStream.text));
      return;
    }
    const node = renderOutput(out);
    this.el.append(node);
    this.lastStream = out.output_type === "stream" ? { name: out.name, text: joined(out.text), node } : null;
  }
}
