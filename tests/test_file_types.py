"""Every supported file type family (the seed's "Supported file types") can be
read inside the sandbox with the preinstalled libraries.

Each test writes a small file of that type into the kernel's data folder on
the host (with host-side libraries, so only the reader runs in the sandbox),
reads it at /mnt/data inside the kernel, and checks what the kernel read back
against what was written.  The kernel answers with one JSON line.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import pickle
import tarfile
import textwrap
import zipfile

import pytest

from tests.harness import SandboxKernel


@pytest.fixture(scope="module")
def k(hooked_kernel) -> SandboxKernel:
    return hooked_kernel


def put(k, name: str, data: bytes | str) -> str:
    """Write a file into the data folder, owned like the folder (the sandbox's uid)."""
    path = os.path.join(k.data_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    st = os.stat(k.data_dir)
    os.chown(path, st.st_uid, st.st_gid)
    return path


def host_path(k, name: str) -> str:
    return os.path.join(k.data_dir, name)


def ask(k, code: str):
    """Run *code* in the sandbox; it must end by printing one JSON value."""
    r = k.run(textwrap.dedent(code))
    assert r.status == "ok", r
    lines = r.stdout.strip().splitlines()
    assert lines, r
    return json.loads(lines[-1])


ROWS = [
    {"host": "web-01", "region": "eu", "errors": 3, "latency_ms": 120.5},
    {"host": "web-02", "region": "us", "errors": 0, "latency_ms": 98.25},
    {"host": "db-01", "region": "eu", "errors": 7, "latency_ms": 310.0},
]
TOTAL_ERRORS = sum(r["errors"] for r in ROWS)


def _delimited(delimiter: str) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROWS[0]), delimiter=delimiter, lineterminator="\n")
    w.writeheader()
    w.writerows(ROWS)
    return buf.getvalue()


# --- data ----------------------------------------------------------------------

def test_csv(k):
    put(k, "hosts.csv", _delimited(","))
    got = ask(k, """
        import csv, json
        import pandas as pd
        df = pd.read_csv('/mnt/data/hosts.csv')
        with open('/mnt/data/hosts.csv', newline='') as fh:
            rows = list(csv.DictReader(fh))
        print(json.dumps({'columns': list(df.columns), 'hosts': df['host'].tolist(),
                          'errors': int(df['errors'].sum()), 'csv_rows': len(rows),
                          'latency': float(df['latency_ms'].max())}))
    """)
    assert got == {"columns": list(ROWS[0]), "hosts": [r["host"] for r in ROWS],
                   "errors": TOTAL_ERRORS, "csv_rows": len(ROWS),
                   "latency": max(r["latency_ms"] for r in ROWS)}


def test_tsv(k):
    put(k, "hosts.tsv", _delimited("\t"))
    got = ask(k, """
        import json
        import pandas as pd
        df = pd.read_csv('/mnt/data/hosts.tsv', sep='\\t')
        print(json.dumps({'columns': list(df.columns),
                          'by_region': df.groupby('region')['errors'].sum().to_dict()}))
    """)
    assert got["columns"] == list(ROWS[0])
    by_region = {}
    for r in ROWS:
        by_region[r["region"]] = by_region.get(r["region"], 0) + r["errors"]
    assert got["by_region"] == by_region


def test_excel_xlsx(k):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "hosts"
    ws.append(list(ROWS[0]))
    for r in ROWS:
        ws.append(list(r.values()))
    ws2 = wb.create_sheet("meta")
    ws2["A1"] = "generated-by"
    ws2["B1"] = "host-side openpyxl"
    buf = io.BytesIO()
    wb.save(buf)
    put(k, "hosts.xlsx", buf.getvalue())
    got = ask(k, """
        import json
        import openpyxl
        import pandas as pd
        df = pd.read_excel('/mnt/data/hosts.xlsx', sheet_name='hosts')
        wb = openpyxl.load_workbook('/mnt/data/hosts.xlsx', read_only=True)
        print(json.dumps({'sheets': wb.sheetnames, 'meta': wb['meta']['B1'].value,
                          'hosts': df['host'].tolist(), 'errors': int(df['errors'].sum())}))
    """)
    assert got == {"sheets": ["hosts", "meta"], "meta": "host-side openpyxl",
                   "hosts": [r["host"] for r in ROWS], "errors": TOTAL_ERRORS}


