"""A prepared huggingface_hub cache for loaders' Hub paths without a network (read with ``local_files_only=True`` or
``HF_HUB_OFFLINE=1``): the layout huggingface_hub itself writes."""

from __future__ import annotations

from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay ``files`` (path in the repo -> local file) out as huggingface_hub's cache of ``repo_id`` at revision main
    under ``root``; returns ``root`` (the ``cache_dir``)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, source in files.items():
        target = repo / "snapshots" / COMMIT / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    return root
