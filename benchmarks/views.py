"""What the app's views cost on top of the models they show, with full-size random weights.

The app runs in this process with ``--weights random`` (SD v1's VAE and CLIP text encoder,
seeded random weights: the same arithmetic as the real ones) and is called over HTTP as a
visitor's browser calls it: one kept-alive connection, every call in one session (a page's calls
share one: without it Gradio builds every component's state anew for each call), the upload, the
call queued and its event stream read until the answer is complete, so the times include
Gradio's queue and the encoding of every picture. (``gradio_client`` builds a new TLS context
for every call, some 40 ms of CPU that this process's server would share and that a browser
never spends.) Each round times the model alone and then the tab, one right after the other, so
a busy neighbour slows both alike; the ratios are the medians of the rounds' ratios.

- Prompt tab: the time of ``inspect_prompt`` (a new prompt each round, so the text encoder runs
  every time) against the text encoder's own forward pass with hidden states and attention maps.
  Target: at most 2x.
- Prompt tab, another layer: ``attention_view`` for another layer of the same prompt, whose
  encoder output the tab keeps: the attention views alone, beside the text encoder's time.
- Image tab: the time of ``encode_image`` at 384 px against the VAE's own encode + decode of the
  same image in the same mode. Target: the views add at most 15%.
- Compare tab: ``compare`` with the VAEs it ticks at first (SD v1's, FLUX.1's 16-channel one and
  TAESD) against their own encode + decode of the same image. Target: at most +20%.
- Prompt lab: ``compare_prompts`` against the text encoder's pass over both prompts.

Beside each ratio it prints the views' own cost (the median of the rounds' tab time minus model
time, in milliseconds) and a second ratio: against the same models timed first in a fresh
process (``--models-only``, run as a subprocess before the server starts), where nothing else
shares the process. The CPU (its bfloat16 flags) and the load average before and after are
printed too: a machine whose load was above a tenth of a core before the run was not quiet, and
its numbers are only comparable side by side.

    python benchmarks/views.py               # ~3 minutes on 2 cores with bfloat16, ~12 on AVX2 only
    python benchmarks/views.py --rounds 7
    python benchmarks/views.py --cases prompt layer --rounds 9   # some of the cases only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
import sd_parts  # noqa: E402
from benchmarks.unet import cpu_description  # noqa: E402
from tests.helpers import serve as http_calls  # noqa: E402
from tests.helpers.serve import free_port  # noqa: E402
from ui import encoding, server  # noqa: E402
from ui.models import Models, Settings  # noqa: E402
from ui.shared import on_own_thread  # noqa: E402
from ui.tabs import compare, prompt  # noqa: E402
from viz import pixels, upload  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
EXAMPLE = encoding.ASSETS / "astronaut.png"
MODEL_OF = {"prompt": "text", "layer": "text", "image": "vae", "compare": "vaes", "lab": "pair"}
CASES = tuple(MODEL_OF)
SESSION = "one-visitors-page"  # a browser's page makes all its calls in one session


def paired(model: Callable[[int], object], tab: Callable[[int], object], rounds: int
           ) -> tuple[float, float, float, float]:
    """Median seconds of ``model(i)`` and of ``tab(i)``, the median of their ratios and of their
    differences (the views' own cost), over ``rounds`` rounds that run one right after the
    other; one untimed warm-up round first."""
    model(-1)
    tab(-1)
    model_s, tab_s = [], []
    for i in range(rounds):
        for run, times in ((model, model_s), (tab, tab_s)):
            start = time.perf_counter()
            run(i)
            times.append(time.perf_counter() - start)
    pairs = list(zip(model_s, tab_s, strict=True))
    return (statistics.median(model_s), statistics.median(tab_s),
            statistics.median(t / m for m, t in pairs), statistics.median(t - m for m, t in pairs))


def median_s(run: Callable[[int], object], rounds: int) -> float:
    run(-1)
    times = []
    for i in range(rounds):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_runs(models: Models, size: int) -> tuple[dict[str, Callable[[int], object]], dict]:
    """Each case's model alone, as its tab runs it, and what the tab calls need to know."""
    settings = models.settings
    read = prompt.read_tokens(models.tokenizer(), PROMPT)
    ids = torch.tensor([read.ids])
    encoder = models.text_encoder()

    def encode_text(_: int) -> object:
        with torch.inference_mode():
            return encoder(ids, output_hidden_states=True, output_attentions=True)

    # the VAE alone on the image the tab encodes, in the tab's default mode
    exact = bool(torch.float32 == sd_parts.fast_dtype("cpu"))
    vae = models.vae(settings.vae_choices[0], exact)
    fitted, _ = pixels.fit_for_vae(upload.load_image(EXAMPLE, encoding.MAX_PIXELS), size,
                                   vae.downscale)
    tensor = pixels.image_to_tensor(fitted)

    def round_trip(_: int) -> object:
        return vae.decode(vae.encode(tensor).mean)

    # the comparison's first choices, each VAE's own round trip on the same image
    ticked = [settings.vae_choices[0], settings.vae_choices[-1], settings.tiny_vae_choices[0]]
    vaes = [models.vae(c, exact) for c in ticked[:2]] + [models.tiny_vae(ticked[2], exact)]

    def round_trips(_: int) -> object:
        return [compare.round_trip(v, fitted) for v in vaes]

    # two prompts through the text encoder, as the prompt lab runs them
    pair_ids = torch.tensor([read.ids, prompt.read_tokens(models.tokenizer(),
                                                          PROMPT + ", at night").ids])

    def encode_pair(_: int) -> object:
        with torch.inference_mode():
            return encoder(pair_ids, output_hidden_states=True)

    runs = {"text": encode_text, "vae": round_trip, "vaes": round_trips, "pair": encode_pair}
    return runs, {"exact": exact, "fitted": fitted, "ticked": ticked}


def fresh_process_times(rounds: int, size: int, cases: list[str] | None
                        ) -> dict[str, float]:
    """The models' median seconds in a new process that runs nothing else."""
    answer = subprocess.run([sys.executable, __file__, "--models-only", "--rounds", str(rounds),
                             "--size", str(size), *(["--cases", *cases] if cases else [])],
                            check=True, capture_output=True, text=True)
    return json.loads(answer.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=384, choices=compare.SIZES,
                        help="the longer side of the image (a size both tabs offer)")
    parser.add_argument("--cases", nargs="+", choices=CASES, help="only these (default: all)")
    parser.add_argument("--models-only", action="store_true",
                        help="time the models alone and print their medians as JSON")
    args = parser.parse_args()
    settings = Settings(weights="random")
    if args.models_only:
        runs, _ = model_runs(Models(settings), args.size)
        keys = {MODEL_OF[case] for case in args.cases or CASES}
        print(json.dumps({key: median_s(runs[key], args.rounds) for key in keys}))
        return
    load_before = os.getloadavg()
    fresh = fresh_process_times(args.rounds, args.size, args.cases)
    models = Models(settings)
    demo = app.build_demo(settings)
    port = free_port()
    server.launch(demo, server_port=port, prevent_thread_lock=True, quiet=True)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}/", timeout=600, trust_env=False)

    def call(api_name: str, *data: object) -> list:
        return http_calls.answer(http_calls.call_raw(http, api_name, list(data), SESSION))

    # built and timed on threads of their own, as the tabs run them: a model run on this thread
    # would leave it an OpenMP team, and a second team slows every model call in the process
    # (ui.shared.on_own_thread). The fresh process runs them on its main thread, its one team.
    built, known = on_own_thread(lambda: model_runs(models, args.size))
    runs = {key: lambda i, run=run: on_own_thread(lambda: run(i)) for key, run in built.items()}
    exact, fitted, ticked = known["exact"], known["fitted"], known["ticked"]
    # (name, title, model's key, model's name, target, the tab's call)
    calls = [
        ("prompt", "prompt tab, new prompt", "text", "text encoder", "2x", lambda i: call(
            "inspect_prompt", f"{PROMPT}, take {i + 1}", 1, prompt.MEAN_OVER_HEADS, False)),
        ("layer", "prompt tab, another layer", "text", "text encoder", "-", lambda i: call(
            "attention_view", PROMPT, 2 + i % 10, prompt.MEAN_OVER_HEADS, False)),
        ("image", f"image tab {fitted.width}x{fitted.height}", "vae", "VAE encode + decode",
         "+15%", lambda _: call("encode_image", http_calls.upload(http, EXAMPLE),
                                settings.vae_choices[0], args.size, "crop", encoding.MEAN, 0,
                                True, exact)),
        ("compare", f"compare tab, {len(ticked)} VAEs", "vaes", "their encode + decode", "+20%",
         lambda _: call("compare", http_calls.upload(http, EXAMPLE), args.size, ticked, exact,
                        64)),
        ("lab", "prompt lab, two prompts", "pair", "text encoder, both", "-", lambda i: call(
            "compare_prompts", f"{PROMPT}, take {i + 1}", f"{PROMPT}, take {i + 1}, at night",
            True)),
    ]
    try:
        cases = [(title, key, model, target, paired(runs[key], tab, args.rounds))
                 for name, title, key, model, target, tab in calls
                 if not args.cases or name in args.cases]
    finally:
        http.close()
        demo.close()
    load_after = os.getloadavg()

    mode = "exact (float32)" if exact else f"fast ({sd_parts.fast_dtype('cpu')})"
    quiet = load_before[0] < 0.1
    print(f"{cpu_description()}; {os.cpu_count()} cores; {mode}; full-size random weights; "
          f"median of {args.rounds} rounds")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after: "
          + ("a quiet machine" if quiet else "NOT a quiet machine, compare only side by side")
          + "\n")
    print("| case | time | views' own cost | model in this process | ratio | model in a fresh "
          "process | ratio | target |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for title, key, model, target, (model_s, tab_s, ratio, views_s) in cases:
        def shown(r: float, target: str = target) -> str:
            return f"{100 * (r - 1):+.0f}%" if target.startswith("+") else f"{r:.2f}x"
        print(f"| {title} | {tab_s * 1000:,.0f} ms | {views_s * 1000:,.0f} ms | {model} "
              f"{model_s * 1000:,.0f} ms | {shown(ratio)} | {fresh[key] * 1000:,.0f} ms | "
              f"{shown(tab_s / fresh[key])} | {'at most ' + target if target != '-' else '-'} |")


if __name__ == "__main__":
    main()
