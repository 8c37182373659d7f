"""What a model is shown: the markdown of every tool result, its size
budget, and the structured list of outputs.

Decided here, in one place next to the tools, so that REST, MCP, the Azure
API and any page agree (see docs/results.md):

- every output of a cell reaches ``markdown`` in the order the code produced
  it: streams, results, rich displays (``text/markdown`` as is, HTML tables
  such as DataFrames as markdown tables, other HTML as text, LaTeX as its
  source, JSON pretty-printed, images inline) and errors;
- ``outputs`` keeps each of them as ``{type, mimes, text}`` (the text shown),
  so a client can render the MIME bundle itself from the transcript;
- a result has a budget (``ResultSettings``): long texts keep their head and
  tail with an exact count of what was cut, long lists of files are
  summarised by folder, images past a count are listed instead of inlined;
  ``truncated`` says what was cut and the notice says where the whole is
  (a file under ``/mnt/data/outputs/``, readable with ReadSessionFile).

Nothing here talks to a kernel or a web framework: the tools hand over what
happened, this module decides how it reads.
"""

from __future__ import annotations

import base64
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Callable

from bs4 import BeautifulSoup
from markdownify import MarkdownConverter
from traitlets import Integer
from traitlets.config import LoggingConfigurable

from broker.execution import DROPPED, strip_ansi
from broker.sandbox.settings import ByteSize