def test_excel_ods(k):
    # No .xls writer is installed (xlwt is not available), so the legacy
    # format is not covered; OpenDocument spreadsheets go through odfpy.
    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame(ROWS).to_excel(buf, engine="odf", sheet_name="hosts", index=False)
    put(k, "hosts.ods", buf.getvalue())
    got = ask(k, """
        import json
        import pandas as pd
        df = pd.read_excel('/mnt/data/hosts.ods', engine='odf')
        print(json.dumps({'hosts': df['host'].tolist(), 'errors': int(df['errors'].sum()),
                          'latency': df['latency_ms'].tolist()}))
    """)
    assert got == {"hosts": [r["host"] for r in ROWS], "errors": TOTAL_ERRORS,
                   "latency": [r["latency_ms"] for r in ROWS]}


def test_json(k):
    doc = {"service": "checkout", "errors": [{"code": "E42", "count": 5}, {"code": "E7", "count": 2}],
           "ok": False, "unicode": "d\u00e9j\u00e0 vu \u2713"}
    put(k, "events.json", json.dumps(doc, ensure_ascii=False))
    put(k, "events.jsonl", "\n".join(json.dumps(e) for e in doc["errors"]) + "\n")
    got = ask(k, """
        import json
        import pandas as pd
        with open('/mnt/data/events.json', encoding='utf-8') as fh:
            doc = json.load(fh)
        lines = pd.read_json('/mnt/data/events.jsonl', lines=True)
        print(json.dumps({'doc': doc, 'jsonl_total': int(lines['count'].sum())}))
    """)
    assert got == {"doc": doc, "jsonl_total": 7}


XML_DOC = """<?xml version="1.0" encoding="UTF-8"?>
<alerts xmlns:x="urn:example:ext">
  <alert id="a1" severity="critical"><host>web-01</host><x:note>disk full</x:note></alert>
  <alert id="a2" severity="low"><host>web-02</host></alert>
  <alert id="a3" severity="critical"><host>db-01</host></alert>
</alerts>
"""


def test_xml(k):
    put(k, "alerts.xml", XML_DOC)
    got = ask(k, """
        import json
        import xml.etree.ElementTree as ET
        from lxml import etree
        root = ET.parse('/mnt/data/alerts.xml').getroot()
        et_ids = [a.get('id') for a in root.findall('alert')]
        tree = etree.parse('/mnt/data/alerts.xml')
        critical = tree.xpath('//alert[@severity="critical"]/host/text()')
        note = tree.xpath('//x:note/text()', namespaces={'x': 'urn:example:ext'})
        print(json.dumps({'et_ids': et_ids, 'critical': critical, 'note': note}))
    """)
    assert got == {"et_ids": ["a1", "a2", "a3"], "critical": ["web-01", "db-01"], "note": ["disk full"]}


def test_yaml(k):
    put(k, "config.yaml", textwrap.dedent("""\
        service: checkout
        replicas: 3
        limits: {cpu: 0.5, memory: 256Mi}
        alerts:
          - name: high-latency
            threshold_ms: 250
          - name: error-rate
            threshold: 0.05
        """))
    got = ask(k, """
        import json, yaml
        with open('/mnt/data/config.yaml') as fh:
            print(json.dumps(yaml.safe_load(fh)))
    """)
    assert got == {"service": "checkout", "replicas": 3, "limits": {"cpu": 0.5, "memory": "256Mi"},
                   "alerts": [{"name": "high-latency", "threshold_ms": 250},
                              {"name": "error-rate", "threshold": 0.05}]}


def test_hdf5(k):
    import h5py
    import numpy as np

    values = np.arange(24, dtype="float64").reshape(4, 6) * 1.5
    path = put(k, "metrics.h5", b"")
    with h5py.File(path, "w") as f:
        g = f.create_group("cpu")
        d = g.create_dataset("usage", data=values, compression="gzip")
        d.attrs["unit"] = "percent"
        f.attrs["source"] = "host"
    got = ask(k, """
        import json
        import h5py
        with h5py.File('/mnt/data/metrics.h5', 'r') as f:
            d = f['cpu/usage']
            print(json.dumps({'shape': list(d.shape), 'sum': float(d[...].sum()),
                              'row2': d[2].tolist(), 'unit': d.attrs['unit'],
                              'source': f.attrs['source'], 'keys': list(f.keys())}))
    """)
    assert got == {"shape": [4, 6], "sum": float(values.sum()), "row2": values[2].tolist(),
                   "unit": "percent", "source": "host", "keys": ["cpu"]}


