"""A Hugging Face Hub cache folder, written by hand in the layout huggingface_hub keeps."""

from __future__ import annotations

from pathlib import Path


def build_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """The folder layout huggingface_hub keeps in its cache: refs point at snapshots."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, src in files.items():
        dst = root / "snapshots" / commit / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
