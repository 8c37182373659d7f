"""Semantic Kernel's SessionsPythonTool against the broker's Azure sessions
API, its code unchanged.  Run with the Python of the Semantic Kernel
virtualenv by tests/test_aca_semantic_kernel.py (Semantic Kernel's pins do not
fit the broker's own virtualenv):

    python aca_sk_client.py ENDPOINT TOKEN CAFILE WORKDIR IDENTIFIER

Prints one JSON object with what each call returned.  Everything the tool is
given is configuration its constructor takes: the endpoint, a token callback,
an HTTP client that trusts the test's certificate, the upload folder.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import sys

import httpx
from semantic_kernel.core_plugins.sessions_python_tool import SessionsPythonTool
from semantic_kernel.core_plugins.sessions_python_tool.sessions_python_settings import SessionsPythonSettings


async def main(endpoint: str, token: str, cafile: str, workdir: str, identifier: str) -> dict:
    settings = SessionsPythonSettings()
    settings.session_id = identifier
    client = httpx.AsyncClient(verify=ssl.create_default_context(cafile=cafile), timeout=120)
    tool = SessionsPythonTool(pool_management_endpoint=endpoint, auth_callback=lambda: token, settings=settings,
                              http_client=client, enable_dangerous_file_uploads=True,
                              allowed_upload_directories=[workdir])
    out = {"execute": await tool.execute_code("print('hello from the broker')\n6 * 7")}
    local = os.path.join(workdir, "upload.txt")
    with open(local, "w") as fh:
        fh.write("uploaded by semantic kernel\n")
    meta = await tool.upload_file(local_file_path=local)
    out["upload"] = {"filename": meta.filename, "size": meta.size_in_bytes, "full_path": meta.full_path}
    out["read_back"] = await tool.execute_code("open('/mnt/data/upload.txt').read().strip().upper()")
    out["make"] = await tool.execute_code("open('/mnt/data/made.bin', 'wb').write(bytes(range(256)))")
    out["list"] = sorted([f.filename, f.size_in_bytes] for f in await tool.list_files())
    out["download"] = base64.b64encode((await tool.download_file(remote_file_name="made.bin")).read()).decode()
    saved = os.path.join(workdir, "made-copy.bin")
    await tool.download_file(remote_file_name="made.bin", local_file_path=saved)
    with open(saved, "rb") as fh:
        out["download_to_file"] = base64.b64encode(fh.read()).decode()
    out["failure"] = await tool.execute_code("1 / 0")
    await client.aclose()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:6]))))
