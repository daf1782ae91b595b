"""Many visitors at once, on loopback: every answer arrives and belongs to its own request, the
queue bound gives a clear "busy" answer, and memory and disk use stay bounded.

One server with tiny random weights takes at least 128 requests from 16 concurrent clients,
every one checked: 32 to warm up (two per client, so every worker thread has allocated), then
32 at a time until the run has outlasted the oldest age a kept file may have.
Memory: the resident size may grow by at most 0.45 MB a request after the warm-up, a leak of a
picture or a model output per request would be several times that. Measured: 0.19-0.33 MB a
request while Gradio's caches fill (it levels off after about 270 requests); 0.37-0.50 without
the app's cap on glibc's malloc arenas. Disk: with the cache age set to 6 s, no file the server
keeps may be older than the cache age plus one clean-up interval, and the warm-up's files must
be gone by the end. The figures are written to
``test-output/load.json`` (the README's Reliability section quotes them).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest.mock import patch

import httpx
import pytest
from gradio_client import handle_file
from gradio_client.utils import QueueError
from PIL import Image

from tests.helpers.serve import ROOT, folder_bytes, in_process, local_client, serve
from ui import encoding
from ui.models import VAES, Settings, menu
from ui.tabs import image, prompt
from viz import text_encoder

CLIENTS = 16
WARM_UP, TOTAL = 32, 128
GROWTH_PER_REQUEST_MB = 0.45
CACHE_MAX_AGE_S = 6  # SD_PARTS_CACHE_MAX_AGE for this server: Gradio cleans every second
REQUEST_TIMEOUT_S = 120  # one request, queued behind 15 others on 2 cores
# Gradio removes uploads and served copies older than the cache age every age/6 seconds; the
# app removes its own downloads older than age/4 at each request. The oldest file each may keep,
# with 10 s of slack for a clean-up that waits its turn on 2 busy cores:
UPLOAD_KEPT_S = CACHE_MAX_AGE_S + CACHE_MAX_AGE_S / 6 + 10
DOWNLOAD_KEPT_S = CACHE_MAX_AGE_S / 4 + 10 + REQUEST_TIMEOUT_S / 10
OLDEST_KEPT_S = max(UPLOAD_KEPT_S, DOWNLOAD_KEPT_S)
WORDS = ["cat", "dog", "horse", "boat", "tree", "house", "bird", "fish", "apple", "chair",
         "clock", "train", "bread", "moon", "lamp", "shoe"]  # one BPE token each
FIGURES = ROOT / "test-output" / "load.json"
TINY = next(iter(menu(VAES, "tiny")))


def client_image(index: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """Client ``index`` sends an image of its own size and colour (sides multiples of 8, so the
    encoder sees it unchanged)."""
    return (64 + 8 * index, 40), (15 * index, 255 - 15 * index, 90)


class Visitor:
    """One person with their own session, image and prompt; checks each answer is theirs."""

    def __init__(self, index: int, url: str, folder: Path) -> None:
        self.index = index
        self.client = local_client(url, download_files=False)
        self.http = httpx.Client(base_url=url, timeout=30, trust_env=False)
        self.size, self.colour = client_image(index)
        self.image = folder / f"client-{index}.png"
        Image.new("RGB", self.size, self.colour).save(self.image)
        self.prompt = f"a photo of a {WORDS[index]} on a table"
        self.attention_png: str | None = None  # the map of our prompt at layer 1, all heads
        self.done = Counter()
        self.uploaded_again = 0  # uploads the cache cleaner removed before their turn

    def request(self, kind: str) -> None:
        getattr(self, kind)()
        self.done[kind] += 1

    def image_round_trip(self) -> None:
        for attempt in range(2):
            values = self.client.submit(handle_file(str(self.image)), TINY, 256, "crop",
                                        encoding.MEAN, 0, True, True, api_name="/encode_image"
                                        ).result(REQUEST_TIMEOUT_S)
            out = dict(zip(image.OUTPUTS, values, strict=True))
            # An upload that waited in the queue longer than this server's short cache age is
            # gone by its turn; the tab says to upload it again, and a visitor does.
            if out["size"] or "upload the image again" not in (out["status"] or "") or attempt:
                break
            self.uploaded_again += 1
        width, height = self.size
        assert out["size"] and f"Kept {width}x{height}" in out["size"], (self.index, out["status"])
        original = self.http.get(out["original"]["url"])
        original.raise_for_status()
        seen = Image.open(io.BytesIO(original.content)).convert("RGB")
        assert seen.size == self.size and seen.getpixel((3, 3)) == self.colour, self.index
        assert out["reconstruction"]["url"] and "PSNR" in out["metrics"]

    def prompt_inspection(self) -> None:
        out = dict(zip(prompt.OUTPUTS, self.client.submit(
            self.prompt, 1, prompt.MEAN_OVER_HEADS, False,
            api_name="/inspect_prompt").result(REQUEST_TIMEOUT_S), strict=True))
        pieces = [t["token"].removesuffix("</w>") for t in out["tokens"][1:8]]
        assert pieces == ["a", "photo", "of", "a", WORDS[self.index], "on", "a"], pieces
        attention = self.fetch(out["attention"])
        assert self.attention_png in (None, attention)  # the same input gives the same map
        self.attention_png = attention

    def attention_view(self) -> None:
        attention, *_ = self.client.submit(
            self.prompt, 1, prompt.MEAN_OVER_HEADS, False,
            api_name="/attention_view").result(REQUEST_TIMEOUT_S)
        png = self.fetch(attention)
        if self.attention_png is not None:
            assert png == self.attention_png, self.index  # not another visitor's map
        else:
            self.attention_png = png

    def fetch(self, served: dict) -> bytes:
        response = self.http.get(served["url"])
        response.raise_for_status()
        return response.content

    def close(self) -> None:
        self.http.close()
        self.client.close()


KINDS = ["image_round_trip", "prompt_inspection", "attention_view", "attention_view"]


def run_requests(visitors: list[Visitor], count: int, first: int) -> float:
    """Send requests first .. first+count-1, spread over all visitors at once; return seconds."""
    jobs: dict[int, list[str]] = {v.index: [] for v in visitors}
    for number in range(first, first + count):
        visitor = number % len(visitors)
        jobs[visitor].append(KINDS[(number // len(visitors) + visitor) % len(KINDS)])

    def work(visitor: Visitor) -> None:
        for kind in jobs[visitor.index]:
            visitor.request(kind)

    start = time.monotonic()
    with ThreadPoolExecutor(len(visitors)) as pool:
        for future in [pool.submit(work, v) for v in visitors]:
            future.result(timeout=REQUEST_TIMEOUT_S * 4)  # re-raises a failed check
    return time.monotonic() - start


def kept_files(server) -> dict[str, tuple[int, int]]:
    output_dirs = list(server.tmp_dir.glob("sd-parts-*"))
    assert len(output_dirs) == 1
    return {"gradio": folder_bytes(server.upload_dir), "downloads": folder_bytes(output_dirs[0])}


def old_files(folder: Path, age_s: float) -> list[Path]:
    """Files created more than age_s ago (the clean-up may remove some while we look)."""
    now = time.time()
    found = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and now - path.stat().st_ctime > age_s:
                found.append(path)
        except FileNotFoundError:
            pass
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("load-server")
    with serve(folder, env={"SD_PARTS_CACHE_MAX_AGE": str(CACHE_MAX_AGE_S)}) as running:
        yield running


def test_many_clients_memory_and_disk(server, tmp_path):
    with ThreadPoolExecutor(CLIENTS) as pool:  # each client reads the page's API first
        visitors = list(pool.map(lambda i: Visitor(i, server.url, tmp_path), range(CLIENTS)))
    figures = {"clients": CLIENTS}
    sent = WARM_UP
    try:
        figures["warm_up_s"] = run_requests(visitors, WARM_UP, 0)
        figures["rss_after_warm_up_mb"] = server.rss() / 2**20
        figures["files_after_warm_up"] = kept_files(server)
        figures["more_s"] = 0.0
        # at least TOTAL requests, and for longer than any file may be kept: a clean-up that
        # failed would leave files older than the limits checked below
        while sent < TOTAL or figures["warm_up_s"] + figures["more_s"] <= OLDEST_KEPT_S + 2:
            figures["more_s"] += run_requests(visitors, WARM_UP, sent)
            sent += WARM_UP
        figures["rss_after_all_mb"] = server.rss() / 2**20
        figures["files_after_all"] = kept_files(server)
    finally:  # each client waits up to a second for its heartbeat thread: close them at once
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(Visitor.close, visitors))
    done = sum((v.done for v in visitors), Counter())
    figures["answered"] = dict(done)
    figures["uploaded_again"] = sum(v.uploaded_again for v in visitors)
    figures["requests"] = sent
    figures["seconds_per_request"] = (figures["warm_up_s"] + figures["more_s"]) / sent
    growth = figures["rss_after_all_mb"] - figures["rss_after_warm_up_mb"]
    figures["growth_per_request_mb"] = growth / (sent - WARM_UP)
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))

    assert sum(done.values()) == sent and all(v.attention_png for v in visitors)
    assert figures["growth_per_request_mb"] <= GROWTH_PER_REQUEST_MB
    # The run outlasts every limit, so the warm-up's files must be gone, and none kept is older
    # than allowed.
    assert figures["warm_up_s"] + figures["more_s"] > OLDEST_KEPT_S
    assert old_files(server.upload_dir, UPLOAD_KEPT_S) == []
    output_dir = next(server.tmp_dir.glob("sd-parts-*"))
    assert old_files(output_dir, DOWNLOAD_KEPT_S) == []
    # the examples outlive the cache age: they are served from assets/, not from the cache
    example = httpx.get(f"{server.url}gradio_api/file={ROOT}/assets/cat.png", trust_env=False)
    assert example.status_code == 200
    assert server.outbound == [] and server.alive()


# ---------------------------------------------------------------------------------------------
# The queue bound


def test_full_queue_says_busy():
    """With room for 2 waiting requests, a burst of 12 gets 'busy' answers, and the rest finish.

    The queue is Gradio's own, the same in-process as in a server process of its own. The
    running answers wait until every request has been sent, so the queue is still full when the
    last one arrives however fast a tiny model answers."""
    sent = threading.Event()
    drawn = text_encoder.norms_view

    def norms_view_after_the_burst(*args: object) -> object:
        sent.wait(REQUEST_TIMEOUT_S)
        return drawn(*args)

    with in_process(Settings(weights="tiny", queue_size=2)) as url, \
            patch.object(text_encoder, "norms_view", norms_view_after_the_burst):
        try:
            with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
                client = local_client(url, download_files=False)
                data = ["a photo of a cat", 1, prompt.MEAN_OVER_HEADS, False]
                answers = [http.post("gradio_api/call/inspect_prompt", json={"data": data})
                           for _ in range(12)]
                # gradio_client turns the same refusal into an exception with a plain message
                with pytest.raises(QueueError, match="^Queue is full! Please try again.$"):
                    client.submit(*data, api_name="/inspect_prompt").result(REQUEST_TIMEOUT_S)
                sent.set()

                codes = Counter(a.status_code for a in answers)
                assert set(codes) <= {200, 503}
                assert codes[503] >= 6 and codes[200] >= 3, codes  # 1 running + 2 waiting, at least
                assert all(a.json()["detail"] == "Queue is full. Max size is 2 and size is 2."
                           for a in answers if a.status_code == 503)
                for answer in answers:  # every accepted request is answered in full
                    if answer.status_code == 200:
                        event = answer.json()["event_id"]
                        with http.stream("GET", f"gradio_api/call/inspect_prompt/{event}",
                                         timeout=REQUEST_TIMEOUT_S) as stream:
                            text = "".join(stream.iter_text())
                        assert "event: complete" in text and "startoftext" in text
                # the queue drained: the refused client is served now
                values = client.predict(*data, api_name="/inspect_prompt")
                assert len(values[0]) == 77
                client.close()
        finally:  # a failed check must not leave the answers waiting
            sent.set()

