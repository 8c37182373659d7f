"""What a call changed in /mnt/data, found from the kernel's change reports
(broker/changes.py), through a real ``broker serve`` with real sandboxed
kernels and shell commands.

Every call's result carries ``files_changed`` (exact count and bytes of the
regular files the call created or changed) next to the ``files`` and
``images`` lists.  The cases: many files from the kernel, files from shell
commands, deletions and renames within and across calls, nested new folders,
after a kernel restart and after a broker restart, on a plain folder (no
quota image), and the fallback walk (a per-call cap, a per-session watch cap,
a real overflow of the inotify queue, and the walk method).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.broker_server import BrokerProcess

MANY = """
import os
os.makedirs('/mnt/data/{folder}', exist_ok=True)
for i in range({n}):
    with open(f'/mnt/data/{folder}/f{{i:05d}}.txt', 'w') as fh:
        fh.write('x' * (i % 7))
"""


def many_bytes(n: int) -> int:
    return sum(i % 7 for i in range(n))


def changed_paths(r: dict) -> set[str]:
    """The paths in ``files`` and ``images``, relative to /mnt/data."""
    return {f["path"].removeprefix("/mnt/data/") for f in r["files"] + r["images"]}


def own_broker(tmp_path, name: str, *extra: str) -> BrokerProcess:
    """A broker of the test's own (started by ``with``), warm pool off."""
    return BrokerProcess(str(tmp_path / name), "--SessionManager.pool_size=0", *extra)


def ok(r: dict) -> dict:
    assert r["status"] == "success", r
    return r


# -- many files ------------------------------------------------------------------------------------

def test_a_thousand_files_are_all_found_exactly(broker, session):
    r = ok(broker.run(session, MANY.format(folder="thousand", n=1000)))
    assert r["files_changed"] == {"count": 1000, "bytes": many_bytes(1000)}
    # The next call changed nothing and says so.
    r = ok(broker.run(session, "1+1"))
    assert r["files_changed"] == {"count": 0, "bytes": 0}
    assert r["files"] == [] and r["images"] == []


def test_twenty_thousand_files_are_all_found_exactly(broker, session):
    r = ok(broker.run(session, MANY.format(folder="many", n=20_000), timeout_seconds=200))
    assert r["files_changed"] == {"count": 20_000, "bytes": many_bytes(20_000)}
    # Changing one of them is one change, in a folder of 20,000.
    r = ok(broker.run(session, "open('/mnt/data/many/f12345.txt', 'a').write('more')"))
    assert r["files_changed"] == {"count": 1, "bytes": 12345 % 7 + 4}
    assert changed_paths(r) == {"many/f12345.txt"}


def test_files_written_by_shell_commands_are_found(broker, session):
    r = ok(broker.shell(session, "mkdir -p sh/a/b && for i in $(seq 1 50); do echo $i > sh/a/b/f$i.txt; done; "
                                 "echo top > sh/top.txt"))
    assert r["files_changed"] == {"count": 51, "bytes": sum(len(f"{i}\n") for i in range(1, 51)) + 4}
    # (the lists past 20 files are summarised by folder: broker/results.py; the count stays exact)
    # A shell command changing one existing file reports that one only.
    r = ok(broker.shell(session, "echo again >> sh/a/b/f7.txt && cat sh/top.txt"))
    assert changed_paths(r) == {"sh/a/b/f7.txt"}
    assert r["files_changed"]["count"] == 1


# -- deletions and renames -------------------------------------------------------------------------

