"""What the app's views cost on top of the models they show, with full-size random weights.

The app runs in this process with ``--weights random`` (SD v1's VAE and CLIP text encoder, seeded
random weights: the same arithmetic as the real ones) and is called through ``gradio_client``,
as a visitor's browser would, so the times include Gradio's queue and the encoding of every
picture. Each round times the model alone and then the tab, one right after the other, so a busy
neighbour slows both alike; the ratios are the medians of the rounds' ratios.

- Prompt tab: the time of ``inspect_prompt`` (a new prompt each round, so the text encoder runs
  every time) against the text encoder's own forward pass with hidden states and attention maps.
  Target: at most 3x.
- Image tab: the time of ``encode_image`` at 384 px against the VAE's own encode + decode of the
  same image in the same mode. Target: the views add at most 15%.
- Compare tab: ``compare`` with the VAEs it ticks at first (SD v1's, FLUX.1's 16-channel one and
  TAESD) against their own encode + decode of the same image.
- Prompt lab: ``compare_prompts`` against the text encoder's pass over both prompts.

    python benchmarks/views.py               # ~2 minutes on 2 cores
    python benchmarks/views.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
import sd_parts  # noqa: E402
from tests.helpers.serve import free_port  # noqa: E402
from ui import encoding, server  # noqa: E402
from ui.models import Models, Settings  # noqa: E402
from ui.tabs import compare, prompt  # noqa: E402
from viz import pixels, upload  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
EXAMPLE = encoding.ASSETS / "astronaut.png"


def paired(model: Callable[[int], object], tab: Callable[[int], object], rounds: int
           ) -> tuple[float, float, float]:
    """Median seconds of ``model(i)`` and of ``tab(i)``, and the median of their ratios, over
    ``rounds`` rounds that run one right after the other; one untimed warm-up round first."""
    model(-1)
    tab(-1)
    model_s, tab_s = [], []
    for i in range(rounds):
        for run, times in ((model, model_s), (tab, tab_s)):
            start = time.perf_counter()
            run(i)
            times.append(time.perf_counter() - start)
    ratios = [t / m for m, t in zip(model_s, tab_s, strict=True)]
    return statistics.median(model_s), statistics.median(tab_s), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=384, help="the image tab's longer side")
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    settings = Settings(weights="random")
    models = Models(settings)
    demo = app.build_demo(settings)
    port = free_port()
    server.launch(demo, server_port=port, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
    try:
        # the text encoder alone, as the prompt tab runs it
        read = prompt.read_tokens(models.tokenizer(), PROMPT)
        ids = torch.tensor([read.ids])
        encoder = models.text_encoder()

        def encode_text(_: int) -> object:
            with torch.inference_mode():
                return encoder(ids, output_hidden_states=True, output_attentions=True)

        text_s, tab_s, tab_ratio = paired(encode_text, lambda i: client.predict(
            f"{PROMPT}, take {i + 1}", 1, prompt.MEAN_OVER_HEADS, False,
            api_name="/inspect_prompt"), args.rounds)
        _, layer_s, layer_ratio = paired(encode_text, lambda i: client.predict(
            PROMPT, 2 + i % 10, prompt.MEAN_OVER_HEADS, False, api_name="/attention_view"),
            args.rounds)

        # the VAE alone on the image the tab encodes, in the tab's default mode
        exact = bool(torch.float32 == sd_parts.fast_dtype("cpu"))
        vae = models.vae(settings.vae_choices[0], exact)
        fitted, _ = pixels.fit_for_vae(upload.load_image(EXAMPLE, encoding.MAX_PIXELS), args.size,
                                       vae.downscale)
        tensor = pixels.image_to_tensor(fitted)

        def round_trip(_: int) -> object:
            return vae.decode(vae.encode(tensor).mean)

        vae_s, image_s, image_ratio = paired(round_trip, lambda _: client.predict(
            handle_file(str(EXAMPLE)), settings.vae_choices[0], args.size, "crop", encoding.MEAN, 0,
            True, exact, api_name="/encode_image"), args.rounds)

        # the comparison's first choices, each VAE's own round trip on the same image
        ticked = [settings.vae_choices[0], settings.vae_choices[-1], settings.tiny_vae_choices[0]]
        vaes = [models.vae(c, exact) for c in ticked[:2]] + [models.tiny_vae(ticked[2], exact)]

        def round_trips(_: int) -> object:
            return [compare.round_trip(v, fitted) for v in vaes]

        vaes_s, compare_s, compare_ratio = paired(round_trips, lambda _: client.predict(
            handle_file(str(EXAMPLE)), args.size, ticked, exact, 64, api_name="/compare"),
            args.rounds)

        # two prompts through the text encoder, as the prompt lab runs them
        pair_ids = torch.tensor([read.ids, prompt.read_tokens(models.tokenizer(),
                                                              PROMPT + ", at night").ids])

        def encode_pair(_: int) -> object:
            with torch.inference_mode():
                return encoder(pair_ids, output_hidden_states=True)

        pair_s, lab_s, lab_ratio = paired(encode_pair, lambda i: client.predict(
            f"{PROMPT}, take {i + 1}", f"{PROMPT}, take {i + 1}, at night", True,
            api_name="/compare_prompts"), args.rounds)
    finally:
        client.close()
        demo.close()

    mode = "exact (float32)" if exact else f"fast ({sd_parts.fast_dtype('cpu')})"
    print(f"{torch.get_num_threads()} threads; full-size random weights; median of "
          f"{args.rounds} rounds\n")
    print("| case | time | against | ratio | target |")
    print("| --- | ---: | --- | ---: | ---: |")
    print(f"| prompt tab, new prompt | {tab_s * 1000:,.0f} ms | text encoder "
          f"{text_s * 1000:,.0f} ms | {tab_ratio:.2f}x | at most 3x |")
    print(f"| prompt tab, another layer | {layer_s * 1000:,.0f} ms | text encoder "
          f"{text_s * 1000:,.0f} ms | {layer_ratio:.2f}x | - |")
    print(f"| image tab {fitted.width}x{fitted.height}, {mode} | {image_s * 1000:,.0f} ms | VAE "
          f"encode + decode {vae_s * 1000:,.0f} ms | {100 * (image_ratio - 1):+.0f}% | at "
          "most +15% |")
    print(f"| compare tab, {len(ticked)} VAEs, {mode} | {compare_s * 1000:,.0f} ms | their "
          f"encode + decode {vaes_s * 1000:,.0f} ms | {100 * (compare_ratio - 1):+.0f}% | - |")
    print(f"| prompt lab, two prompts compared | {lab_s * 1000:,.0f} ms | text encoder, both "
          f"{pair_s * 1000:,.0f} ms | {lab_ratio:.2f}x | - |")


if __name__ == "__main__":
    main()
