"""A Hugging Face hub cache folder written by hand, for tests that must find files "on the hub" offline.

The layout is the library's own (`models--org--name/refs/main`, `snapshots/<revision>/<file>` linking to
`blobs/<etag>`); like the hub's LFS files, every blob is named by its SHA-256. Point the library at it with
`use_hub_cache(folder, monkeypatch)`: HF_HUB_CACHE and HF_HUB_OFFLINE=1, in the environment (for kernels started
later) and in `huggingface_hub.constants` (read once, at import).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes | Path], revision: str = REVISION) -> Path:
    """Write `files` ({path in the repo: content or a file to copy}) as `repo_id`'s snapshot; return its folder."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / revision
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


def use_hub_cache(cache: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