def test_deletions_and_renames_within_one_call(broker, session):
    r = ok(broker.run(session, """
import os, shutil
d = '/mnt/data'
open(f'{d}/tmp.txt', 'w').write('gone soon'); os.remove(f'{d}/tmp.txt')
open(f'{d}/x.txt', 'w').write('moved'); os.rename(f'{d}/x.txt', f'{d}/y.txt')
os.makedirs(f'{d}/d1/sub'); open(f'{d}/d1/sub/f.txt', 'w').write('in a moved folder')
os.rename(f'{d}/d1', f'{d}/d2')
os.makedirs(f'{d}/gone/deep'); open(f'{d}/gone/deep/g.txt', 'w').write('g'); shutil.rmtree(f'{d}/gone')
os.symlink('/etc/passwd', f'{d}/link')
os.mkfifo(f'{d}/fifo')
"""))
    assert changed_paths(r) == {"y.txt", "d2/sub/f.txt"}
    assert r["files_changed"] == {"count": 2, "bytes": len("moved") + len("in a moved folder")}


def test_deletions_and_renames_across_calls(broker, session):
    ok(broker.run(session, """
import os
d = '/mnt/data'
for name in ('keep.txt', 'old.txt'):
    open(f'{d}/{name}', 'w').write(name)
os.makedirs(f'{d}/olddir/inner'); open(f'{d}/olddir/inner/f.txt', 'w').write('f')
os.makedirs(f'{d}/again'); open(f'{d}/again/a.txt', 'w').write('a')
"""))
    r = ok(broker.run(session, """
import os, shutil
d = '/mnt/data'
os.rename(f'{d}/old.txt', f'{d}/new.txt')
os.remove(f'{d}/keep.txt')
os.rename(f'{d}/olddir', f'{d}/newdir')
open(f'{d}/newdir/inner/g.txt', 'w').write('gg')
shutil.rmtree(f'{d}/again'); os.makedirs(f'{d}/again'); open(f'{d}/again/b.txt', 'w').write('b')
"""))
    # A moved file or folder is reported under its new path, with all it holds.
    assert changed_paths(r) == {"new.txt", "newdir/inner/f.txt", "newdir/inner/g.txt", "again/b.txt"}
    assert r["files_changed"] == {"count": 4, "bytes": len("old.txt") + 1 + 2 + 1}
    # The watches followed the moved folder and the folder made again.
    r = ok(broker.run(session, "open('/mnt/data/newdir/inner/h.txt', 'w').write('h')\n"
                               "open('/mnt/data/again/c.txt', 'w').write('c')"))
    assert changed_paths(r) == {"newdir/inner/h.txt", "again/c.txt"}
    r = ok(broker.shell(session, "mv newdir/inner moved-out && echo z > moved-out/z.txt && rm new.txt"))
    assert changed_paths(r) == {"moved-out/f.txt", "moved-out/g.txt", "moved-out/h.txt", "moved-out/z.txt"}


def test_nested_new_folders(broker, session):
    r = ok(broker.run(session, """
import os
path = '/mnt/data'
for level in range(8):
    path = f'{path}/n{level}'
    os.makedirs(path)
    for i in range(3):
        open(f'{path}/f{i}.csv', 'w').write('a,b\\n')
"""))
    assert r["files_changed"] == {"count": 24, "bytes": 24 * 4}
    # A folder tree made and filled in one go by a separate process.
    r = ok(broker.shell(session, "mkdir -p deep/a/b/c/d && echo 1 > deep/a/b/c/d/e.txt && "
                                 "cp -r deep copy && echo 2 > copy/a/b/c/two.txt"))
    assert changed_paths(r) == {"deep/a/b/c/d/e.txt", "copy/a/b/c/d/e.txt", "copy/a/b/c/two.txt"}
    r = ok(broker.run(session, "open('/mnt/data/n0/n1/n2/n3/n4/n5/n6/n7/last.txt', 'w').write('last')"))
    assert changed_paths(r) == {"n0/n1/n2/n3/n4/n5/n6/n7/last.txt"}