def test_netcdf(k):
    import netCDF4
    import numpy as np

    temps = (np.arange(12, dtype="float32").reshape(3, 4) / 4.0) + 10
    path = put(k, "weather.nc", b"")
    with netCDF4.Dataset(path, "w") as ds:
        ds.createDimension("time", 3)
        ds.createDimension("station", 4)
        t = ds.createVariable("temperature", "f4", ("time", "station"))
        t[:] = temps
        t.units = "degC"
        s = ds.createVariable("station", "i4", ("station",))
        s[:] = [101, 102, 103, 104]
        ds.title = "test weather"
    got = ask(k, """
        import json
        import netCDF4
        import xarray as xr
        with netCDF4.Dataset('/mnt/data/weather.nc') as ds:
            nc = {'vars': sorted(ds.variables), 'title': ds.title,
                  'units': ds['temperature'].units, 'first': ds['temperature'][0].tolist()}
        with xr.open_dataset('/mnt/data/weather.nc') as xds:
            means = xds['temperature'].mean(dim='time').values.tolist()
            stations = xds['station'].values.tolist()
        print(json.dumps({'nc': nc, 'xr_means': means, 'stations': stations}))
    """)
    assert got["nc"] == {"vars": ["station", "temperature"], "title": "test weather", "units": "degC",
                         "first": temps[0].tolist()}
    assert got["xr_means"] == pytest.approx(temps.mean(axis=0).tolist())
    assert got["stations"] == [101, 102, 103, 104]


def test_pickle(k):
    import pandas as pd

    obj = {"tuple": (1, 2, 3), "set": {"a", "b"}, "bytes": b"\x00\xff", "nested": [{"x": 1.5}]}
    put(k, "state.pkl", pickle.dumps(obj))
    buf = io.BytesIO()
    pd.DataFrame(ROWS).to_pickle(buf)
    put(k, "frame.pkl", buf.getvalue())
    got = ask(k, """
        import json, pickle
        import pandas as pd
        with open('/mnt/data/state.pkl', 'rb') as fh:
            obj = pickle.load(fh)
        df = pd.read_pickle('/mnt/data/frame.pkl')
        print(json.dumps({'tuple': list(obj['tuple']), 'is_tuple': type(obj['tuple']) is tuple,
                          'set': sorted(obj['set']), 'bytes': obj['bytes'].hex(),
                          'nested': obj['nested'], 'frame_errors': int(df['errors'].sum()),
                          'frame_dtypes': {c: str(t) for c, t in df.dtypes.items() if c in ('errors', 'latency_ms')}}))
    """)
    assert got == {"tuple": [1, 2, 3], "is_tuple": True, "set": ["a", "b"], "bytes": "00ff",
                   "nested": [{"x": 1.5}], "frame_errors": TOTAL_ERRORS,
                   "frame_dtypes": {"errors": "int64", "latency_ms": "float64"}}


# --- images ----------------------------------------------------------------------

RASTER = {  # extension: (Pillow format, lossless)
    "png": ("PNG", True),
    "jpg": ("JPEG", False),
    "gif": ("GIF", True),
    "webp": ("WEBP", True),
    "bmp": ("BMP", True),
    "tiff": ("TIFF", True),
}


