"""The seed's own examples (docs: code-interpreter-seed.md) run in the sandbox
exactly as written, and their files land in the host folder behind /mnt/data.

The examples share one kernel, in the seed's order: the seaborn example uses
``pd`` imported by the pandas example before it.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import random
import struct
from collections import defaultdict

import pytest
from PIL import Image
from pypdf import PdfReader

from tests.seed import PNG_MAGIC, SEED_BAR_CHART, SEED_PANDAS_SUMMARY, SEED_PDF_REPORT, SEED_SEABORN_CHART



CATEGORIES = ["network", "database", "storage", "auth"]


def put(k, name: str, data: bytes) -> str:
    """Write a file into the kernel's data folder as the sandbox's own uid would."""
    path = os.path.join(k.data_dir, name)
    with open(path, "wb") as fh:
        fh.write(data)
    st = os.stat(k.data_dir)
    os.chown(path, st.st_uid, st.st_gid)
    return path


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def assert_png(path: str, size: tuple[int, int]) -> None:
    assert os.path.isfile(path), f"{path} was not written"
    assert png_size(path) == size
    assert os.path.getsize(path) > 10_000, "a 150-dpi chart is more than a few bytes"
    with Image.open(path) as img:
        img.verify()  # full CRC/structure check
    with Image.open(path) as img:
        img = img.convert("RGB")
        # A chart, not a blank canvas: many distinct colours.
        assert len(img.getcolors(1 << 24)) > 10


@pytest.fixture(scope="module")
def incidents(hooked_kernel):
    """incidents.csv with the columns the seed's examples use: id, category and
    resolution_time for the pandas summary, and count (alerts per incident) for
    the seaborn chart, which plots y='count' from the same file."""
    rng = random.Random(20260117)
    rows = []
    for i in range(1, 61):
        rows.append({"id": i, "category": rng.choice(CATEGORIES),
                     "resolution_time": round(rng.uniform(0.5, 12.0), 2),
                     "count": rng.randint(1, 9)})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["id", "category", "resolution_time", "count"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    put(hooked_kernel, "incidents.csv", buf.getvalue().encode())
    return rows


def test_bar_chart_saved_with_savefig(hooked_kernel):
    k = hooked_kernel
    r = k.run(SEED_BAR_CHART)
    assert r.status == "ok", r
    # figsize (10, 6) at dpi=150
    assert_png(os.path.join(k.data_dir, "incidents_by_severity.png"), (1500, 900))


def test_pandas_incident_summary(hooked_kernel, incidents):
    k = hooked_kernel
    r = k.run(SEED_PANDAS_SUMMARY)
    assert r.status == "ok", r

    groups = defaultdict(list)
    for row in incidents:
        groups[row["category"]].append(row["resolution_time"])
    expected = {c: (len(v), sum(v) / len(v)) for c, v in groups.items()}

    # The printed DataFrame: a header with both columns, one line per category
    # in sorted order with its count and mean.
    lines = [ln.split() for ln in r.stdout.strip().splitlines()]
    assert lines[0] == ["count", "avg_resolution_hours"], r.stdout
    assert lines[1] == ["category"], r.stdout
    body = lines[2:]
    assert [ln[0] for ln in body] == sorted(expected), r.stdout
    for name, count, mean in body:
        assert int(count) == expected[name][0]
        assert float(mean) == pytest.approx(expected[name][1], abs=1e-4)

    with open(os.path.join(k.data_dir, "incident_summary.csv"), newline="") as fh:
        written = list(csv.reader(fh))
    assert written[0] == ["category", "count", "avg_resolution_hours"]
    assert {row[0] for row in written[1:]} == set(expected)
    for name, count, mean in written[1:]:
        assert int(count) == expected[name][0]
        assert float(mean) == pytest.approx(expected[name][1], rel=1e-9)


def test_seaborn_chart(hooked_kernel, incidents):
    k = hooked_kernel
    # The seed's seaborn example relies on `pd` from the pandas example.
    assert k.run("import pandas as pd").status == "ok"
    r = k.run(SEED_SEABORN_CHART)
    assert r.status == "ok", r
    # figsize (12, 6) at dpi=150
    assert_png(os.path.join(k.data_dir, "category_chart.png"), (1800, 900))


def test_reportlab_weekly_report(hooked_kernel):
    k = hooked_kernel
    r = k.run(SEED_PDF_REPORT)
    assert r.status == "ok", r
    path = os.path.join(k.data_dir, "weekly_report.pdf")
    with open(path, "rb") as fh:
        data = fh.read()
    assert data.startswith(b"%PDF-")
    assert b"%%EOF" in data[-64:]
    reader = PdfReader(io.BytesIO(data))
    assert len(reader.pages) == 1
    page = reader.pages[0]
    assert [round(float(x)) for x in page.mediabox[2:]] == [612, 792]  # letter
    text = page.extract_text()
    assert "Weekly Incident Report" in text
    assert "Total incidents: 90" in text
    assert "Average resolution time: 4.2 hours" in text


def test_plt_show_sends_one_png_display(hooked_kernel):
    r = hooked_kernel.run("""
        import matplotlib.pyplot as plt
        plt.figure(figsize=(4, 3))
        plt.plot([1, 2, 3], [3, 1, 2])
        plt.show()
    """)
    assert r.status == "ok", r
    assert len(r.displays) == 1, r.displays
    data = r.displays[0]
    assert "image/png" in data
    raw = base64.b64decode(data["image/png"])
    assert raw.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(raw)) as img:
        # figsize (4, 3) at the profile's figure.dpi of 100, give or take the
        # inline backend's tight bounding box
        w, h = img.size
        assert 300 < w < 500 and 220 < h < 380, img.size


def test_saved_figure_left_open_is_displayed_once_marked_as_saved(hooked_kernel):
    """As Jupyter's inline backend does, a figure left open is displayed at
    the end of the cell; a saved one carries its file in the display's
    metadata, so the broker reports it once, as the file."""
    k = hooked_kernel
    r = k.run("""
        import matplotlib.pyplot as plt
        plt.figure(figsize=(4, 3))
        plt.plot([1, 2, 3])
        plt.savefig('/mnt/data/saved_only.png')
    """)
    assert r.status == "ok", r
    assert len(r.displays) == 1 and "image/png" in r.displays[0], r.displays
    assert r.display_metadata[0].get("broker_saved_as") == ["/mnt/data/saved_only.png"], r.display_metadata
    assert png_size(os.path.join(k.data_dir, "saved_only.png")) == (400, 300)
    # Shown once: the saved figure does not come back later: the next plt.show()
    # displays only its own figure.
    r = k.run("""
        import matplotlib.pyplot as plt
        plt.figure(figsize=(2, 2))
        plt.plot([0, 1])
        plt.show()
    """)
    assert r.status == "ok", r
    assert len(r.displays) == 1
    with Image.open(io.BytesIO(base64.b64decode(r.displays[0]["image/png"]))) as img:
        w, h = img.size  # the 2x2-inch figure, not the 4x3 one saved before
        assert w < 260 and h < 260, img.size
