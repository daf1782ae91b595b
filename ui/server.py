"""The server around the app: launch options, hardening, and clean-up of what visitors leave.

The app is meant for a public address, so the server serves only its own files (requests that
would make it fetch from another host are refused before Gradio sees them), turns off sharing,
monitoring, run history, the MCP server and telemetry, caps glibc's malloc arenas so memory stays
flat under load, and removes uploads and outputs older than the cache age.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import gradio as gr
import torch
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse

MAX_FILE_SIZE = "25mb"
CSS_FILE = Path(__file__).with_name("style.css")


# Gradio's file route fetches any public web address it is given and streams it back (asking a
# public DNS service about hosts it cannot resolve), and its proxy route serves apps loaded with
# gr.load. This app serves only its own files, so both are refused before Gradio sees them.
OFF_SITE_ROUTE = re.compile(r"/(file[=/]\s*[a-z][a-z0-9+.-]+:|proxy=)", re.IGNORECASE)


class RefuseOffSiteRequests:
    """ASGI middleware: 404 for requests that would make the server reach another host."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and OFF_SITE_ROUTE.search(unquote(scope["path"])):
            await PlainTextResponse("Not found", status_code=404)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Keep the server's memory flat under load (Linux with glibc; elsewhere nothing happens).

    glibc gives each thread that allocates its own memory arena, up to 8 per core, and seldom
    hands their freed pages back. Gradio runs handlers on a pool of threads, so without a limit
    the resident memory creeps up by about 1 MB a request until every arena has grown. A
    MALLOC_ARENA_MAX set in the environment wins.
    """
    if sys.platform != "linux" or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # -8 is M_ARENA_MAX in glibc's malloc.h
    except (OSError, AttributeError):  # another C library
        pass


def remove_old_files(folder: Path, max_age_s: float) -> None:
    """Delete files under folder created more than max_age_s ago, then folders left empty."""
    now = time.time()
    for path in sorted(folder.rglob("*"), reverse=True):  # a folder's files before the folder
        try:
            if now - path.lstat().st_ctime <= max_age_s:
                continue
            if path.is_dir():
                path.rmdir()  # only when empty; an OSError says it is not
            else:
                path.unlink()
        except OSError:  # in use, not empty, or removed meanwhile
            pass


def start_cache_cleaner(max_age_s: int) -> None:
    """Every max_age_s / 6 seconds, remove what is older than max_age_s from Gradio's folder.

    Gradio's own delete_cache misses the empty temporary file each upload leaves, and under
    concurrent requests its clean-up task can stop for good (it iterates a set that requests
    add to). Everything in this folder is an upload or an output: the examples are served from
    assets/. Point GRADIO_TEMP_DIR at a folder of this app's own.
    """
    folder = Path(gr.utils.get_upload_folder())

    def clean() -> None:
        while True:
            time.sleep(max(1, max_age_s // 6))
            if folder.is_dir():
                remove_old_files(folder, max_age_s)

    threading.Thread(target=clean, name="cache-cleaner", daemon=True).start()


def launch(demo: gr.Blocks, **overrides: object) -> None:
    """Start the server with the app's security settings (tests pass a port and no blocking)."""
    # every core this process may use, unless OMP_NUM_THREADS says otherwise (the tests' tiny
    # models run faster on one thread than on two that wait for each other)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0)
                          or len(os.sched_getaffinity(0)))
    limit_malloc_arenas()
    start_cache_cleaner(demo.delete_cache[1])
    options = dict(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=MAX_FILE_SIZE,
        share=False,
        show_error=False,  # gr.Error messages are shown; other exceptions give no details
        enable_monitoring=False,
        ssr_mode=False,  # Gradio < 6.32: run-history endpoints could misuse a Hub token with SSR
        run_history=False,
        mcp_server=False,
        css=CSS_FILE.read_text(encoding="utf-8"),
        footer_links=[],
        app_kwargs={"middleware": [Middleware(RefuseOffSiteRequests)]},
    )
    demo.launch(**(options | overrides))