@pytest.mark.parametrize("ext", sorted(RASTER))
def test_raster_image(k, ext):
    from PIL import Image

    fmt, lossless = RASTER[ext]
    size = (37, 23)
    img = Image.new("RGB", size, (200, 30, 60))
    for x in range(10):
        for y in range(10):
            img.putpixel((x, y), (20, 180, 40))
    buf = io.BytesIO()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    img.save(buf, format=fmt, **kwargs)
    put(k, f"picture.{ext}", buf.getvalue())
    got = ask(k, f"""
        import json
        from PIL import Image
        with Image.open('/mnt/data/picture.{ext}') as im:
            im.load()
            rgb = im.convert('RGB')
            print(json.dumps({{'format': im.format, 'size': list(im.size),
                              'corner': list(rgb.getpixel((2, 2))),
                              'body': list(rgb.getpixel((30, 20)))}}))
    """)
    assert got["format"] == fmt
    assert got["size"] == list(size)
    if lossless:
        assert got["corner"] == [20, 180, 40]
        assert got["body"] == [200, 30, 60]
    else:
        assert got["corner"] == pytest.approx([20, 180, 40], abs=24)
        assert got["body"] == pytest.approx([200, 30, 60], abs=24)


def test_svg_parsed_as_xml(k):
    put(k, "diagram.svg", textwrap.dedent("""\
        <svg xmlns="http://www.w3.org/2000/svg" width="120" height="80" viewBox="0 0 120 80">
          <title>Latency</title>
          <rect x="0" y="0" width="40" height="80" fill="red"/>
          <rect x="40" y="20" width="40" height="60" fill="orange"/>
          <text x="5" y="15">p99</text>
        </svg>
        """))
    got = ask(k, """
        import json
        import xml.etree.ElementTree as ET
        ns = {'svg': 'http://www.w3.org/2000/svg'}
        root = ET.parse('/mnt/data/diagram.svg').getroot()
        print(json.dumps({'tag': root.tag, 'size': [root.get('width'), root.get('height')],
                          'fills': [r.get('fill') for r in root.findall('svg:rect', ns)],
                          'title': root.find('svg:title', ns).text,
                          'text': root.find('svg:text', ns).text}))
    """)
    assert got == {"tag": "{http://www.w3.org/2000/svg}svg", "size": ["120", "80"],
                   "fills": ["red", "orange"], "title": "Latency", "text": "p99"}


def test_eps_identified(k):
    # Rendering EPS needs Ghostscript, which the sandbox does not have;
    # Pillow still identifies the file and its bounding box.
    put(k, "figure.eps", textwrap.dedent("""\
        %!PS-Adobe-3.0 EPSF-3.0
        %%Creator: broker tests
        %%BoundingBox: 0 0 144 72
        %%EndComments
        newpath 10 10 moveto 134 62 lineto stroke
        showpage
        %%EOF
        """))
    got = ask(k, """
        import json
        from PIL import Image
        with Image.open('/mnt/data/figure.eps') as im:
            print(json.dumps({'format': im.format, 'size': list(im.size)}))
    """)
    assert got == {"format": "EPS", "size": [144, 72]}


# --- documents ---------------------------------------------------------------------

def test_pdf(k):
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=A4)
    c.drawString(72, 760, "Postmortem: checkout outage")
    c.showPage()
    c.drawString(72, 760, "Root cause: expired certificate")
    c.save()
    put(k, "postmortem.pdf", buf.getvalue())
    got = ask(k, """
        import json
        from pypdf import PdfReader
        r = PdfReader('/mnt/data/postmortem.pdf')
        print(json.dumps({'pages': len(r.pages), 'text': [p.extract_text() for p in r.pages]}))
    """)
    assert got["pages"] == 2
    assert "Postmortem: checkout outage" in got["text"][0]
    assert "Root cause: expired certificate" in got["text"][1]


def test_html(k):
    put(k, "status.html", textwrap.dedent("""\
        <!doctype html>
        <html><head><title>Status page</title></head>
        <body>
          <h1 id="main">All systems</h1>
          <table id="services">
            <tr><th>service</th><th>state</th></tr>
            <tr><td>api</td><td class="bad">degraded</td></tr>
            <tr><td>web</td><td>ok</td></tr>
          </table>
          <a href="/incidents/42">incident 42</a>
        </body></html>
        """))
    got = ask(k, """
        import json
        from bs4 import BeautifulSoup
        with open('/mnt/data/status.html') as fh:
            soup = BeautifulSoup(fh, 'html.parser')
        rows = [[td.get_text() for td in tr.find_all('td')] for tr in soup.select('#services tr')[1:]]
        lsoup = BeautifulSoup(open('/mnt/data/status.html').read(), 'lxml')
        print(json.dumps({'title': soup.title.string, 'rows': rows,
                          'bad': soup.find('td', class_='bad').get_text(),
                          'links': [a['href'] for a in lsoup.find_all('a')]}))
    """)
    assert got == {"title": "Status page", "rows": [["api", "degraded"], ["web", "ok"]],
                   "bad": "degraded", "links": ["/incidents/42"]}


