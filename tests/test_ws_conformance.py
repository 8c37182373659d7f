"""jupyter_kernel_test's protocol suite against a broker kernel reached only
through the broker's WebSocket, in both framings.

jupyter_kernel_test drives a ``BlockingKernelClient`` it gets from
``start_new_kernel``.  Here ``setUpClass`` is overridden: the kernel is made
with ``POST /api/kernels`` on a real ``broker serve`` and the client is
``WSKernelClient``, a ``BlockingKernelClient`` whose shell, iopub, stdin and
control channels are queues fed by one WebSocket (a reader thread routes
frames by their channel) and whose sends go out as frames.  Everything above
the channels (``execute``, ``complete``, ``history``, ``wait_for_ready``,
``input`` ...) is jupyter_client's own code, and every reply is checked by
jupyter_kernel_test's message schemas.  Not adapted: ``execute_interactive``
(it polls the ZeroMQ sockets directly) and the heartbeat (there is none over
a WebSocket; the adapter's reports alive while the socket is open).
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
import time
import uuid

import jupyter_kernel_test as jkt
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.jsonutil import extract_dates
from jupyter_client.session import Session
from jupyter_kernel_test.msgspec_v5 import validate_message

from tests.gateway_helpers import BrokerServer, Closed, KernelWS, encode_frame

_broker: BrokerServer | None = None
_tmp: str | None = None


def setUpModule():
    global _broker, _tmp
    _tmp = tempfile.mkdtemp(prefix="gw-conformance-")
    _broker = BrokerServer(_tmp)
    _broker.start()


def tearDownModule():
    if _broker is not None:
        _broker.stop()
    if _tmp is not None:
        shutil.rmtree(_tmp, ignore_errors=True)


class WSChannel:
    """One jupyter_client channel carried over the shared WebSocket."""

    def __init__(self, name: str, transport: "WSTransport"):
        self.name = name
        self.transport = transport
        self.queue: queue.Queue = queue.Queue()
        self._running = False

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        self.stop()

    def is_alive(self) -> bool:
        return self._running and self.transport.open

    def send(self, msg: dict) -> None:
        self.transport.send(self.name, msg)

    def get_msg(self, timeout: float | None = None) -> dict:
        return self.queue.get(timeout=timeout if timeout is not None else 3600)

    def get_msgs(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out

    def msg_ready(self) -> bool:
        return not self.queue.empty()


class WSHeartbeat:
    def __init__(self, transport: "WSTransport"):
        self.transport = transport

    def start(self):
        pass

    def stop(self):
        pass

    def close(self):
        pass

    def pause(self):
        pass

    def unpause(self):
        pass

    def is_alive(self) -> bool:
        return self.transport.open

    def is_beating(self) -> bool:
        return self.transport.open


class WSTransport:
    """The WebSocket and the thread that reads it."""

    def __init__(self, url: str, token: str, v1: bool, session_id: str):
        self.client = KernelWS(url, token, v1=v1, session_id=session_id, timeout=30)
        self.v1 = v1
        self.channels = {name: WSChannel(name, self) for name in ("shell", "iopub", "stdin", "control")}
        self.open = True
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True, name="ws-reader")
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.client.recv(0.5)
            except TimeoutError:
                continue
            except Closed as exc:
                self.error = exc
                break
            except BaseException as exc:  # surfaced by the tests through `error`
                self.error = exc
                break
            channel = msg.pop("channel")
            msg["header"] = extract_dates(msg["header"])
            msg["parent_header"] = extract_dates(msg["parent_header"])
            self.channels[channel].queue.put(msg)
        self.open = False

    def send(self, channel: str, msg: dict) -> None:
        frame = {"channel": channel, "header": msg["header"], "parent_header": msg.get("parent_header") or {},
                 "metadata": msg.get("metadata") or {}, "content": msg.get("content") or {},
                 "buffers": msg.get("buffers") or []}
        data, binary = encode_frame(frame, self.v1)
        self.client.send_frame(data, binary)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()
        self.open = False


class WSKernelClient(BlockingKernelClient):
    """jupyter_client's blocking client with WebSocket-backed channels."""

    def __init__(self, url: str, token: str, v1: bool, **kw):
        session_id = uuid.uuid4().hex
        super().__init__(session=Session(session=session_id, username="conformance", key=b""), **kw)
        self.ws = WSTransport(url, token, v1, session_id)
        ch = self.ws.channels
        self._shell_channel = ch["shell"]
        self._iopub_channel = ch["iopub"]
        self._stdin_channel = ch["stdin"]
        self._control_channel = ch["control"]
        self._hb_channel = WSHeartbeat(self.ws)

    def stop_channels(self) -> None:
        super().stop_channels()
        self.ws.close()