def test_uploads_between_calls_are_not_the_next_calls_changes(broker, session):
    assert broker.put(f"/api/sessions/{session}/files/up/loaded.csv", data=b"a,b\n1,2\n").status_code == 201
    r = ok(broker.tool(session, "UploadFileToSession", {"path": "up/tool.txt", "content": "aGk="}))
    r = ok(broker.run(session, "open('/mnt/data/up/mine.txt', 'w').write('mine')"))
    assert changed_paths(r) == {"up/mine.txt"}
    # Images the broker saves for displayed figures are in images, not counted twice later.
    r = ok(broker.run(session, "from PIL import Image; display(Image.new('RGB', (8, 8)))"))
    assert r["files_changed"]["count"] == 0 and len(r["images"]) == 1
    r = ok(broker.run(session, "1+1"))
    assert r["files_changed"] == {"count": 0, "bytes": 0}


# -- restarts --------------------------------------------------------------------------------------

def test_changes_after_a_kernel_restart(broker, session):
    ok(broker.run(session, "import os; os.makedirs('/mnt/data/k/sub'); open('/mnt/data/k/sub/a.txt', 'w').write('a')"))
    assert broker.post(f"/api/kernels/{session}/restart", json={}).status_code == 200
    r = ok(broker.run(session, "open('/mnt/data/k/sub/b.txt', 'w').write('bb')"))
    assert changed_paths(r) == {"k/sub/b.txt"}
    r = ok(broker.shell(session, "echo c > k/c.txt"))
    assert changed_paths(r) == {"k/c.txt"}


def test_changes_after_a_broker_restart(tmp_path):
    with own_broker(tmp_path, "restart dir") as b:
        sid = b.create_session()
        ok(b.run(sid, MANY.format(folder="kept", n=300)))
        ok(b.run(sid, "import os; os.makedirs('/mnt/data/x/y'); open('/mnt/data/x/y/before.txt', 'w').write('1')"))
        b.restart()
        r = ok(b.run(sid, "open('/mnt/data/x/y/after.txt', 'w').write('22')"))
        assert changed_paths(r) == {"x/y/after.txt"}
        assert r["files_changed"] == {"count": 1, "bytes": 2}
        r = ok(b.run(sid, MANY.format(folder="kept", n=300)))   # the same content again: rewritten
        assert r["files_changed"] == {"count": 300, "bytes": many_bytes(300)}
        r = ok(b.shell(sid, "echo 333 > x/y/shell.txt"))
        assert changed_paths(r) == {"x/y/shell.txt"}


# -- other modes and the fallback ------------------------------------------------------------------

def test_plain_data_folder_without_quota_image(tmp_path):
    """The data folder as a plain folder (as for an unprivileged broker, or quota off)."""
    with own_broker(tmp_path, "plain", "--SandboxProvisioner.quota=off") as b:
        sid = b.create_session()
        assert not os.path.ismount(b.data_dir(sid))
        r = ok(b.run(sid, MANY.format(folder="p", n=500)))
        assert r["files_changed"] == {"count": 500, "bytes": many_bytes(500)}
        r = ok(b.shell(sid, "mv p q && echo 1 > q/new.txt"))
        assert r["files_changed"]["count"] == 501
        r = ok(b.run(sid, "1+1"))
        assert r["files_changed"]["count"] == 0


def walk_lines(b: BrokerProcess) -> list[str]:
    with open(b.log_path, errors="replace") as fh:
        return [line for line in fh if "found by a walk" in line]


