"""Bad input and attacks against the running app: each gets a correct result or a clear message,
the server keeps answering, its memory stays bounded and it gives nothing away.

The app runs as its own process (``serve.py``) with tiny random weights, no Hub token, and a
proxy that records any request to another host. Requests go to 127.0.0.1 only.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from pathlib import Path

import gradio
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from packaging.version import Version
from PIL import Image

import app
from tests.helpers.corpus import IMG_ONERROR, PROMPTS, SCRIPT, image_cases, write_image_cases
from tests.helpers.serve import ROOT, call_raw, local_client
from ui import encoding
from ui import server as app_server
from ui.models import VAES, Settings, menu
from ui.tabs import image, prompt
from viz.pixels import fit_for_vae
from viz.upload import load_image

TINY = next(iter(menu(VAES, "tiny")))
IMAGE_NAMES = [case.name for case in image_cases()]
PASSWD_MARK = "root:x:0:0"
APP_SOURCE_MARK = "def build_demo"


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


@pytest.fixture(scope="module")
def client(server):
    return local_client(server.url, download_files=str(server.folder / "downloads"))


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as session:
        yield session


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_image_cases(tmp_path_factory.mktemp("corpus"))


def encode(client: Client, path: Path) -> dict:
    values = client.predict(handle_file(str(path)), TINY, 256, "crop", encoding.MEAN, 0, True, True,
                            api_name="/encode_image")
    return dict(zip(image.OUTPUTS, values, strict=True))


# ---------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_image_corpus(server, client, corpus, name):
    """Each awkward upload is refused with one message naming the file and every other output
    empty, or encoded exactly as the pure functions say (load, then fit to the tiny VAE's 2x)."""
    path, case = corpus[name]
    rss_before = server.rss()
    start = time.monotonic()
    out = encode(client, path)
    if case.error:
        message = out["status"]
        assert re.search(case.error, message.replace("\\", "")), message
        assert name.replace("_", "\\_") in message  # says which file
        assert "Traceback" not in message and 'File "' not in message
        assert out["reconstruction"] is None and out["channels"] is None
    else:
        assert out["status"] is None
        expected, _ = fit_for_vae(load_image(path, encoding.MAX_PIXELS), 256, 2)
        seen = Image.open(out["original"])
        assert np.array_equal(np.asarray(seen.convert("RGB")), np.asarray(expected))
        assert Image.open(out["reconstruction"]).size == expected.size
        assert "PSNR" in out["metrics"]
    # refused or not, it is quick and does not balloon the server (7.5 GB if the bomb decoded)
    assert time.monotonic() - start < 30
    assert server.rss() - rss_before < 150 * 2**20
    assert server.alive()


def test_file_not_uploaded_by_the_user_is_refused(http):
    """A crafted API call naming a server path instead of an upload reads nothing."""
    for path in ("/etc/passwd", str(ROOT / "app.py"), str(ROOT / "assets" / ".." / "app.py")):
        events = call_raw(http, "encode_image", [
            {"path": path, "meta": {"_type": "gradio.FileData"}},
            TINY, 256, "crop", encoding.MEAN, 0, True, True])
        assert "event: error" in events
        assert PASSWD_MARK not in events and APP_SOURCE_MARK not in events
        assert "Traceback" not in events and "gradio_api/file=" not in events


def test_upload_larger_than_max_file_size_is_refused(server, http):
    limit = 25 * 2**20
    assert app_server.MAX_FILE_SIZE == "25mb"
    files_before = {p for p in server.upload_dir.rglob("*") if p.is_file()}
    response = http.post("gradio_api/upload",
                         files={"files": ("big.png", b"\0" * (limit + 2**20), "image/png")})
    assert response.status_code == 413
    assert "maximum allowed size" in response.text
    leftovers = {p for p in server.upload_dir.rglob("*") if p.is_file()} - files_before
    assert sum(p.stat().st_size for p in leftovers) < limit  # no 26 MB file kept


# ---------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_corpus(server, client, name):
    text = PROMPTS[name]
    out = dict(zip(prompt.OUTPUTS, client.predict(
        text, 1, prompt.MEAN_OVER_HEADS, False, api_name="/inspect_prompt"), strict=True))
    kinds = [t["class_or_confidence"] for t in out["tokens"]]
    pieces = [t["token"] for t in out["tokens"] if t["class_or_confidence"] == "token"]
    assert len(out["tokens"]) == 77 and kinds[0] == "BOS"
    assert all(Path(out[view]).stat().st_size > 0 for view in
               ("embeddings", "norms", "cosine", "attention", "heads", "eos", "download"))
    if name in ("empty", "whitespace"):
        assert kinds[:3] == ["BOS", "EOS", "padding"] and "unconditional" in out["notes"]
    elif name == "5000-words":
        assert kinds[-1] == "EOS" and len(pieces) == 75 and "more tokens were cut" in out["notes"]
    elif name in ("script", "img-onerror"):
        # the markup comes back as plain text pieces; the browser test checks nothing runs
        assert "".join(p.removesuffix("</w>") for p in pieces) == text.replace(" ", "")
    elif name == "emoji":
        assert {"🐎</w>", "👩<U+200D>"} <= set(pieces)  # readable, not "ðŁĲİ</w>"
        assert "<byte 4/4 of 🌕></w>" in pieces  # a split emoji says which bytes it holds
    else:
        assert 0 < len(pieces) <= 75 and "positions used" in out["notes"]
    assert server.alive()


@pytest.mark.parametrize("layer, head, message", [
    (0, prompt.MEAN_OVER_HEADS, "Value 0 is less than minimum value 1"),  # Gradio's slider
    (10_000, "head 1", "Value 10000 is greater than maximum value 2"),
    (1, "head 99", r"Value: head 99 is not in the list of choices: \['mean over heads'"),
])
def test_attention_view_out_of_range(client, layer, head, message):
    with pytest.raises(AppError, match=message):
        client.predict("a cat", layer, head, False, api_name="/attention_view")


def test_malformed_requests_give_no_details(http):
    """Wrong types and values reach Gradio or the handler; the answer names no code or path."""
    bad_calls = [
        ("encode_image", [None, TINY, "not a size", "crop", encoding.MEAN, "x", True, True]),
        ("encode_image", [{"path": "x", "meta": {"_type": "gradio.FileData"}}]),
        ("inspect_prompt", [{"not": "text"}, "one", 7, None]),
        ("attention_view", ["a cat", 1, "head x", False]),
        ("inspect_prompt", ["a" * 200_000, 1, prompt.MEAN_OVER_HEADS, False]),
    ]
    for api_name, data in bad_calls:
        events = call_raw(http, api_name, data)
        for leak in ("Traceback", 'File "', str(ROOT), "site-packages", ".py\""):
            assert leak not in events, (api_name, events[:500])
    assert http.get("gradio_api/info").status_code == 200


# ---------------------------------------------------------------------------------------------
# Files: nothing outside the app's own served folders can be read


def file_probes(server) -> list[str]:
    app_py = str(ROOT / "app.py")
    log = str(server.folder / "server.log")  # beside the upload folder, not in it
    paths = ["/etc/passwd", "../app.py", "app.py", app_py, "assets/../app.py",
             f"{ROOT}/assets/../app.py", f"{ROOT}/assets/%2e%2e/app.py",
             f"{server.upload_dir}/../server.log", log, "/proc/self/environ",
             "file:///etc/passwd", "http://127.0.0.1:1/", "\\etc\\passwd", "//etc/passwd"]
    quoted = [urllib.parse.quote(p, safe="") for p in paths]  # %2F, %2E ...
    dotted = ["%2e%2e/app.py", "%2e%2e%2fapp.py", "..%2fapp.py", "..%252fapp.py",
              "%252e%252e%252fapp.py", "%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
              "..%c0%afapp.py", "....//app.py", "%00/etc/passwd"]
    prefixes = ["gradio_api/file=", "file=", "gradio_api/file/", "file/", "static/", "assets/",
                "gradio_api/proxy=", "gradio_api/custom_component/x/client/js/"]
    return [prefix + p for prefix in prefixes for p in paths + quoted + dotted]


def test_files_outside_served_folders_are_refused(server, http, client):
    # files the app does serve can be fetched, so refusals below are not a broken route:
    # an output, and the example images (served from assets/ as they are)
    served = encode(client, ROOT / "assets" / "cat.png")["reconstruction"]
    assert Path(served).stat().st_size > 0
    example = http.get(f"/gradio_api/file={ROOT}/assets/cat.png")
    assert example.status_code == 200 and example.content.startswith(b"\x89PNG")
    refusals = 0
    for probe in file_probes(server):
        for method in ("GET", "HEAD"):
            response = http.request(method, "/" + probe)
            text = response.text
            assert PASSWD_MARK not in text and APP_SOURCE_MARK not in text, probe
            assert "GRADIO_TEMP_DIR" not in text and "HTTP_PROXY" not in text, probe
            # a 200 is only the front-end's index page (an unknown path under /), never a file
            if response.status_code == 200:
                assert "<!doctype html>" in text.lower()[:200] or method == "HEAD", probe
            else:
                assert response.status_code in (400, 403, 404, 405, 422), (probe, response)
                refusals += 1
            if "proxy=" in probe or ("file" in probe[:16] and "http" in probe.lower()):
                assert response.status_code == 404, probe  # refused before Gradio sees it
    assert refusals > 100
    assert not server.outbound  # nothing was fetched or looked up elsewhere


def test_served_pages_reveal_no_paths(server, http):
    for route in ("", "config", "gradio_api/info", "gradio_api/openapi.json"):
        text = http.get("/" + route).text
        for secret in (str(ROOT), str(server.folder), "HF_TOKEN"):
            assert secret not in text, (route, secret)


# ---------------------------------------------------------------------------------------------
# Settings: share, monitoring, SSR, run history, telemetry, Hub token


def test_launch_settings(monkeypatch):
    seen = {}
    demo = app.build_demo(Settings(weights="tiny"))
    monkeypatch.setattr(demo, "launch", lambda **options: seen.update(options))
    monkeypatch.setattr(app_server, "start_cache_cleaner", lambda max_age_s: None)
    app_server.launch(demo)
    assert seen["share"] is False and seen["enable_monitoring"] is False
    assert seen["show_error"] is False and seen["run_history"] is False
    assert seen["mcp_server"] is False and seen["max_file_size"] == app_server.MAX_FILE_SIZE
    assert seen["server_name"] == "127.0.0.1"
    if Version(gradio.__version__) < Version("6.32"):
        assert seen["ssr_mode"] is False  # advisory: run-history endpoints and a saved token
    assert encoding.MAX_PIXELS <= 40_000_000
    assert [m.cls for m in seen["app_kwargs"]["middleware"]] == [app_server.RefuseOffSiteRequests]
    assert demo.analytics_enabled is False


def test_remove_old_files(tmp_path):
    """The clean-up behind the cache age: files first, then the folders they leave empty."""
    nested = tmp_path / "0a1b" / "image.png"
    nested.parent.mkdir()
    nested.write_bytes(b"png")
    (tmp_path / "tmp-upload").write_bytes(b"")
    app_server.remove_old_files(tmp_path, max_age_s=3600)
    assert nested.exists() and (tmp_path / "tmp-upload").exists()
    app_server.remove_old_files(tmp_path, max_age_s=-1)  # everything is older than that
    assert list(tmp_path.iterdir()) == []


def test_no_share_monitoring_history_or_token(server, http):
    config = http.get("/config").json()
    assert config["run_history"] is False and config["show_error"] is False
    assert config["analytics_enabled"] is False
    assert config["max_file_size"] == 25 * 2**20
    assert config.get("share_url") is None and not config.get("is_space")
    assert config.get("mcp_server") is False
    for route in ("monitoring", "monitoring/summary", "monitoring/x", "gradio_api/monitoring",
                  "gradio_api/runs", "gradio_api/run-history/records",
                  "gradio_api/run-history/buckets", "gradio_api/mcp/sse", "gradio_api/vibe-code",
                  "gradio_api/mcp/schema"):
        assert http.get("/" + route).status_code in (403, 404), route
    assert http.get("/gradio_api/token").json().get("token") is None
    # SSR would answer the root page through a Node server with the app's HTML rendered in it
    assert "x-gradio-ssr" not in {k.lower() for k in http.get("/").headers}
    # Gradio prints a public URL (gradio.live) only when sharing; it tells how to share otherwise
    log = server.log_text()
    assert "Running on local URL:  http://127.0.0.1" in log
    assert "public URL" not in log and "gradio.live" not in log


def test_nothing_left_the_machine(server, client, corpus):
    """Run with no Hub token and the network replaced by a trap: nothing needed one."""
    encode(client, ROOT / "assets" / "cat.png")
    client.predict("a cat", 1, prompt.MEAN_OVER_HEADS, False, api_name="/inspect_prompt")
    assert server.outbound == []
    assert server.alive()


def test_still_serving_after_everything(client):
    out = encode(client, ROOT / "assets" / "coffee.png")
    assert Image.open(out["reconstruction"]).size[0] > 0
    tokens, *_ = client.predict(SCRIPT + IMG_ONERROR, 1, prompt.MEAN_OVER_HEADS, False,
                                api_name="/inspect_prompt")
    assert len(tokens) == 77
