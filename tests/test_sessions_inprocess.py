"""SessionManager used in-process (as `broker replay` does), with real kernels."""

from __future__ import annotations

import asyncio
import os

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