def test_fallback_walk_past_the_per_call_cap_reports_every_change(tmp_path):
    with own_broker(tmp_path, "cap", "--ChangeTracking.max_changes=50") as b:
        sid = b.create_session()
        ok(b.run(sid, MANY.format(folder="before", n=100)))        # past the cap too
        assert len(walk_lines(b)) == 1
        ok(b.run(sid, "import os; os.makedirs('/mnt/data/a/b'); open('/mnt/data/a/b/old.txt', 'w').write('old')"))
        r = ok(b.run(sid, MANY.format(folder="big", n=400) + "\nos.remove('/mnt/data/before/f00001.txt')\n"
                          "os.rename('/mnt/data/a', '/mnt/data/renamed')"))
        # The walk also reports the unchanged file in the renamed folder, under its new path
        # (renamed/b/old.txt: 401, not 400).
        assert r["files_changed"] == {"count": 401, "bytes": many_bytes(400) + 3}
        assert any("more than 50 paths" in line for line in walk_lines(b)), b.log_tail()
        # Under the cap again: from the events, no walk.
        n = len(walk_lines(b))
        r = ok(b.run(sid, MANY.format(folder="small", n=20)))
        assert r["files_changed"] == {"count": 20, "bytes": many_bytes(20)}
        assert len(walk_lines(b)) == n


def test_fallback_walk_past_the_watch_cap_reports_every_change(tmp_path):
    with own_broker(tmp_path, "watches", "--ChangeTracking.max_watches=4") as b:
        sid = b.create_session()
        r = ok(b.run(sid, "import os\nfor i in range(6):\n    os.makedirs(f'/mnt/data/d{i}')\n"
                          "    open(f'/mnt/data/d{i}/f.txt', 'w').write('abc')"))
        assert r["files_changed"] == {"count": 6, "bytes": 18}
        r = ok(b.run(sid, "open('/mnt/data/d5/g.txt', 'w').write('g'); open('/mnt/data/top.txt', 'w').write('t')"))
        assert changed_paths(r) == {"d5/g.txt", "top.txt"}
        r = ok(b.shell(sid, "mv d1/f.txt d1/moved.txt && rm d2/f.txt"))
        assert changed_paths(r) == {"d1/moved.txt"}
        with open(b.log_path) as fh:
            assert "ChangeTracking.max_watches" in fh.read()


def test_walk_method_reports_the_same(tmp_path):
    with own_broker(tmp_path, "walk", "--ChangeTracking.method=walk") as b:
        sid = b.create_session()
        r = ok(b.run(sid, MANY.format(folder="w", n=200)))
        assert r["files_changed"] == {"count": 200, "bytes": many_bytes(200)}
        r = ok(b.shell(sid, "mv w/f00001.txt moved.txt && rm w/f00002.txt"))
        assert changed_paths(r) == {"moved.txt"}
        r = ok(b.run(sid, "1+1"))
        assert r["files_changed"]["count"] == 0


def test_an_overflowing_inotify_queue_still_reports_every_change(tmp_path):
    """A real overflow: the broker is stopped (SIGSTOP) while the kernel writes
    far more files than the kernel's inotify queue holds, so nobody drains it."""
    with open("/proc/sys/fs/inotify/max_queued_events") as fh:
        queue = int(fh.read())
    n = queue * 2 + 1000            # at least two events per file
    with own_broker(tmp_path, "overflow") as b:
        sid = b.create_session()
        # The folder exists (and is watched) before the flood: its events fill the queue.
        ok(b.run(sid, "import os; os.makedirs('/mnt/data/pre/sub'); open('/mnt/data/pre/sub/a.txt', 'w').write('a')\n"
                      "os.makedirs('/mnt/data/flood')"))
        marker = os.path.join(b.data_dir(sid), "started")
        code = ("import os, time\nopen('/mnt/data/started', 'w').close()\ntime.sleep(1.5)\n"
                + MANY.format(folder="flood", n=n) + "\nos.remove('/mnt/data/started')\n"
                "open('/mnt/data/done', 'w').close()")
        result = {}
        t = threading.Thread(target=lambda: result.update(r=b.run(sid, code, timeout_seconds=200, timeout=300)))
        t.start()
        deadline = time.monotonic() + 60
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.path.exists(marker), b.log_tail()
        os.kill(b.proc.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(b.data_dir(sid), "done")) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
        t.join(300)
        r = ok(result["r"])
        assert r["files_changed"] == {"count": n + 1, "bytes": many_bytes(n)}   # the files and "done"
        with open(b.log_path) as fh:
            log = fh.read()
        assert "inotify queue overflowed" in log
        # The watches are placed again: later calls are exact, from the events.
        walks = len(walk_lines(b))
        r = ok(b.run(sid, "open('/mnt/data/pre/sub/b.txt', 'w').write('bb')"))
        assert changed_paths(r) == {"pre/sub/b.txt"}
        assert len(walk_lines(b)) == walks


