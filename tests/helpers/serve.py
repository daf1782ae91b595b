"""Run ``app.py`` as its own server process on a free loopback port, as a person would start it.

The browser, robustness and load tests talk to this server over HTTP, so they see exactly what a
visitor sees: the real launch settings, the real queue, the real upload folder and a process whose
memory can be measured. The server gets fresh folders for Gradio's uploads and cache
(``GRADIO_TEMP_DIR``) and for everything else (``TMPDIR``, where the app writes its downloads), no
Hub token, and a proxy that leads nowhere: any request the app tries to make to another host lands
in ``Server.outbound``, so a test can prove that nothing leaves the machine.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from gradio_client import Client
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120  # importing torch and gradio on a busy 2-core machine takes a while
STOP_TIMEOUT_S = 15


def fetch(value: dict) -> bytes:
    """The bytes of a file output as gradio_client returns it with download_files=False."""
    response = httpx.get(value["url"], timeout=30, trust_env=False)
    response.raise_for_status()
    return response.content


def picture(value: dict) -> np.ndarray:
    """An image output's pixels (H, W, 3)."""
    return np.asarray(Image.open(io.BytesIO(fetch(value))).convert("RGB"))


def call_raw(http: httpx.Client, api_name: str, data: list, session: str | None = None) -> str:
    """Call an endpoint as a bare HTTP client does; return the whole event stream as text.

    Without ``session`` each call is a session of its own, for which Gradio builds the state of
    every component on the page anew (some 40 ms with this app's 400-odd blocks); a browser's
    page makes all its calls in one session, named by ``session``.
    """
    body = {"data": data} | ({"session_hash": session} if session else {})
    posted = http.post(f"gradio_api/call/{api_name}", json=body)
    posted.raise_for_status()
    with http.stream("GET", f"gradio_api/call/{api_name}/{posted.json()['event_id']}") as events:
        return "".join(events.iter_text())


def answer(events: str) -> list:
    """The output values of a ``call_raw`` event stream that completed."""
    complete = events.rsplit("event: complete\n", 1)
    if len(complete) != 2:
        raise RuntimeError(f"the call did not complete: {events[-500:]}")
    return json.loads(complete[1].split("data:", 1)[1].strip())


def upload(http: httpx.Client, path: Path) -> dict:
    """``path`` uploaded as a visitor's browser sends it; the value an image input takes."""
    with path.open("rb") as file:
        posted = http.post("gradio_api/upload", files={"files": (path.name, file)})
    posted.raise_for_status()
    return {"path": posted.json()[0], "meta": {"_type": "gradio.FileData"}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def in_process(settings: object) -> Iterator[str]:
    """The app with ``settings`` (an ``Settings``) served from this process on a free port,
    with the real launch options; yields its URL and closes it afterwards. Tests that replace a
    model or count calls use this; the others use ``Server`` (a process of its own)."""
    import app  # here: importing it builds the page, which only these tests need

    with serving(app.build_demo(settings)) as url:
        yield url


def local_client(url: str, **options: object) -> Client:
    """A quiet ``gradio_client.Client`` for the app served at ``url`` over plain HTTP.

    ``ssl_verify=False``: otherwise gradio_client builds a TLS context from the CA bundle for
    each HTTP request it makes (about 20 ms of CPU each, several per call), though no TLS is
    ever spoken to an ``http://127.0.0.1`` address; on 2 cores that work slows the server too.
    """
    return Client(url, verbose=False, ssl_verify=False, **options)


@contextmanager
def serving(demo: object) -> Iterator[str]:
    """A page (``gr.Blocks``) served from this process on a free port with the real launch
    options; yields its URL and closes it afterwards."""
    from ui import server

    port = free_port()
    server.launch(demo, server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


class OutboundTrap:
    """A loopback listener used as the server's HTTP(S) proxy: it records and drops every request.

    Every outgoing request of the app that honours the proxy variables (httpx, requests, urllib,
    huggingface_hub) reaches this socket instead of the network.
    """

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(1.0)
                try:
                    first_line = conn.recv(1024).split(b"\r\n", 1)[0]
                except OSError:
                    first_line = b"(nothing read)"
                self.requests.append(first_line.decode("latin-1"))

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=2)


@dataclass
class Server:
    url: str  # ends with "/"
    process: subprocess.Popen
    folder: Path  # everything the server writes lives under here
    log: Path
    outbound: list[str] = field(default_factory=list)  # first lines of requests to other hosts

    @property
    def upload_dir(self) -> Path:
        """GRADIO_TEMP_DIR: uploaded files and Gradio's copies of every served output."""
        return self.folder / "gradio"

    @property
    def tmp_dir(self) -> Path:
        """TMPDIR: the app's own download folder (OUTPUT_DIR) is made in here."""
        return self.folder / "tmp"

    def rss(self) -> int:
        """Resident memory of the server process in bytes."""
        return psutil.Process(self.process.pid).memory_info().rss

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(number of files, total bytes) under a folder, skipping files and folders that vanish
    while we look (the server's cleaner removes them; os.walk passes over a folder gone)."""
    count = total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_size
                count += 1
            except FileNotFoundError:
                pass
    return count, total


def server_env(folder: Path, proxy_port: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GRADIO_SERVER_NAME")}
    proxy = f"http://127.0.0.1:{proxy_port}"
    env |= {
        "GRADIO_TEMP_DIR": str(folder / "gradio"),
        "TMPDIR": str(folder / "tmp"),
        "HF_HOME": str(folder / "hf-home"),  # empty: no saved token, no cached weights
        "HF_HUB_OFFLINE": "1",
        "MPLCONFIGDIR": str(folder / "matplotlib"),
        "SD_PARTS_CACHE_DIR": str(folder / "cache"),  # the example runs this server keeps
        "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "ALL_PROXY": proxy,
        "http_proxy": proxy, "https_proxy": proxy, "all_proxy": proxy,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",  # tiny models: a second thread only waits for the first
    }
    return env | extra


@contextmanager
def serve(folder: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start ``python app.py --weights tiny *args`` and yield once it answers; stop it afterwards.

    Gradio prints "Running on" before the server accepts requests, so readiness is a successful
    ``GET /gradio_api/info``, polled for at most START_TIMEOUT_S.
    """
    for name in ("gradio", "tmp", "hf-home", "matplotlib"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    port = free_port()
    trap = OutboundTrap()
    log = folder / "server.log"
    process_env = server_env(folder, trap.port, (env or {}) | {"GRADIO_SERVER_PORT": str(port)})
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--weights", "tiny", *args],
            cwd=ROOT, env=process_env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = Server(f"http://127.0.0.1:{port}/", process, folder, log, trap.requests)
    try:
        wait_until_ready(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
        trap.close()


def wait_until_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(timeout=5, trust_env=False) as http:
        while time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError(f"the app exited during start-up:\n{server.log_text()[-4000:]}")
            try:
                if http.get(server.url + "gradio_api/info").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    raise RuntimeError(f"the app did not answer within {START_TIMEOUT_S} s:\n"
                       f"{server.log_text()[-4000:]}")
