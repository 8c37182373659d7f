"""SessionManager used in-process (as `broker replay` does), with real kernels."""

from __future__ import annotations

import asyncio
import os

import psutil

from broker.links import LinkSigner, Links
from broker.sessions import SessionManager
from broker.tools import ToolContext, call_tool


def test_a_long_data_root_still_works(tmp_path):
    """Unix socket paths are limited to 107 bytes; the kernels' sockets live
    under the short runtime folder, so the data root can be anywhere."""
    root = tmp_path / ("d" * 60) / ("e" * 60) / "sessions"
    assert len(str(root)) > 150

    async def main():
        m = SessionManager(data_root=str(root), pool_size=0)
        m.restore()
        s = await m.create("alice")
        try:
            assert len(os.path.join(s.rt_dir, "k-5")) < 100
            assert not s.rt_dir.startswith(str(root))
            r = await call_tool(ToolContext(s, Links("http://x", LinkSigner())), "ExecutePythonCode",
                                {"pythonCode": "open('f.txt','w').write('x'); 6*7"})
            assert r["status"] == "success" and r["result"] == "42", r
            assert (root / s.id / "data" / "f.txt").read_text() == "x"
        finally:
            await m.delete(s.id, "alice")
        assert not os.path.exists(s.rt_dir) and not os.path.exists(s.dir)

    asyncio.run(main())


def test_shell_commands_share_one_session_cgroup_left_empty(tmp_path):
    """A session's shell commands run in one cgroup of its own (on cgroup v1
    the first join of a fresh group costs ~10 ms in the kernel), holding the
    session's shell sandbox (its bwrap and the helper) and nothing of a
    command after it ends; removed with the session."""
    async def main():
        m = SessionManager(data_root=str(tmp_path / "s"), pool_size=0)
        m.restore()
        s = await m.create("alice")
        ctx = ToolContext(s, Links("http://x", LinkSigner()))
        try:
            groups = []
            for cmd in ("cat /proc/self/cgroup", "(sleep 30 &) ; echo started"):
                r = await call_tool(ctx, "RunShellCommand", {"command": cmd})
                assert r["status"] == "success", r
                cg = s._shell_cgroup
                if cg is None:   # no writable cgroup here: a fresh one per command, nothing to share
                    return
                groups.append(cg)
                helper = s.kernel.provisioner.shell_sandbox
                top = psutil.Process(helper.proc.pid)
                sandbox = {top.pid} | {c.pid for c in top.children(recursive=True)}
                assert len(sandbox) == 2, "the idle shell sandbox is its bwrap and the helper"
                assert cg.pids() == sandbox, "a process of the command outlived it in the session's group"
            assert groups[0] is groups[1]
            dirs = list(groups[0].dirs)
            assert all(os.path.isdir(d) for d in dirs)
        finally:
            await m.delete(s.id, "alice")
        assert not any(os.path.isdir(d) for d in dirs), "the session's shell cgroup survived the session"

    asyncio.run(main())
