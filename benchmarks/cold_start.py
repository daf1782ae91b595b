"""Cold start: from ``python app.py`` to the first answer, with the weights already cached.

The real checkpoints cannot be downloaded here, so this writes full-size random SD v1 weights
in the Hub's own layout (diffusers/transformers ``save_pretrained``) into a temporary Hugging Face
cache, then starts the app as a user would, with ``HF_HUB_OFFLINE=1``, and times:

- process start -> the server answers ``/gradio_api/info``;
- the first ``inspect_prompt`` (loads the text encoder from the cache, runs it);
- the first ``encode_image`` at 256 px (loads the VAE from the cache, encodes and decodes);
- the peak resident memory of the app process, against the size of the weights it loaded.

    python benchmarks/cold_start.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_weights import build_hub_cache  # noqa: E402

from tests.helpers.references import reference_text_encoder, reference_vae  # noqa: E402
from tests.helpers.serve import free_port  # noqa: E402

REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def write_cache(cache: Path) -> int:
    """Full-size random weights in the Hub cache layout; returns the weights' size in bytes."""
    staging = cache.parent / "staging"
    reference_vae().save_pretrained(staging / "vae")
    reference_text_encoder().save_pretrained(staging / "text_encoder")
    files = {f"{sub}/{f.name}": f for sub in ("vae", "text_encoder")
             for f in (staging / sub).iterdir()}
    build_hub_cache(cache, REPO, files)
    size = sum(f.stat().st_size for f in files.values() if f.suffix == ".safetensors")
    shutil.rmtree(staging)
    return size


def main() -> None:
    from gradio_client import Client, handle_file

    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    try:
        weights_bytes = write_cache(work / "cache")
        port = free_port()
        env = os.environ | {"HF_HUB_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1",
                            "GRADIO_SERVER_PORT": str(port), "GRADIO_TEMP_DIR": str(work / "tmp"),
                            "SD_PARTS_WEIGHTS": "hub"}
        start = time.perf_counter()
        server = subprocess.Popen([sys.executable, str(ROOT / "app.py")], env=env, cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        process = psutil.Process(server.pid)
        peak = 0
        try:
            url = f"http://127.0.0.1:{port}/"
            while True:
                try:
                    urllib.request.urlopen(url + "gradio_api/info", timeout=1).close()
                    break
                except OSError:
                    if time.perf_counter() - start > 120 or server.poll() is not None:
                        raise RuntimeError("the app did not start") from None
                    time.sleep(0.1)
            ready = time.perf_counter() - start
            client = Client(url, verbose=False)
            t0 = time.perf_counter()
            client.predict("a photo of a cat", 1, "mean over heads", False,
                           api_name="/inspect_prompt")
            prompt_s = time.perf_counter() - t0
            peak = max(peak, process.memory_info().rss)
            t0 = time.perf_counter()
            client.predict(handle_file(str(ROOT / "assets" / "cat.png")), "SD v1.5 VAE", 256,
                           "crop", "posterior mean", 0, True, False, api_name="/encode_image")
            image_s = time.perf_counter() - t0
            peak = max(peak, process.memory_info().rss)
        finally:
            server.terminate()
            server.wait(timeout=30)
        print("| step | seconds |\n| --- | --- |")
        print(f"| `python app.py` -> server answers | {ready:.1f} |")
        print(f"| first prompt (loads the text encoder) | {prompt_s:.1f} |")
        print(f"| first image, 256 px (loads the VAE) | {image_s:.1f} |")
        print(f"| total to both first answers | {ready + prompt_s + image_s:.1f} |")
        print(f"\nweights loaded: {weights_bytes / 2**20:.0f} MiB; app resident memory after both: "
              f"{peak / 2**20:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