def test_markdown(k):
    put(k, "runbook.md", textwrap.dedent("""\
        # Restart procedure

        1. Drain the node
        2. Restart **kubelet**

        | step | owner |
        |------|-------|
        | drain | sre |
        """))
    got = ask(k, """
        import json
        import markdown
        from bs4 import BeautifulSoup
        html = markdown.markdown(open('/mnt/data/runbook.md').read(), extensions=['tables'])
        soup = BeautifulSoup(html, 'html.parser')
        print(json.dumps({'h1': soup.h1.get_text(), 'items': [li.get_text() for li in soup.find_all('li')],
                          'strong': soup.strong.get_text(), 'cells': [td.get_text() for td in soup.find_all('td')]}))
    """)
    assert got == {"h1": "Restart procedure", "items": ["Drain the node", "Restart kubelet"],
                   "strong": "kubelet", "cells": ["drain", "sre"]}


def test_office_docx_and_pptx(k):
    import docx
    import pptx

    d = docx.Document()
    d.add_heading("Incident review", level=1)
    d.add_paragraph("Impact: 12 minutes of errors.")
    t = d.add_table(rows=2, cols=2)
    t.cell(0, 0).text, t.cell(0, 1).text = "owner", "team-a"
    t.cell(1, 0).text, t.cell(1, 1).text = "severity", "sev2"
    buf = io.BytesIO()
    d.save(buf)
    put(k, "review.docx", buf.getvalue())

    p = pptx.Presentation()
    for title, body in (("Quarterly SRE", "Availability 99.95%"), ("Next steps", "Automate failover")):
        s = p.slides.add_slide(p.slide_layouts[1])
        s.shapes.title.text = title
        s.placeholders[1].text = body
    buf = io.BytesIO()
    p.save(buf)
    put(k, "deck.pptx", buf.getvalue())

    got = ask(k, """
        import json
        import docx, pptx
        d = docx.Document('/mnt/data/review.docx')
        table = [[c.text for c in row.cells] for row in d.tables[0].rows]
        p = pptx.Presentation('/mnt/data/deck.pptx')
        slides = [[sh.text_frame.text for sh in s.shapes if sh.has_text_frame] for s in p.slides]
        print(json.dumps({'paragraphs': [x.text for x in d.paragraphs if x.text],
                          'heading_style': d.paragraphs[0].style.name, 'table': table, 'slides': slides}))
    """)
    assert got == {"paragraphs": ["Incident review", "Impact: 12 minutes of errors."],
                   "heading_style": "Heading 1",
                   "table": [["owner", "team-a"], ["severity", "sev2"]],
                   "slides": [["Quarterly SRE", "Availability 99.95%"], ["Next steps", "Automate failover"]]}


# --- code --------------------------------------------------------------------------

def test_jupyter_notebook(k):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Analysis"),
                nbformat.v4.new_code_cell("x = 21 * 2\nprint(x)"),
                nbformat.v4.new_code_cell("import pandas as pd")]
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="42\n")]
    put(k, "analysis.ipynb", nbformat.writes(nb))
    got = ask(k, """
        import json
        import nbformat
        nb = nbformat.read('/mnt/data/analysis.ipynb', as_version=4)
        nbformat.validate(nb)
        print(json.dumps({'nbformat': nb.nbformat, 'types': [c.cell_type for c in nb.cells],
                          'code': [c.source for c in nb.cells if c.cell_type == 'code'],
                          'output': nb.cells[1].outputs[0].text}))
    """)
    assert got == {"nbformat": 4, "types": ["markdown", "code", "code"],
                   "code": ["x = 21 * 2\nprint(x)", "import pandas as pd"], "output": "42\n"}