DATA = "/mnt/data/"
# A repr that says nothing ("<IPython.core.display.HTML object>").
BARE_REPR = re.compile(r"^<[\w.]+ (object|at 0x[0-9a-f]+)[^>]*>$")
DATA_URI = re.compile(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+")


class ResultSettings(LoggingConfigurable):
    """How much of a tool result is shown, and how the rest is summarised."""

    max_markdown_chars = Integer(8000, min=2000, config=True, help="""Budget of a result's markdown, in
        characters (data: image URIs, asked for with ?images=data, are not counted). Past it, the longest
        outputs keep their head and tail with a count of what was cut; the whole text of a cut stream or
        display is written to /mnt/data/outputs/ and the notice names the file.""")
    max_json_bytes = ByteSize(64 << 10, config=True, help="""Budget of a whole tool result as JSON (data:
        image URIs not counted). Past it, stdout, stderr, the traceback and long lists are cut the same way,
        and say so in 'truncated'.""")
    max_inline_images = Integer(8, min=0, config=True, help="""Images shown inline in one result; the
        images past this count are listed as links instead.""")
    max_file_links = Integer(20, min=1, config=True, help="""New or changed files listed one by one in a
        result; past it they are summarised by folder (count, total size, the first few links and how to
        list the rest). The structured counts stay exact.""")
    links_per_folder = Integer(3, min=0, config=True, help="Links shown per folder when files are summarised.")
    max_folders = Integer(10, min=1, config=True, help="Folders shown when files are summarised by folder.")
    max_list_rows = Integer(100, min=1, config=True, help="""Files ListSessionFiles lists one by one; past it
        the answer is a summary by folder plus the first rows (the count stays exact).""")


# -- text pieces -------------------------------------------------------------------------

def fence(text: str, lang: str = "text") -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def cut_middle(text: str, limit: int) -> tuple[str, int]:
    """*text* within *limit* characters: its head and tail around a marker
    that counts what was left out (characters and lines, exact).  Cuts fall
    on line ends when one is near.  Returns (text, characters cut)."""
    if len(text) <= limit:
        return text, 0
    room = max(limit - 80, 40)
    head_n, tail_n = room * 2 // 3, room - room * 2 // 3
    head, tail = text[:head_n], text[len(text) - tail_n:]
    nl = head.rfind("\n")
    if nl >= head_n // 2:
        head = head[:nl + 1]
    nl = tail.find("\n")
    if 0 <= nl < tail_n // 2:
        tail = tail[nl + 1:]
    gone = text[len(head):len(text) - len(tail)]
    lines = gone.count("\n")
    what = plural(len(gone), "character") + (f", {plural(lines, 'line')}" if lines else "")
    if not head.endswith("\n"):
        head += "\n"
    return f"{head}[… {what} not shown …]\n{tail}", len(gone)


def cut_head(text: str, limit: int) -> str:
    """The first *limit* characters of *text*, ending at a line end when one is near."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    nl = head.rfind("\n")
    return head[:nl + 1] if nl >= limit // 2 else head


# -- rich displays as text -----------------------------------------------------------------

class _Converter(MarkdownConverter):
    """HTML to markdown: tables stay tables, images become their alt text
    (an HTML page's image links point nowhere a model can follow)."""

    def convert_img(self, el, text, *args, **kwargs):
        alt = el.attrs.get("alt") or ""
        return f"[image: {alt}]" if alt else ""


def html_to_markdown(html: str) -> str:
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["style", "script", "head", "noscript", "template"]):
        tag.decompose()
    text = _Converter(heading_style="ATX", bullets="-", table_infer_header=True).convert_soup(soup)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _plain(data: dict) -> str:
    plain = data.get("text/plain", "")
    if isinstance(plain, list):
        plain = "".join(plain)
    return plain if plain and not BARE_REPR.match(plain.strip()) else ""


def _joined(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def display_text(data: dict) -> tuple[str, str, str | None]:
    """(text, kind, fence language or None) for a MIME bundle without an
    image: the form a model reads best.  *kind* is the MIME type the text
    came from; text with a language is shown in a code block."""
    if "text/markdown" in data:
        return _joined(data["text/markdown"]).strip(), "text/markdown", None
    if "text/html" in data:
        md = html_to_markdown(_joined(data["text/html"]))
        if md:
            return md, "text/html", None
    if "text/latex" in data:
        return _joined(data["text/latex"]).strip(), "text/latex", None
    if "application/json" in data:
        value = data["application/json"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return value, "application/json", "json"
        return json.dumps(value, indent=2, ensure_ascii=False, default=str), "application/json", "json"
    plain = _plain(data)
    if plain:
        return plain, "text/plain", "text"
    other = [m for m in data if m != "text/plain"]
    if other:
        return f"_(a {other[0]} output: open the session's transcript to see it)_", other[0], None
    return "", "text/plain", None


# -- the blocks of a result ------------------------------------------------------------------

@dataclass
class Block:
    """One piece of a result's markdown.  *body* is what the budget may cut
    (kept unfenced so that a cut does not break the fence); with *lang* it
    is shown in a code block."""
    body: str
    prefix: str = ""
    lang: str | None = None           # shown in a code block of this language
    cuttable: bool = True
    output: dict | None = None        # the entry of ``outputs`` this block shows
    full: str | None = None           # where the whole text is, once cut
    key: str = ""                     # name for a saved copy ("stdout", "output-3")
    cut: int = 0                      # characters cut
    whole: str = ""                   # the body before it was cut
    image: dict | None = None         # the image entry an image block shows

    def render(self, body: str | None = None) -> str:
        body = self.body if body is None else body
        return self.prefix + (fence(body, self.lang) if self.lang else body)

    def size(self) -> int:
        return len(DATA_URI.sub("data:", self.render()))


@dataclass
class Shaped:
    """What the tools hand over for one Python or shell call."""
    blocks: list[Block] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _stream_block(name: str, text: str) -> Block:
    out = {"type": "stream", "name": name, "mimes": ["text/plain"], "text": text}
    return Block(text, prefix="stderr:\n" if name == "stderr" else "", lang="text", output=out, key=name)


def _error_block(err: dict) -> Block:
    head = f"**{err.get('ename', '')}**: {err['evalue']}" if err.get("evalue") else f"**{err.get('ename', '')}**"
    tb = err.get("traceback") or ""
    out = {"type": "error", "mimes": [], "text": f"{err.get('ename', '')}: {err.get('evalue', '')}", "ename":
           err.get("ename", ""), "evalue": err.get("evalue", "")}
    if not tb:
        return Block(head, cuttable=False, output=out)
    return Block(tb, prefix=head + "\n\n", lang="text", output=out, key="traceback")


def _image_md(entry: dict) -> str:
    return f"![{entry['name']}]({entry['url']})"


def python_blocks(raw_outputs: list, shown_images: dict, error: dict | None) -> Shaped:
    """The blocks of an execution, in the order the code produced them.
    *raw_outputs*: the executor's outputs (stream dicts, or ``{"msg": ...}``
    kernel messages); *shown_images*: ``id(output) -> image entry`` for the
    outputs whose image became a file (None: the same bytes as an image file
    the code saved, which is shown after the outputs)."""
    s = Shaped()
    last_error = None
    for n, item in enumerate(raw_outputs):
        if item.get("output_type") == "stream":
            b = _stream_block(item.get("name", "stdout"), item.get("text", ""))
        else:
            msg = item["msg"]
            t, c = msg["msg_type"], msg["content"]
            if t == "error":
                last_error = {"ename": c.get("ename", ""), "evalue": c.get("evalue", ""),
                              "traceback": strip_ansi("\n".join(c.get("traceback", [])))}
                b = _error_block(last_error)
            else:
                data = c.get("data", {})
                kind = "execute_result" if t == "execute_result" else "display_data"
                out = {"type": kind, "mimes": sorted(data)}
                entry = shown_images.get(id(item))
                if entry is None and id(item) in shown_images:
                    # The same picture as an image file reported after the outputs.
                    out["text"] = "(the same image as a file in 'images')"
                    s.outputs.append(out)
                    continue
                if entry is not None:
                    # A data: URI (?images=data) is in 'images' and the markdown already.
                    out.update(text=DATA_URI.sub("data:…", _image_md(entry)), image={"path": entry["path"]})
                    b = Block(_image_md(entry), cuttable=False, output=out, image=entry)
                elif any(m.startswith("image/") for m in data):
                    out["text"] = _plain(data) or "(image not kept: see 'truncated')"
                    b = Block(f"_{out['text']}_", cuttable=False, output=out)
                else:
                    text, source, lang = display_text(data)
                    if not text:
                        continue
                    out["text"] = text
                    out["shown_as"] = source
                    b = Block(text, lang=lang, output=out, key=f"output-{n + 1}")
        if b.output is not None and "text" not in b.output:
            b.output["text"] = b.body
        s.blocks.append(b)
        s.outputs.append(b.output)
    if error and (last_error is None or last_error.get("ename") != error.get("ename")):
        b = _error_block(error)
        s.blocks.append(b)
        s.outputs.append(b.output)
    return s


def shell_blocks(stdout: str, stderr: str, error: dict | None) -> Shaped:
    s = Shaped()
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if text:
            b = _stream_block(name, text)
            s.blocks.append(b)
            s.outputs.append(b.output)
    if error:
        b = _error_block(error)
        s.blocks.append(b)
        s.outputs.append(b.output)
    return s


# -- lists of files ------------------------------------------------------------------------

def _folder(path: str) -> str:
    rel = path[len(DATA):] if path.startswith(DATA) else path.lstrip("/")
    return posixpath.dirname(rel)


def _group(entries: list[dict], max_folders: int) -> dict[str, list[dict]]:
    """Entries by folder; folders are merged into their ancestors, deepest
    first, until at most *max_folders* remain (or only top-level ones do)."""
    depth = max((_folder(e["path"]).count("/") + 1 for e in entries if _folder(e["path"])), default=0)
    while True:
        groups: dict[str, list[dict]] = {}
        for e in entries:
            parts = [p for p in _folder(e["path"]).split("/") if p]
            groups.setdefault("/".join(parts[:depth]), []).append(e)
        if len(groups) <= max_folders or depth <= 1:
            return groups
        depth -= 1


def file_list(entries: list[dict], settings: ResultSettings, what: str = "file", threshold: int | None = None,
              link: Callable[[dict], None] | None = None) -> tuple[str, list[dict], dict]:
    """Markdown for new or changed files: each as a link, or past
    ``max_file_links`` a summary by folder.  Returns (markdown, the entries
    linked, the summary for ``truncated`` or {} when nothing was left out)."""
    if not entries:
        return "", [], {}
    if len(entries) <= (settings.max_file_links if threshold is None else threshold):
        return "\n".join(f"- [{e['name']}]({e['url']}) ({human(e['size'])})" for e in entries), list(entries), {}
    groups = _group(entries, settings.max_folders)
    total = sum(e["size"] for e in entries)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    lines = [f"**{plural(len(entries), what)}** ({human(total)}), by folder:"]
    linked: list[dict] = []
    folders = []
    for name, items in ordered[:settings.max_folders]:
        size = sum(e["size"] for e in items)
        shown = items[:settings.links_per_folder]
        if link is not None:
            for e in shown:
                link(e)
        linked.extend(shown)
        links = ", ".join(f"[{posixpath.basename(e['path'])}]({e['url']})" for e in shown)
        more = len(items) - len(shown)
        label = f"/mnt/data/{name}/" if name else "/mnt/data/"
        lines.append(f"- `{label}`: {plural(len(items), what)}, {human(size)}: {links}"
                     + (f" and {more:,} more" if more else ""))
        folders.append({"path": label.rstrip("/"), "count": len(items), "size": size})
    rest = ordered[settings.max_folders:]
    if rest:
        n = sum(len(items) for _, items in rest)
        lines.append(f"- and {plural(len(rest), 'more folder')} with {plural(n, what)}")
    example = ordered[0][0]
    lines.append(f"List a folder with ListSessionFiles {{\"path\": \"{example or ''}\"}} or RunShellCommand "
                 f"`ls -la {example or '.'}`.")
    summary = {"count": len(entries), "listed": len(linked), "bytes": total, "folders": folders,
               "more_folders": len(rest)}
    return "\n".join(lines), linked, summary


def image_lists(images: list[dict], settings: ResultSettings) -> tuple[list[dict], list[dict]]:
    """(inlined, listed): the first ``max_inline_images`` are shown inline."""
    n = settings.max_inline_images
    return images[:n], images[n:]


# -- the budget ------------------------------------------------------------------------------

def _water_level(sizes: list[int], room: int) -> int:
    """The largest cap c with sum(min(s, c)) <= room."""
    if sum(sizes) <= room:
        return max(sizes, default=0)
    lo, hi = 0, max(sizes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(s, mid) for s in sizes) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_blocks(blocks: list[Block], budget: int) -> None:
    """Cut the cuttable blocks so the joined markdown fits *budget*: the
    longest are cut first, each to the same cap (their head and tail kept)."""
    sep = 2 * max(len(blocks) - 1, 0)
    fixed = sum(b.size() for b in blocks if not b.cuttable) + sep
    cuttable = [b for b in blocks if b.cuttable]
    if not cuttable:
        return
    # The wrapping (prefix, fence) of a cuttable block is fixed too; a cut adds a marker line.
    overhead = [b.size() - len(b.body) for b in cuttable]
    room = budget - fixed - sum(overhead) - 90 * len(cuttable)
    sizes = [len(b.body) for b in cuttable]
    if sum(sizes) + sum(overhead) + fixed <= budget:
        return
    cap = max(_water_level(sizes, max(room, 0)), 200)
    for b in cuttable:
        if len(b.body) > cap:
            b.whole = b.body
            b.body, b.cut = cut_middle(b.body, cap)
            if b.output is not None:
                b.output["text"] = b.body


def markdown_of(blocks: list[Block]) -> str:
    return "\n\n".join(b.render() for b in blocks if b.render())


def json_size(result: dict) -> int:
    return len(DATA_URI.sub("data:", json.dumps(result, ensure_ascii=False, default=str)).encode())


def _encoded(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode())


def fit_json(result: dict, fields: list[tuple[dict, str]], budget: int) -> dict:
    """Cut the long strings ``container[key]`` for each of *fields* (head and
    tail kept) so that *result* fits *budget* bytes as JSON.  Returns
    {key: characters cut}."""
    cut: dict = {}
    # Most results are small: a bound that needs no encoding (an escape is at
    # most 6 bytes per character, an entry of a list a few hundred, the
    # outputs' texts about the markdown again).
    rough = sum(len(v) for v in result.values() if isinstance(v, str)) + len(result.get("markdown") or "") + sum(
        len(c.get(k) or "") for c, k in fields if c is not None and c is not result) + sum(
        400 * len(v) for v in result.values() if isinstance(v, list))
    if rough * 6 < budget:
        return cut
    for _attempt in range(4):
        over = json_size(result) - budget
        if over <= 0:
            break
        present = [(c, k) for c, k in fields if c is not None and isinstance(c.get(k), str) and len(c[k]) > 200]
        if not present:
            break
        # Sizes as JSON (escapes and UTF-8 count), turned back into characters per field.
        enc = [_encoded(c[k]) for c, k in present]
        level = _water_level(enc, max(sum(enc) - over - 200 * len(present), 0))
        for (c, k), e in zip(present, enc):
            if e > level:
                limit = max(int(level * len(c[k]) / e), 200)
                c[k], n = cut_middle(c[k], limit)
                cut[k] = cut.get(k, 0) + n
    return cut


# -- one result, shaped ------------------------------------------------------------------------

def shape_run(result: dict, shaped: Shaped, settings: ResultSettings, save: Callable[[str, str], str | None],
              full: dict[str, str]) -> dict:
    """Finish the result of ExecutePythonCode, GeneratePdfReport or
    RunShellCommand: images and files listed within their counts, the
    markdown within its budget, the structured fields within the JSON
    budget, ``truncated`` and the notice saying what was cut and where the
    whole is.

    *full*: the whole text of each stream ("stdout", "stderr") as captured;
    *save(key, text)*: writes *text* where a model can read it and returns
    its /mnt/data path (or None when it could not)."""
    truncated = dict(result.get("truncated") or {})
    blocks = list(shaped.blocks)
    notes = list(shaped.notes)
    # The executor's own caps, counted as it kept them.
    if isinstance(truncated.get("outputs"), int):
        truncated["outputs"] = {"dropped": truncated["outputs"]}
        notes.append(f"{plural(truncated['outputs']['dropped'], 'more rich output')} past the executor's "
                     "limit per cell were dropped.")
    for name in ("stdout", "stderr"):
        last = [b for b in blocks if b.output and b.output.get("type") == "stream" and b.output["name"] == name]
        if isinstance(truncated.get(name), int) and last:
            last[-1].body += DROPPED.format(name=name, n=truncated[name])
            last[-1].output["text"] = last[-1].body
    too_large = truncated.pop("images") if isinstance(truncated.get("images"), int) else 0
    if too_large:
        truncated["images"] = {"too_large": too_large}
        notes.append(f"{plural(too_large, 'image')} over the size limit per image were not kept.")

    # Images: those shown by a display keep its place; saved files follow
    # the outputs.  Past max_inline_images they are links.
    images = result.get("images", [])
    placed = [b for b in blocks if b.image is not None]
    placed_ids = {id(b.image) for b in placed}
    limit = settings.max_inline_images
    for n, b in enumerate(placed):
        if n >= limit:
            b.body = f"[{b.image['name']}]({b.image['url']}) (image, not inlined)"
    rest = [e for e in images if id(e) not in placed_ids]
    room = max(limit - len(placed), 0)
    inline_rest, listed_images = rest[:room], rest[room:]
    for e in inline_rest:
        blocks.append(Block(_image_md(e), cuttable=False))
    kept = [e for e in images if id(e) in placed_ids or e in inline_rest]
    if listed_images:
        md, linked, _ = file_list(listed_images, settings, "image")
        blocks.append(Block("Images not inlined:\n" + md, cuttable=False))
        kept += linked
    if len(images) > limit:
        order = {id(e): i for i, e in enumerate(images)}
        result["images"] = sorted(kept, key=lambda e: order[id(e)])
        truncated["images"] = {**truncated.get("images", {}), "count": len(images), "inlined": limit,
                               "listed": len(result["images"])}
        notes.append(f"{plural(len(images), 'image')}: the first {limit} are shown inline, the rest as links.")

    files = result.get("files", [])
    md, linked, summary = file_list(files, settings)
    if md:
        blocks.append(Block(md, cuttable=False))
    if summary:
        truncated["files"] = summary
        result["files"] = linked
        notes.append(f"{plural(len(files), 'new or changed file')}, summarised by folder; 'files' holds the "
                     f"{len(linked)} linked.")
    result["image_count"] = len(images)
    result["file_count"] = len(files)

    # The markdown within its budget (the notice, written last, is kept whole).
    reserve = len(result.get("notice") or "") + 700
    fit_blocks(blocks, settings.max_markdown_chars - reserve)
    result["outputs"] = shaped.outputs
    result["markdown"] = markdown_of(blocks)
    # The structured fields within the JSON budget, the notice's room kept.
    err = result.get("error") if isinstance(result.get("error"), dict) else None
    json_cut = fit_json(result, [(result, "stdout"), (result, "stderr"), (result, "result"), (err, "traceback")],
                        settings.max_json_bytes - 2 * reserve)

    saved: dict[str, str | None] = {}

    def keep(key: str, text: str) -> str | None:
        if key not in saved:
            saved[key] = save(key, text)
        return saved[key]

    for b in blocks:
        if b.cut:
            stream = b.output.get("name") if b.output and b.output.get("type") == "stream" else None
            b.full = keep(stream, full.get(stream) or "") if stream else keep(b.key or "output", b.whole)
            if b.output is not None:
                b.output["full"] = b.full
    for name in ("stdout", "stderr"):
        md_cut = sum(b.cut for b in blocks if b.output and b.output.get("name") == name)
        dropped = truncated.get(name)
        if not (md_cut or json_cut.get(name) or dropped):
            continue
        entry = {"chars": len(full.get(name) or ""), "shown": len(result.get(name) or "")}
        if isinstance(dropped, int):
            entry["dropped"] = dropped
        if md_cut:
            entry["cut_in_markdown"] = md_cut
        if md_cut or json_cut.get(name):
            entry["file"] = keep(name, full.get(name) or "")
        truncated[name] = entry
    cut_displays = [b for b in blocks if b.cut and not (b.output and b.output.get("type") == "stream")]
    if cut_displays:
        truncated["displays"] = [{"type": (b.output or {}).get("type", ""), "chars_cut": b.cut, "file": b.full}
                                 for b in cut_displays]
    for key in ("result", "traceback"):
        if json_cut.get(key):
            truncated[key] = {"chars_cut": json_cut[key]}
    if saved:
        what = ", ".join(sorted(saved))
        where = sorted({p for p in saved.values() if p})
        if where:
            notes.append(f"Long output ({what}) is cut to its head and tail here; the whole text is in "
                         f"{', '.join(where)} (read it with ReadSessionFile, search it with SearchSessionFiles).")
        else:
            notes.append(f"Long output ({what}) is cut to its head and tail here; the whole text is kept in "
                         "the session's transcript (/mnt/data could not hold it).")
    notice = " ".join(x for x in [result.get("notice") or "", *notes] if x).strip()
    result["notice"] = notice
    if notice:
        blocks.append(Block(f"_{notice}_", cuttable=False))
    md = markdown_of(blocks)
    if not md:
        md = "_(no output)_" if result.get("status") == "success" else f"_{result.get('status')}_"
    result["markdown"] = md
    result["truncated"] = truncated
    return result


# -- the file tools ----------------------------------------------------------------------------

def _utf8(data: bytes) -> str | None:
    """*data* as UTF-8, allowing a character cut by the read's end; None for binary."""
    for trim in range(4):
        try:
            return data[:len(data) - trim].decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(data) - 4:
                return None
    return None


def read_view(data: bytes, offset: int, size: int, entry: dict, image: bool, settings: ResultSettings) -> dict:
    """ReadSessionFile's content within the budget: text up to the markdown
    budget (the content is what the markdown shows), binary up to the JSON
    budget as base64.  ``next_offset`` says where to read on."""
    name = posixpath.basename(entry["path"])
    text = _utf8(data)
    if text is not None:
        shown = cut_head(text, settings.max_markdown_chars - 400)
        used = len(shown.encode("utf-8"))
        out = {"encoding": "utf-8", "content": shown}
        md = fence(shown)
    else:
        used = min(len(data), max(settings.max_json_bytes - 4096, 1024) * 3 // 4)
        out = {"encoding": "base64", "content": base64.b64encode(data[:used]).decode()}
        md = f"![{name}]({entry['url']})" if image else f"Binary file ({human(size)}): [{name}]({entry['url']})"
    end = offset + used
    out["truncated"] = end < size
    out["next_offset"] = end if end < size else None
    if used < len(data):
        out["cut"] = {"asked": len(data), "returned": used}
    if end < size:
        md += (f"\n\n_Showing bytes {offset:,}–{end:,} of {size:,}. Read on with ReadSessionFile "
               f"{{\"path\": \"{entry['path']}\", \"offset\": {end}}}, search it with SearchSessionFiles, or "
               f"download it: [{name}]({entry['url']})._")
    out["markdown"] = md
    return out


def search_view(matches: list[dict], stopped: bool, max_results: int, settings: ResultSettings) -> dict:
    """SearchSessionFiles' matches within the budgets; ``count`` stays exact."""
    budget = settings.max_markdown_chars - 400
    lines, used = [], 0
    for m in matches:
        line = f"{m['path'][len(DATA):]}:{m['line']}:{m['text']}"
        if used + len(line) + 1 > budget:
            break
        lines.append(line)
        used += len(line) + 1
    listed = matches
    room = settings.max_json_bytes - budget * 2 - 2048
    size = 0
    for n, m in enumerate(matches):
        size += len(json.dumps(m, ensure_ascii=False).encode()) + 2
        if size > room:
            listed = matches[:n]
            break
    md = fence("\n".join(lines)) if lines else "_No matches._"
    notes = []
    if len(lines) < len(matches):
        notes.append(f"showing {len(lines):,} of {len(matches):,} matches")
    if stopped:
        notes.append(f"stopped at maxResults={max_results}")
    if notes:
        md += f"\n\n_{'; '.join(notes).capitalize()}. Narrow the search with path, glob or a more specific pattern._"
    out = {"matches": listed, "count": len(matches), "truncated": stopped or len(listed) < len(matches),
           "markdown": md}
    if len(listed) < len(matches) or len(lines) < len(matches):
        out["listed"] = len(listed)
    return out


def listing_view(entries: list[dict], where: str, capped: bool, settings: ResultSettings,
                 link: Callable[[dict], None]) -> dict:
    """ListSessionFiles within the budgets: a table, or past ``max_list_rows``
    a summary by folder and the first rows; ``count`` stays exact.  *link*
    gives an entry its signed ``url``: only the entries returned get one."""
    out = {"count": len(entries)}
    for e in entries[:settings.max_list_rows]:
        link(e)
    if not entries:
        out.update(files=[], markdown="_/mnt/data is empty._" if not where else f"_/mnt/data/{where} is empty._")
        return out
    rows = ["| name | size | modified | type |", "|---|---:|---|---|"]
    rows += [f"| {e['path'][len(DATA):]} | {human(e['size'])} | {e['modified']} | {e['type']} |"
             for e in entries[:settings.max_list_rows]]
    table = "\n".join(rows)
    if len(entries) <= settings.max_list_rows and len(table) <= settings.max_markdown_chars - 400:
        out.update(files=entries, markdown=table)
        return out
    md, _, summary = file_list(entries, settings, threshold=0, link=link)
    listed = entries[:settings.max_list_rows]
    cap = " (the listing stops there: list a folder to see the rest)" if capped else ""
    md += (f"\n\n_{plural(len(entries), 'file')}{cap}; 'files' holds the first {len(listed):,}. "
           f"For every file use RunShellCommand (`find . -type f | sort`)._")
    summary["listed"] = len(listed)
    out.update(files=listed, markdown=md, truncated={"files": summary})
    return out
