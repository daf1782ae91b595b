"""The README's "Use the app from Python" block, run as it is written against the app served with
tiny weights (only the address and the image sizes change: 64 px keeps it to seconds), so the
calls it shows keep working."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

from tests.helpers.serve import ROOT, in_process
from ui.models import Settings


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]


def test_the_readme_client_calls_work():
    code = readme_block("Use the app from Python")
    assert "num_inference_steps=" in code and "guidance_scale=" in code
    printed = io.StringIO()
    with in_process(Settings(weights="tiny")) as url:
        code = code.replace('Client("http://127.0.0.1:7860/")', f'Client("{url}", verbose=False)')
        code = re.sub(r"(width|height)=256", r"\1=64", code)
        here = Path.cwd()
        os.chdir(ROOT)  # the block names assets/cat.png as seen from the repository
        try:
            with contextlib.redirect_stdout(printed):
                names: dict = {}
                exec(compile(code, "README.md", "exec"), names)  # noqa: S102
        finally:
            os.chdir(here)
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("Done: 20 steps in ")
    assert any(line.startswith("Step 20 of 20") for line in lines[1:])
    assert Path(names["image"]).is_file() and names["tokens"] and names["views"]
    assert lines[-1] == "Done: 4 runs of the same prompt, differing in guidance scale."