def test_code_files(k):
    put(k, "tool.py", "def double(x):\n    return 2 * x\n\nRESULT = double(21)\n")
    put(k, "broken.py", "def f(:\n    pass\n")
    put(k, "schema.sql", textwrap.dedent("""\
        CREATE TABLE incidents (id INTEGER PRIMARY KEY, severity TEXT, minutes INTEGER);
        INSERT INTO incidents (severity, minutes) VALUES ('high', 30), ('low', 5), ('high', 90);
        """))
    put(k, "analysis.R", textwrap.dedent("""\
        library(dplyr)
        summarise_incidents <- function(df) {
          df %>% group_by(severity) %>% summarise(n = n())
        }
        """))
    got = ask(k, """
        import ast, json, re, sqlite3
        src = open('/mnt/data/tool.py').read()
        ns = {}
        exec(compile(src, '/mnt/data/tool.py', 'exec'), ns)
        funcs = [n.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)]
        try:
            compile(open('/mnt/data/broken.py').read(), 'broken.py', 'exec')
            broken = None
        except SyntaxError as e:
            broken = e.lineno
        db = sqlite3.connect(':memory:')
        db.executescript(open('/mnt/data/schema.sql').read())
        sql = db.execute("SELECT severity, COUNT(*), SUM(minutes) FROM incidents "
                         "GROUP BY severity ORDER BY severity").fetchall()
        r_src = open('/mnt/data/analysis.R').read()
        print(json.dumps({'result': ns['RESULT'], 'funcs': funcs, 'broken_line': broken, 'sql': sql,
                          'r_functions': re.findall(r'^(\\w+) <- function', r_src, re.M),
                          'r_libraries': re.findall(r'library\\((\\w+)\\)', r_src)}))
    """)
    assert got == {"result": 42, "funcs": ["double"], "broken_line": 1,
                   "sql": [["high", 2, 120], ["low", 1, 5]],
                   "r_functions": ["summarise_incidents"], "r_libraries": ["dplyr"]}


# --- archives --------------------------------------------------------------------

def test_archives(k):
    members = {"logs/app.log": b"ERROR disk full\nWARN retry\n", "README.txt": b"incident bundle\n"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    put(k, "bundle.zip", buf.getvalue())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    put(k, "bundle.tar.gz", buf.getvalue())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("plain.txt")
        info.size = 5
        t.addfile(info, io.BytesIO(b"plain"))
    put(k, "plain.tar", buf.getvalue())
    put(k, "app.log.gz", gzip.compress(members["logs/app.log"] * 100))

    got = ask(k, """
        import gzip, json, os, tarfile, zipfile
        with zipfile.ZipFile('/mnt/data/bundle.zip') as z:
            zip_names = sorted(z.namelist())
            zip_log = z.read('logs/app.log').decode()
            z.extractall('/mnt/data/unzipped')
        with tarfile.open('/mnt/data/bundle.tar.gz') as t:
            tar_names = sorted(t.getnames())
            tar_readme = t.extractfile('README.txt').read().decode()
            t.extractall('/mnt/data/untarred', filter='data')
        with tarfile.open('/mnt/data/plain.tar') as t:
            plain = t.extractfile('plain.txt').read().decode()
        with gzip.open('/mnt/data/app.log.gz', 'rt') as fh:
            gz_lines = fh.read().splitlines()
        print(json.dumps({'zip_names': zip_names, 'zip_log': zip_log, 'tar_names': tar_names,
                          'tar_readme': tar_readme, 'plain': plain, 'gz_lines': len(gz_lines),
                          'gz_errors': sum(l.startswith('ERROR') for l in gz_lines),
                          'extracted': sorted(os.listdir('/mnt/data/untarred'))}))
    """)
    assert got == {"zip_names": sorted(members), "zip_log": members["logs/app.log"].decode(),
                   "tar_names": sorted(members), "tar_readme": "incident bundle\n", "plain": "plain",
                   "gz_lines": 200, "gz_errors": 100, "extracted": ["README.txt", "logs"]}
    # Extraction really wrote into the data folder.
    with open(host_path(k, "unzipped/logs/app.log"), "rb") as fh:
        assert fh.read() == members["logs/app.log"]
    with open(host_path(k, "untarred/README.txt"), "rb") as fh:
        assert fh.read() == members["README.txt"]
