"""A BitTorrent swarm on loopback (127.0.0.1), for tests and for notebook 01's offline demo.

- `generate_safetensors_file(path, size)`: a valid safetensors file of exactly `size` bytes (random uint8).
- `make_torrent(path)`: a v1 `.torrent` for a file, made with `libtorrent.create_torrent`.
- `LoopbackSeeder(path)`: a libtorrent session seeding that file on 127.0.0.1; `.magnet` is a magnet link
  with `x.pe=127.0.0.1:PORT`, so a leecher needs no tracker and no DHT: it connects to the seeder, gets the
  metadata through the extension protocol (BEP 9) and downloads the pieces.

Nothing here touches the internet: every socket is bound to 127.0.0.1, DHT/LSD/UPnP/NAT-PMP are off.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from urllib.parse import quote

import libtorrent as lt
import numpy as np

from helpers.checkpoints import download as dl
from helpers.core.results import refusals

LOOPBACK = "127.0.0.1"

# Settings shared by every loopback session: no discovery of any kind, loopback only, rate limits that
# also apply to local peers (libtorrent exempts them by default), and every alert we might want to read.
LOOPBACK_SETTINGS = {
    "listen_interfaces": f"{LOOPBACK}:0",
    "enable_dht": False,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
    "ignore_limits_on_local_network": False,
    "allow_multiple_connections_per_ip": True,
    "alert_mask": lt.alert_category.error | lt.alert_category.status | lt.alert_category.storage,
}


# Keyword arguments of `download.download_torrent` for a leecher in a loopback swarm: no DHT, listen on
# 127.0.0.1 only, and TCP rather than uTP: uTP's delay-based congestion control (LEDBAT) crawls on loopback
# (~30 MB/s against ~150 MB/s for TCP on the test VM).
LEECHER_KWARGS = {
    "dht": False,
    "listen_interfaces": f"{LOOPBACK}:0",
    "settings": {"enable_outgoing_utp": False},
}


def generate_safetensors_file(path: str | Path, size: int, seed: int = 0, chunk: int = 16 << 20) -> Path:
    """Write a valid safetensors file of exactly `size` bytes: one uint8 tensor `data` of random bytes.

    Written in chunks, so a multi-GB file never sits in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def header_for(n_data: int) -> bytes:
        meta = {
            "data": {"dtype": "U8", "shape": [n_data], "data_offsets": [0, n_data]},
            "__metadata__": {"generated_by": "helpers.checkpoints.swarm"},
        }
        raw = json.dumps(meta, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces

    header = header_for(size)  # the data length changes the header's length by a few digits at most
    n_data = size - 8 - len(header)
    header = header_for(n_data)
    n_data = size - 8 - len(header)
    if n_data < 1 or len(header_for(n_data)) != len(header):
        raise ValueError(f"size {size} is too small for a safetensors file")
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        left = n_data
        while left:
            n = min(chunk, left)
            f.write(rng.bytes(n))
            left -= n
    return path


def make_torrent(path: str | Path, piece_size: int = 0, torrent_path: str | Path | None = None) -> Path:
    """Create a v1 `.torrent` for the single file `path` (piece hashes computed by libtorrent).

    `piece_size=0` lets libtorrent pick (it aims at ~1-2 k pieces). Writes `<path>.torrent` by default.
    """
    path = Path(path).resolve()
    entries = lt.list_files(str(path))
    ct = lt.create_torrent(entries, piece_size, lt.create_torrent.v1_only)
    ct.set_creator("helpers.checkpoints.swarm")
    lt.set_piece_hashes(ct, str(path.parent))
    torrent_path = Path(torrent_path) if torrent_path else path.with_name(path.name + ".torrent")
    torrent_path.write_bytes(lt.bencode(ct.generate()))
    return torrent_path


def magnet_for(info: lt.torrent_info, peers: list[tuple[str, int]] = (), trackers: list[str] = ()) -> str:
    """A magnet link with btih (hex), dn, xl and optional `x.pe` peers and `tr` trackers."""
    parts = [
        f"xt=urn:btih:{info.info_hashes().v1}",
        f"dn={quote(info.name())}",
        f"xl={info.total_size()}",
    ]
    parts += [f"tr={quote(t, safe='')}" for t in trackers]
    parts += [f"x.pe={host}:{port}" for host, port in peers]
    return "magnet:?" + "&".join(parts)


class LoopbackSeeder:
    """Seed one file on 127.0.0.1 with its own libtorrent session.

    >>> with LoopbackSeeder(generate_safetensors_file("x/model.safetensors", 8 << 20)) as seeder:
    ...     download_torrent(seeder.magnet, "dest", **LEECHER_KWARGS)

    `upload_rate_limit` (bytes/s, 0 = none) slows the seeder down so a download can be interrupted
    mid-way in a test or watched in a notebook.
    """

    def __init__(
        self, path: str | Path, piece_size: int = 0, upload_rate_limit: int = 0, torrent_path: str | Path | None = None
    ):
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"nothing to seed: {self.path} does not exist")
        self.torrent_path = make_torrent(self.path, piece_size, torrent_path)
        self.info = lt.torrent_info(str(self.torrent_path))
        self.session = lt.session({**LOOPBACK_SETTINGS, "upload_rate_limit": int(upload_rate_limit)})
        params = lt.add_torrent_params()
        params.ti = self.info
        params.save_path = str(self.path.parent)
        params.flags |= lt.torrent_flags.seed_mode  # trust the file we just hashed: no second check
        params.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)  # start now, stay up
        self.handle = self.session.add_torrent(params)
        self.port = self._wait_for_port()

    def _wait_for_port(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self.session.listen_port()
            if port:
                return port
            time.sleep(0.02)
        raise RuntimeError("the loopback seeder could not open a listening socket on 127.0.0.1")

    @property
    def info_hash(self) -> str:
        return str(self.info.info_hashes().v1)

    @property
    def size(self) -> int:
        return self.info.total_size()

    @property
    def magnet(self) -> str:
        """Magnet link pointing at this seeder only (`x.pe=127.0.0.1:PORT`), no tracker."""
        return magnet_for(self.info, peers=[(LOOPBACK, self.port)])

    def set_upload_rate_limit(self, bytes_per_second: int) -> None:
        self.session.apply_settings({"upload_rate_limit": int(bytes_per_second)})

    def uploaded_bytes(self) -> int:
        return self.handle.status().all_time_upload

    def close(self) -> None:
        if self.session is not None:
            self.session.remove_torrent(self.handle)
            self.session.pause()
            self.session = None

    def __enter__(self) -> LoopbackSeeder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoopbackSeeder({self.path.name}, {self.size} bytes, 127.0.0.1:{self.port})"


def provoke_download_errors(scratch: str | Path, magnet: str, good_file: str | Path | None = None,
                            size_bytes: int | None = None) -> dict[str, str]:
    """Notebook 01's failures that need no network, each provoked once (`helpers.core.results.refusals`).
    `magnet` is a real magnet (its destination is made unwritable);
    `good_file`, a downloaded file of `size_bytes`, is copied truncated and verified when given."""
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "a-file").write_text("x")
    unserved = f"magnet:?xt=urn:btih:{'ab' * 20}&dn=x.bin"
    cases = {
        "malformed magnet": lambda: dl.parse_magnet("magnet:?xt=urn:btih:1234&dn=x"),
        "nobody serves it": lambda: dl.download_torrent(f"{unserved}&xl=10", scratch, metadata_timeout=2,
                                                        progress=False, **LEECHER_KWARGS),
        "not writable": lambda: dl.download_torrent(magnet, scratch / "a-file" / "sub", progress=False),
        "disk too small": lambda: dl.download_torrent(f"{unserved}&xl={10**18}", scratch, **LEECHER_KWARGS),
    }
    if good_file is not None:
        cut = scratch / Path(good_file).name

        def truncated():
            with open(good_file, "rb") as src, open(cut, "wb") as dst:
                dst.write(src.read(min(Path(good_file).stat().st_size - 1000, 64 << 20)))
            try:
                dl.verify_file(cut, size_bytes)
            finally:
                cut.unlink()

        cases["truncated file"] = truncated
    return refusals(cases, errors=(dl.DownloadError,), width=22)