class _BrokerWebSocketKernelTests(jkt.KernelTests):
    __test__ = False
    v1 = False

    kernel_name = "python3-sandbox"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise"
    code_execute_result = [{"code": "1+2+3", "result": "6"}, {"code": "[n*n for n in range(4)]",
                                                               "result": "[0, 1, 4, 9]"}]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))", "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))", "mime": "text/latex"},
    ]
    code_history_pattern = "1?2*"
    # "range" is left out: the sandbox keeps IPython history in memory
    # (kernel_profile/ipython_kernel_config.py), and a range by session number
    # finds nothing there; tail and search work.
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    @classmethod
    def setUpClass(cls) -> None:
        cls.broker = _broker
        cls.kernel_id = _broker.create_kernel()["id"]
        url = f"{_broker.ws_url}/api/kernels/{cls.kernel_id}/channels"
        cls.kc = WSKernelClient(url, _broker.token["alice"], cls.v1)
        cls.kc.start_channels()
        cls.kc.wait_for_ready(timeout=60)
        cls.km = None  # the broker owns the kernel; tearDownClass deletes it over REST

    @classmethod
    def tearDownClass(cls) -> None:
        cls.kc.stop_channels()
        cls.broker.delete_kernel(cls.kernel_id)

    def tearDown(self) -> None:
        assert self.kc.ws.error is None, f"the WebSocket failed: {self.kc.ws.error!r}"

    # -- beyond jupyter_kernel_test: protocol paths it does not cover --------------------
    def test_stdin_input_request(self) -> None:
        self.flush_channels()
        msg_id = self.kc.execute("v = input('number? ')\nprint(int(v) + 1)", allow_stdin=True)
        req = self.kc.get_stdin_msg(timeout=15)
        # Not validate_message: jupyter_kernel_test 0.7's schema types
        # input_request.password as a number; the protocol says boolean.
        self.assertEqual(req["msg_type"], "input_request")
        self.assertEqual(req["parent_header"]["msg_id"], msg_id)
        self.assertEqual(req["content"], {"prompt": "number? ", "password": False})
        self.kc.input("42")
        reply = self.get_non_kernel_info_reply(timeout=15)
        validate_message(reply, "execute_reply", msg_id)
        self.assertEqual(reply["content"]["status"], "ok")
        text = ""
        while True:
            msg = self.kc.get_iopub_msg(timeout=5)
            validate_message(msg)
            if msg["msg_type"] == "stream":
                text += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        self.assertIn("43", text)

    def test_interrupt_request_on_control(self) -> None:
        self.flush_channels()
        msg_id = self.kc.execute("import time; time.sleep(30)")
        busy = self.kc.get_iopub_msg(timeout=15)
        self.assertEqual(busy["content"]["execution_state"], "busy")
        time.sleep(0.5)
        msg = self.kc.session.msg("interrupt_request", {})
        self.kc.control_channel.send(msg)
        reply = self.kc.get_control_msg(timeout=15)
        validate_message(reply, "interrupt_reply", msg["header"]["msg_id"])
        exec_reply = self.get_non_kernel_info_reply(timeout=15)
        validate_message(exec_reply, "execute_reply", msg_id)
        self.assertEqual(exec_reply["content"]["status"], "error")
        self.assertEqual(exec_reply["content"]["ename"], "KeyboardInterrupt")

    def test_comm_info(self) -> None:
        self.flush_channels()
        reply = self.kc.comm_info(reply=True, timeout=15)
        validate_message(reply, "comm_info_reply")
        self.assertEqual(reply["content"]["status"], "ok")

    def test_kernel_info_on_control(self) -> None:
        self.flush_channels()
        msg = self.kc.session.msg("kernel_info_request", {})
        self.kc.control_channel.send(msg)
        reply = self.kc.get_control_msg(timeout=15)
        validate_message(reply, "kernel_info_reply", msg["header"]["msg_id"])


class TestBrokerWebSocketLegacy(_BrokerWebSocketKernelTests):
    """No subprotocol: JSON text frames (binary when a message has buffers)."""

    __test__ = True
    v1 = False


class TestBrokerWebSocketV1(_BrokerWebSocketKernelTests):
    """``v1.kernel.websocket.jupyter.org``: binary frames with offsets."""

    __test__ = True
    v1 = True