@pytest.mark.parametrize("n", [3])
def test_calls_that_change_nothing_report_nothing(broker, session, n):
    ok(broker.run(session, MANY.format(folder="quiet", n=100)))
    for _ in range(n):
        r = ok(broker.run(session, "import os; len(os.listdir('/mnt/data/quiet'))"))
        assert r["files_changed"] == {"count": 0, "bytes": 0} and r["files"] == []
        r = ok(broker.shell(session, "ls quiet | wc -l; cat quiet/f00001.txt"))
        assert r["files_changed"] == {"count": 0, "bytes": 0} and r["files"] == []


# -- the tracker on its own: a real inotify instance on a real folder --------------------------------
# No event loop here, so events are read only at begin and end: every
# operation below has happened before the tracker sees its first event, the
# widest possible race between the events and the folder they describe.

def watched_inodes(tracking) -> set[int]:
    """Inodes under watch by the tracker's inotify instance (from /proc/self/fdinfo)."""
    with open(f"/proc/self/fdinfo/{tracking._fd}") as fh:
        return {int(part.split(":")[1], 16) for line in fh if line.startswith("inotify")
                for part in line.split() if part.startswith("ino:")}


@pytest.fixture
def tracking():
    from broker.changes import ChangeTracking

    t = ChangeTracking()
    yield t
    t.close()


def test_cant_make_the_change_tracker_follow_a_link_out(tracking, tmp_path):
    root = tmp_path / "data"
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "secret.txt").write_text("host file")
    root.mkdir()
    tracker = tracking.tracker(str(root))
    rec = tracker.begin()
    # A folder appears and is swapped for a link out before its event is read.
    (root / "a" / "sub").mkdir(parents=True)
    os.rename(root / "a", root / "b")
    os.symlink(outside, root / "a")
    (root / "b" / "sub" / "in.txt").write_text("in")
    changed = [c.path for c in tracker.end(rec)]
    assert changed == ["b/sub/in.txt"]
    inodes = watched_inodes(tracking)
    assert os.stat(outside).st_ino not in inodes and os.stat(outside / "sub").st_ino not in inodes
    # Writing outside through the link is not seen, and the tracker still works.
    rec = tracker.begin()
    (outside / "sub" / "secret.txt").write_text("changed on the host")
    (root / "b" / "sub" / "next.txt").write_text("next")
    assert [c.path for c in tracker.end(rec)] == ["b/sub/next.txt"]


def test_folders_renamed_and_made_again_before_their_events_are_read(tracking, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    tracker = tracking.tracker(str(root))
    rec = tracker.begin()
    (root / "a").mkdir()
    (root / "a" / "1.txt").write_text("1")
    os.rename(root / "a", root / "b")
    (root / "a").mkdir()
    (root / "a" / "2.txt").write_text("2")
    (root / "gone").mkdir()
    (root / "gone" / "x.txt").write_text("x")
    os.remove(root / "gone" / "x.txt")
    os.rmdir(root / "gone")
    assert [c.path for c in tracker.end(rec)] == ["a/2.txt", "b/1.txt"]
    # Both folders are watched under their right names.
    rec = tracker.begin()
    (root / "a" / "3.txt").write_text("3")
    (root / "b" / "4.txt").write_text("4")
    assert [c.path for c in tracker.end(rec)] == ["a/3.txt", "b/4.txt"]
    assert len(watched_inodes(tracking)) == 3
