"""Download a checkpoint, time it, verify it: BitTorrent (libtorrent) or the model hub (huggingface_hub).

    report = download_torrent(SD15_MAGNET, "weights/")          # BitTorrent, from a magnet link
    report = download_hub(SD15_REPO, SD15_FILENAME, "weights/")  # the same file from the hub
    print(report)                                                # start, finish, elapsed, size, speed

On Colab and Kaggle the hub is the default (`choose_source("auto")`): hosted notebooks often block peer-to-peer
traffic. `download_torrent_or_hub` tries BitTorrent and falls back to the hub when no peer answers or the swarm is too
slow, saying why; `compare_with_hub` checks a file against the hub's published SHA-256 without downloading it again.

Both return a `DownloadReport` and print the same timing lines, so the notebook can compare them. A file
that is already there (and verifies) is reported as `cached=True` instead of being fetched again.

Verification (`verify_file`): the size against the magnet's `xl`, every piece against the torrent's SHA-1
piece hashes (libtorrent checks each piece as it arrives; a cached file is re-hashed against the stored
metadata), the safetensors header (valid JSON, every tensor's byte range inside the file) and, optionally,
a SHA-256.

Resume: while downloading, libtorrent's resume data (which pieces are verified, plus the torrent's
metadata) is saved next to the file as `.<name>.fastresume`; after an interruption the next call loads it
and fetches only the missing pieces. Without resume data libtorrent hashes the pieces already on disk once
the metadata arrives and keeps the good ones.

Failures raise subclasses of `DownloadError` with a message that says what to do:
`MagnetError` (malformed or wrong link), `NoPeersError` (nobody answered within the timeout),
`InsufficientDiskSpaceError`, `NotWritableError`, `VerificationError` / `TruncatedFileError` /
`CorruptDataError`, `DownloadInterrupted`.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import os
import shutil
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import libtorrent as lt
from tqdm.auto import tqdm

# torch-free: the safetensors header check imports helpers.core.ldm (and torch with it) only when it runs.

SD15_MAGNET = (
    "magnet:?xt=urn:btih:3f8016061132ad4a475eb33dac569f3a88418974"
    "&dn=v1-5-pruned-emaonly.safetensors&xl=4265146304"
    "&tr=udp%3A%2F%2Fexodus.desync.com%3A6969%2Fannounce"
)
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_FILENAME = "v1-5-pruned-emaonly.safetensors"
SD15_SIZE = 4_265_146_304


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """Base class of every download failure in this module."""


class MagnetError(DownloadError, ValueError):
    """The magnet link is malformed, or does not match the torrent the peers serve (size, hash)."""


class NoPeersError(DownloadError, TimeoutError):
    """No peer delivered the metadata, or no data arrived, within the timeout."""


class DownloadTimeoutError(DownloadError, TimeoutError):
    """The whole download took longer than the `timeout` it was given."""


class InsufficientDiskSpaceError(DownloadError, OSError):
    """The destination's file system has less free space than the file needs."""


class NotWritableError(DownloadError, PermissionError):
    """The destination cannot be created or written to."""


class VerificationError(DownloadError):
    """The file on disk is not the file that was asked for."""


class TruncatedFileError(VerificationError):
    """The file is shorter than its expected size (or its safetensors header says so)."""


class CorruptDataError(VerificationError):
    """Data failed the torrent's piece hashes (or the SHA-256): corrupt on disk or sent by a bad peer."""


class DownloadInterrupted(DownloadError):
    """The download was stopped on request; the verified pieces are kept and the next call resumes."""

    def __init__(self, message: str, done_bytes: int = 0, total_bytes: int = 0):
        super().__init__(message)
        self.done_bytes = done_bytes
        self.total_bytes = total_bytes


# ---------------------------------------------------------------------------------------------------------------
# magnet links
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MagnetLink:
    """The parts of a magnet link we use. `info_hash` is always 40 lower-case hex digits (BitTorrent v1)."""

    info_hash: str
    name: str | None = None
    size: int | None = None  # `xl`, exact length in bytes
    trackers: tuple[str, ...] = ()
    peers: tuple[tuple[str, int], ...] = ()  # `x.pe`
    uri: str = ""

    @classmethod
    def parse(cls, uri: str) -> MagnetLink:
        return parse_magnet(uri)

    def to_uri(self) -> str:
        """A normalized magnet link (hex btih) that libtorrent can parse."""
        from urllib.parse import quote

        parts = [f"xt=urn:btih:{self.info_hash}"]
        if self.name:
            parts.append(f"dn={quote(self.name)}")
        if self.size is not None:
            parts.append(f"xl={self.size}")
        parts += [f"tr={quote(t, safe='')}" for t in self.trackers]
        parts += [f"x.pe={_format_peer(p)}" for p in self.peers]
        return "magnet:?" + "&".join(parts)


def _format_peer(peer: tuple[str, int]) -> str:
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def btih_to_hex(btih: str) -> str:
    """A BitTorrent v1 info hash, given as 40 hex digits or 32 base32 characters, as 40 lower-case hex digits.

    >>> btih_to_hex("H6ABMBQRGKWUUR26WM62YVU7HKEEDCLU")
    '3f8016061132ad4a475eb33dac569f3a88418974'
    """
    if len(btih) == 40:
        try:
            return bytes.fromhex(btih).hex()
        except ValueError:
            raise MagnetError(f"info hash {btih!r} has 40 characters but is not hexadecimal") from None
    if len(btih) == 32:
        try:
            return base64.b32decode(btih.upper()).hex()
        except binascii.Error:
            raise MagnetError(f"info hash {btih!r} has 32 characters but is not base32") from None
    raise MagnetError(
        f"info hash {btih!r} has {len(btih)} characters; a BitTorrent v1 hash has 40 (hex) or 32 (base32)"
    )


def _parse_peer(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MagnetError(f"x.pe peer {text!r} is not HOST:PORT")
    return host, int(port)


def parse_magnet(uri: str) -> MagnetLink:
    """Parse and check a magnet link: `xt=urn:btih:` (hex or base32), `dn`, `xl`, `tr`, `x.pe`."""
    if not isinstance(uri, str) or not uri.startswith("magnet:?"):
        raise MagnetError(f"not a magnet link (must start with 'magnet:?'): {str(uri)[:80]!r}")
    query = parse_qs(urlsplit(uri).query, keep_blank_values=True)
    topics = [t for t in query.get("xt", []) if t.lower().startswith("urn:btih:")]
    if not topics:
        raise MagnetError(f"magnet link has no 'xt=urn:btih:<info hash>' (a BitTorrent v1 hash): {uri[:80]!r}")
    hashes = {btih_to_hex(t[len("urn:btih:") :]) for t in topics}
    if len(hashes) > 1:
        raise MagnetError(f"magnet link names {len(hashes)} different info hashes: {sorted(hashes)}")
    size = None
    if "xl" in query:
        raw = query["xl"][0]
        if not raw.isdigit() or int(raw) <= 0:
            raise MagnetError(f"magnet 'xl' (exact length) must be a positive integer, got {raw!r}")
        size = int(raw)
    name = query["dn"][0] if query.get("dn") and query["dn"][0] else None
    if name is not None and (name in (".", "..") or "/" in name or "\\" in name):
        raise MagnetError(f"magnet 'dn' {name!r} is not a plain file name")
    return MagnetLink(
        info_hash=hashes.pop(),
        name=name,
        size=size,
        trackers=tuple(query.get("tr", [])),
        peers=tuple(_parse_peer(p) for p in query.get("x.pe", [])),
        uri=uri,
    )


# ---------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


@dataclass
class DownloadReport:
    """What one download (or cache hit) did. Times are ISO 8601 UTC; speeds in bytes per second."""

    source: str  # "torrent" | "hub" | "local"
    path: str
    size_bytes: int
    started: str
    finished: str
    elapsed_s: float
    downloaded_bytes: int  # payload fetched by this call (0 when cached)
    resumed_bytes: int = 0  # verified bytes that were already on disk
    cached: bool = False
    peers_max: int | None = None
    verified: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)

    @property
    def average_speed(self) -> float:
        """Bytes fetched by this call per second of wall time (0 for a cache hit)."""
        return self.downloaded_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "average_speed_Bps": self.average_speed}

    def lines(self) -> list[str]:
        what = "cached (already on disk, verified, not downloaded again)" if self.cached else "downloaded"
        out = [
            f"source   : {self.source} — {what}",
            f"file     : {self.path}",
            f"size     : {format_bytes(self.size_bytes)} ({self.size_bytes:,} bytes)",
            f"start    : {self.started}",
            f"finish   : {self.finished}",
            f"elapsed  : {self.elapsed_s:.2f} s",
        ]
        if not self.cached:
            out.append(
                f"average  : {format_bytes(self.average_speed)}/s "
                f"({format_bytes(self.downloaded_bytes)} fetched by this run"
                + (f", {format_bytes(self.resumed_bytes)} resumed from disk)" if self.resumed_bytes else ")")
            )
        if self.peers_max:
            out.append(f"peers    : up to {self.peers_max} connected")
        if self.verified:
            out.append("verified : " + ", ".join(f"{k} {v}" for k, v in self.verified.items()))
        if "fallback" in self.detail:
            fell = self.detail["fallback"]
            out.append(f"fallback : from {fell['from']}, which failed with {fell['error']}: {fell['why']}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _now() -> tuple[float, str]:
    return time.monotonic(), datetime.now(UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------------------------------
# checks: destination, disk space, verification
# ---------------------------------------------------------------------------------------------------------------


def ensure_writable_dir(dest_dir: str | Path) -> Path:
    """Create `dest_dir` if needed and prove it is writable by creating and deleting a file in it."""
    dest = Path(dest_dir).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise NotWritableError(
            f"cannot use {dest} as a download folder: a part of that path is a file ({exc})"
        ) from exc
    except OSError as exc:
        raise NotWritableError(f"cannot create the download folder {dest}: {exc.strerror or exc}") from exc
    probe = dest / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise NotWritableError(f"the download folder {dest} is not writable: {exc.strerror or exc}") from exc
    return dest


def _bytes_on_disk(path: Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    return min(st.st_size, st.st_blocks * 512)


def check_disk_space(dest_dir: str | Path, size: int, existing: Path | None = None) -> None:
    """Raise InsufficientDiskSpaceError unless `dest_dir` has room for the rest of a `size`-byte file."""
    need = size - (_bytes_on_disk(existing) if existing else 0)
    free = shutil.disk_usage(dest_dir).free
    if need > free:
        raise InsufficientDiskSpaceError(
            f"not enough disk space in {dest_dir}: the file needs {format_bytes(need)} more, "
            f"only {format_bytes(free)} free. Free some space or choose another destination."
        )


def check_safetensors_header(path: str | Path) -> int:
    """Check a safetensors file's header against its size; return the number of tensors.

    Raises TruncatedFileError if the tensors need more bytes than the file holds, VerificationError if the
    header is not a valid safetensors header.
    """
    from helpers.core.ldm import read_header

    try:
        header, _ = read_header(path)
    except ValueError as exc:
        cls = TruncatedFileError if "truncated" in str(exc) or "does not fit" in str(exc) else VerificationError
        raise cls(f"not a valid safetensors file: {exc}") from exc
    return sum(1 for k in header if k != "__metadata__")


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_pieces(path: str | Path, info: lt.torrent_info) -> list[int]:
    """Hash `path` piece by piece against the torrent's SHA-1 piece hashes; return the bad pieces' indices."""
    bad = []
    with open(path, "rb") as f:
        for i in range(info.num_pieces()):
            data = f.read(info.piece_size(i))
            if hashlib.sha1(data).digest() != info.hash_for_piece(i):
                bad.append(i)
    return bad


def verify_file(
    path: str | Path,
    expected_size: int | None = None,
    *,
    info: lt.torrent_info | None = None,
    sha256: str | None = None,
    safetensors: bool | None = None,
) -> dict:
    """Verify a downloaded file; return {check: result} or raise VerificationError (or a subclass).

    - size against `expected_size` (e.g. the magnet's `xl`);
    - piece hashes against `info` (a libtorrent torrent_info), if given;
    - the safetensors header (default: when the name ends in `.safetensors`);
    - SHA-256 against `sha256`, if given (reads the whole file once more).
    """
    path = Path(path)
    if not path.is_file():
        raise VerificationError(f"{path} does not exist")
    size = path.stat().st_size
    result = {}
    if expected_size is not None:
        if size < expected_size:
            raise TruncatedFileError(
                f"{path} is truncated: {size:,} bytes, expected {expected_size:,} ({expected_size - size:,} missing)"
            )
        if size > expected_size:
            raise VerificationError(f"{path} has {size:,} bytes, expected {expected_size:,}: wrong file?")
        result["size"] = "ok"
    if info is not None:
        if info.total_size() != size:
            raise VerificationError(f"{path} has {size:,} bytes but the torrent describes {info.total_size():,}")
        bad = check_pieces(path, info)
        if bad:
            raise CorruptDataError(
                f"{path}: {len(bad)} of {info.num_pieces()} pieces fail their SHA-1 hash (first: {bad[:5]}); "
                "download again to re-fetch just those pieces"
            )
        result["pieces"] = f"ok ({info.num_pieces()} SHA-1)"
    if safetensors is None:
        safetensors = path.suffix == ".safetensors"
    if safetensors:
        result["safetensors"] = f"ok ({check_safetensors_header(path)} tensors)"
    if sha256:
        digest = sha256_file(path)
        if digest != sha256.lower():
            raise CorruptDataError(f"{path}: SHA-256 {digest} does not match the expected {sha256.lower()}")
        result["sha256"] = "ok"
    return result


# ---------------------------------------------------------------------------------------------------------------
# BitTorrent
# ---------------------------------------------------------------------------------------------------------------

RESUME_SUFFIX = ".fastresume"


def resume_path(dest_dir: str | Path, name: str) -> Path:
    """Where libtorrent's resume data for `name` lives: a hidden file next to it."""
    return Path(dest_dir) / f".{name}{RESUME_SUFFIX}"


def _read_resume(path: Path) -> lt.add_torrent_params | None:
    try:
        return lt.read_resume_data(path.read_bytes())
    except (OSError, RuntimeError):
        return None


def _session_settings(listen_interfaces: str, dht: bool, extra: dict | None) -> dict:
    settings = {
        "listen_interfaces": listen_interfaces,
        "enable_dht": dht,
        "enable_lsd": dht,
        "enable_upnp": dht,
        "enable_natpmp": dht,
        "alert_mask": lt.alert_category.error | lt.alert_category.status | lt.alert_category.storage,
        "user_agent": "sd-dissected/libtorrent " + lt.__version__,
    }
    settings.update(extra or {})
    return settings


def _file_error(alert, dest: Path) -> DownloadError:
    code = alert.error.value()
    message = f"{alert.error.message()} ({alert.filename() if hasattr(alert, 'filename') else dest})"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientDiskSpaceError(f"disk full while writing to {dest}: {message}")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return NotWritableError(f"cannot write to {dest}: {message}")
    return DownloadError(f"libtorrent storage error in {dest}: {message}")


_CHECKING = (lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data)


@dataclass
class _Target:
    """What download_torrent was asked for, resolved before any network: the torrent, the folder, the file."""

    magnet: MagnetLink | None
    info: lt.torrent_info | None  # the metadata, when a .torrent (or resume data) gave it
    dest: Path
    name: str | None  # the magnet's dn or the torrent's name; None until the metadata tells
    expected_size: int | None  # the magnet's xl or the torrent's size
    info_hash: str
    t0: float
    started: str
    resume_file: Path | None = None
    stored: lt.add_torrent_params | None = None  # this torrent's resume data found next to the file

    @property
    def path(self) -> Path | None:
        return self.dest / self.name if self.name else None


@dataclass(frozen=True)
class _Limits:
    """When the wait gives up or stops (seconds), and how often it saves resume data."""

    metadata_timeout: float
    stall_timeout: float
    timeout: float | None
    resume_interval: float
    stop_when: Callable[[lt.torrent_status], bool] | None


class _Torrent:
    """One libtorrent session with one torrent: the polling, alerts, progress and resume data in one place."""

    def __init__(
        self,
        target: _Target,
        params: lt.add_torrent_params,
        settings: dict,
        extra_peers: list,
        *,
        dht: bool,
        progress: bool,
    ):
        self.target = target
        self.dest = target.dest
        self.session = lt.session(settings)
        params.save_path = str(self.dest)
        self.handle = self.session.add_torrent(params)
        for peer in extra_peers:
            self.handle.connect_peer(tuple(peer))
        trackers = len(target.magnet.trackers) if target.magnet else 0
        self.tried = f"tried {len(extra_peers)} listed peer(s), {trackers} tracker(s), DHT {'on' if dht else 'off'}"
        self.progress = progress
        # what the alerts said
        self.hash_failures = 0
        self.banned_peers = 0
        self.resume_data: bytes | None = None
        self.error: DownloadError | None = None
        # the file (its name comes from the metadata when the magnet has no dn)
        self.name = target.name
        self.resume_file = target.resume_file
        self.file_path: Path | None = None
        # progress of the wait
        self.bar = None  # the tqdm bar, made when the metadata arrives
        self.peers_max = 0
        self.resumed_bytes: int | None = None  # verified bytes on disk before any payload of this run
        self.last_done, self.last_change = 0, time.monotonic()
        self.last_resume_save = time.monotonic()

    # --- libtorrent: alerts and resume data ------------------------------------------------------------

    def poll(self, wait_ms: int = 200) -> lt.torrent_status:
        self.session.wait_for_alert(wait_ms)
        for alert in self.session.pop_alerts():
            self._on_alert(alert)
        return self.handle.status()

    def _on_alert(self, alert) -> None:
        if isinstance(alert, lt.hash_failed_alert):
            self.hash_failures += 1
        elif isinstance(alert, lt.peer_ban_alert):
            self.banned_peers += 1
        elif isinstance(alert, lt.save_resume_data_alert):
            self.resume_data = lt.write_resume_data_buf(alert.params)
        elif isinstance(alert, lt.file_error_alert):
            self.error = _file_error(alert, self.dest)
        elif isinstance(alert, lt.torrent_error_alert) and self.error is None:
            self.error = DownloadError(f"libtorrent error: {alert.message()}")

    def save_resume(self, path: Path, timeout: float = 5.0) -> bool:
        """Ask libtorrent for resume data (with the metadata in it) and write it to `path`."""
        if not self.handle.is_valid():
            return False
        self.resume_data = None
        flags = lt.torrent_handle.save_info_dict | lt.torrent_handle.flush_disk_cache
        self.handle.save_resume_data(flags)
        deadline = time.monotonic() + timeout
        while self.resume_data is None and time.monotonic() < deadline:
            self.poll(100)
        if self.resume_data is None:
            return False
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.resume_data)
        tmp.replace(path)
        return True

    def close(self) -> None:
        if self.session is not None:
            try:
                self.session.remove_torrent(self.handle)
            finally:
                self.session.pause()
                self.session = None
        if self.bar is not None:
            self.bar.close()

    # --- the wait ----------------------------------------------------------------------------------------

    def wait_until_complete(self, limits: _Limits) -> lt.torrent_status:
        """Poll until every piece is in and verified; keep the resume data whatever happens; close the session."""
        try:
            st = self._poll_until_complete(limits)
        except BaseException:
            # keep what was verified so the next call resumes (also on Ctrl-C)
            if self.handle.is_valid() and self.handle.status().has_metadata and self.resume_file is not None:
                self.save_resume(self.resume_file)
            raise
        else:
            self.save_resume(self.resume_file)  # complete resume data = the metadata, kept for later cache checks
            self.handle.flush_cache()
        finally:
            self.close()
        return st

    def _poll_until_complete(self, limits: _Limits) -> lt.torrent_status:
        while True:
            st = self.poll()
            now = time.monotonic()
            if self.error is not None:
                raise self.error
            self.peers_max = max(self.peers_max, st.num_peers)
            if not st.has_metadata:
                self._check_metadata_timeout(st, now, limits.metadata_timeout)
                self.last_change = now
                continue
            if self.bar is None:
                self._on_metadata(st.total_wanted)
            if st.state in _CHECKING:
                self.bar.set_postfix_str("checking pieces on disk")
                self.last_change = now
                continue
            self._show_progress(st)
            if st.total_done >= st.total_wanted and st.is_finished:
                return st
            self._check_stall(st, now, limits.stall_timeout)
            self._check_timeout_and_stop(st, now, limits)
            if now - self.last_resume_save > limits.resume_interval and st.need_save_resume:
                self.save_resume(self.resume_file)
                self.last_resume_save = now

    def _check_metadata_timeout(self, st: lt.torrent_status, now: float, metadata_timeout: float) -> None:
        if now - self.target.t0 > metadata_timeout:
            who = f"{st.num_peers} peer(s) connected but none sent it" if st.num_peers else "no peer connected"
            raise NoPeersError(
                f"no metadata for {self.target.info_hash} after {metadata_timeout:.0f} s ({who}; "
                f"{self.tried}). Check the magnet link and the network."
            )

    def _on_metadata(self, total: int) -> None:
        """The metadata arrived: check it against the link, name the file, check the space, start the bar."""
        magnet = self.target.magnet
        if magnet and magnet.size is not None and total != magnet.size:
            raise MagnetError(
                f"the magnet says xl={magnet.size:,} bytes but the torrent's metadata says {total:,}: "
                "wrong or malformed magnet link"
            )
        files = self.handle.torrent_file().files()
        if files.num_files() != 1:
            raise MagnetError(
                f"the torrent holds {files.num_files()} files; download_torrent fetches single-file torrents"
            )
        self.file_path = self.dest / files.file_path(0)  # the name inside the torrent (the magnet's dn is a hint)
        if self.name is None:
            self.name = self.file_path.name
            self.resume_file = resume_path(self.dest, self.name)
        elif self.file_path.name != self.name:
            print(f"note: the magnet calls the file {self.name!r}, the torrent calls it {self.file_path.name!r}")
        check_disk_space(self.dest, total, self.file_path)
        self.bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc=self.name,
            disable=not self.progress,
            mininterval=0.5,
        )

    def _show_progress(self, st: lt.torrent_status) -> None:
        if self.resumed_bytes is None:  # pieces that passed their hash before any payload of this run
            self.resumed_bytes = max(0, _verified_bytes(st, self.handle) - st.total_payload_download)
        self.bar.update(st.total_done - self.bar.n)
        self.bar.set_postfix(
            peers=st.num_peers,
            seeds=st.num_seeds,
            rate=f"{format_bytes(st.download_payload_rate)}/s",
            refresh=False,
        )

    def _check_stall(self, st: lt.torrent_status, now: float, stall_timeout: float) -> None:
        """No new byte for `stall_timeout` s: the peers send corrupt data (if pieces failed) or nothing."""
        if st.total_done > self.last_done:
            self.last_done, self.last_change = st.total_done, now
        elif now - self.last_change > stall_timeout:
            if self.hash_failures or st.total_failed_bytes:
                raise CorruptDataError(
                    f"{self.hash_failures} piece(s) ({format_bytes(st.total_failed_bytes)}) failed their SHA-1 "
                    f"hash and no good data arrived for {stall_timeout:.0f} s: the peers send corrupt data "
                    f"({self.banned_peers} peer(s) banned for it)"
                )
            raise NoPeersError(
                f"no data for {stall_timeout:.0f} s at {st.progress:.1%} ({st.num_peers} peers connected)"
            )

    def _check_timeout_and_stop(self, st: lt.torrent_status, now: float, limits: _Limits) -> None:
        if limits.timeout is not None and now - self.target.t0 > limits.timeout:
            raise DownloadTimeoutError(f"download not finished after {limits.timeout:.0f} s ({st.progress:.1%} done)")
        if limits.stop_when is not None and limits.stop_when(st):
            kept = _verified_bytes(st, self.handle)
            raise DownloadInterrupted(
                f"stopped at {st.progress:.1%} ({format_bytes(kept)} in verified pieces kept); call again to resume",
                kept,
                st.total_wanted,
            )

    # --- the result --------------------------------------------------------------------------------------

    def report(self, st: lt.torrent_status, sha256: str | None) -> DownloadReport:
        """The final check and report, from the status that completed the download."""
        t1, finished = _now()
        total = st.total_wanted
        # libtorrent verified every piece on arrival; re-check size, header (and optionally SHA-256) on disk
        verified = verify_file(self.file_path, total, sha256=sha256)
        verified["pieces"] = f"ok ({st.num_pieces} SHA-1, checked by libtorrent on arrival)"
        resumed = self.resumed_bytes or 0
        downloaded = total - resumed
        return DownloadReport(
            "torrent",
            str(self.file_path),
            total,
            self.target.started,
            finished,
            t1 - self.target.t0,
            downloaded,
            resumed_bytes=resumed,
            cached=downloaded == 0,
            peers_max=self.peers_max,
            verified=verified,
            detail={
                "info_hash": self.target.info_hash,
                "payload_downloaded": st.total_payload_download,
                "failed_bytes": st.total_failed_bytes,
                "redundant_bytes": st.total_redundant_bytes,
                "hash_failures": self.hash_failures,
            },
        )


def _has_all_pieces(params: lt.add_torrent_params) -> bool:
    """Resume data says every piece passed its hash (the bitfield is padded to whole bytes)."""
    if params.ti is None:
        return False
    have = list(params.have_pieces)[: params.ti.num_pieces()]
    return len(have) == params.ti.num_pieces() and all(have)


def _verified_bytes(st: lt.torrent_status, handle: lt.torrent_handle) -> int:
    """Bytes in pieces that passed their hash (total_done also counts blocks of unfinished pieces)."""
    info = handle.torrent_file()
    if info is None or not st.pieces:
        return 0
    last = info.num_pieces() - 1
    full = sum(1 for i, have in enumerate(st.pieces) if have and i != last)
    return full * info.piece_length() + (info.piece_size(last) if st.pieces[last] else 0)


def _torrent_source(source: str | Path | lt.torrent_info) -> tuple[MagnetLink | None, lt.torrent_info | None]:
    if isinstance(source, lt.torrent_info):
        return None, source
    if isinstance(source, str) and source.startswith("magnet:"):
        return parse_magnet(source), None
    path = Path(source)
    if path.suffix == ".torrent" and path.is_file():
        try:
            return None, lt.torrent_info(str(path))
        except RuntimeError as exc:
            raise MagnetError(f"{path} is not a valid .torrent file: {exc}") from exc
    raise MagnetError(f"expected a magnet link or a .torrent file, got {str(source)[:80]!r}")


def _resolve_target(source: str | Path | lt.torrent_info, dest_dir: str | Path) -> _Target:
    """Parse the source (before touching the folder), make the folder, find this torrent's resume data."""
    magnet, info = _torrent_source(source)
    info_hash = magnet.info_hash if magnet else str(info.info_hashes().v1)
    name = magnet.name if magnet and magnet.name else (info.name() if info else None)
    dest = ensure_writable_dir(dest_dir)
    t0, started = _now()
    resume_file = resume_path(dest, name) if name else None
    stored = _read_resume(resume_file) if resume_file and resume_file.is_file() else None
    if stored is not None and str(stored.info_hashes.v1) != info_hash:
        stored = None  # resume data of another torrent with the same name: ignore it
    expected_size = magnet.size if magnet else info.total_size()
    return _Target(magnet, info, dest, name, expected_size, info_hash, t0, started, resume_file, stored)


def _cached_report(target: _Target, verify_cached_pieces: bool, sha256: str | None) -> DownloadReport | None:
    """The report of a file already complete on disk that verifies; None (to download) otherwise.

    Only with the metadata at hand (stored resume data or a .torrent) can a file be checked offline; a file of
    the right size without it may be an interrupted download with holes, so libtorrent checks it piece by
    piece once the metadata arrives (and the report says cached if nothing had to be fetched). Bad pieces are
    marked missing in the stored resume data so that only those are fetched again.
    """
    stored, path = target.stored, target.path
    partial = stored is not None and not _has_all_pieces(stored)  # an interrupted download
    known = stored.ti if stored is not None and stored.ti is not None else target.info
    present = path is not None and path.is_file() and target.expected_size == path.stat().st_size
    if not present or partial or known is None:
        return None
    bad = check_pieces(path, known) if verify_cached_pieces else []
    if bad:
        print(
            f"{target.name} is on disk but {len(bad)} of {known.num_pieces()} pieces fail their hash; "
            "fetching just those again"
        )
        if stored is not None:  # tell libtorrent which pieces it no longer has
            have = list(stored.have_pieces)
            for i in bad:
                have[i] = False
            stored.have_pieces = have
        return None
    try:
        verified = verify_file(path, target.expected_size, sha256=sha256)
    except VerificationError as exc:
        print(f"{target.name} is on disk but does not verify ({exc}); libtorrent will check it piece by piece")
        target.stored, target.info = None, known  # no resume data: libtorrent hashes the file and keeps good pieces
        return None
    verified["pieces"] = f"ok ({known.num_pieces()} SHA-1)" if verify_cached_pieces else "not checked"
    t1, finished = _now()
    return DownloadReport(
        "torrent",
        str(path),
        target.expected_size,
        target.started,
        finished,
        t1 - target.t0,
        0,
        resumed_bytes=target.expected_size,
        cached=True,
        verified=verified,
        detail={"info_hash": target.info_hash},
    )


def _start_params(target: _Target) -> lt.add_torrent_params:
    """Resume from the stored resume data, else start from the .torrent's metadata, else from the magnet."""
    if target.stored is not None:
        return target.stored
    if target.info is not None:
        params = lt.add_torrent_params()
        params.ti = target.info
        return params
    return lt.parse_magnet_uri(target.magnet.to_uri())


def download_torrent(
    source: str | Path | lt.torrent_info,
    dest_dir: str | Path,
    *,
    peers: Iterable[tuple[str, int]] = (),
    dht: bool = True,
    listen_interfaces: str = "0.0.0.0:6881,[::]:6881",
    metadata_timeout: float = 120.0,
    stall_timeout: float = 120.0,
    timeout: float | None = None,
    sha256: str | None = None,
    verify_cached_pieces: bool = True,
    progress: bool = True,
    resume_interval: float = 10.0,
    stop_when: Callable[[lt.torrent_status], bool] | None = None,
    settings: dict | None = None,
) -> DownloadReport:
    """Download the file of a magnet link (or .torrent) into `dest_dir` with libtorrent, timed and verified.

    - `peers`: extra peers to connect to (the magnet's `x.pe` peers are used anyway).
    - `dht`, `listen_interfaces`: for a loopback swarm use `dht=False, listen_interfaces="127.0.0.1:0"`.
    - `metadata_timeout`: seconds to wait for the metadata (magnet links) before `NoPeersError`;
      `stall_timeout`: seconds without a new verified byte before `NoPeersError` (or `CorruptDataError` if
      the only data that came failed the piece hashes); `timeout`: the whole download.
    - `stop_when(status)`: stop as soon as it returns True, keeping the verified pieces and the resume data,
      and raise `DownloadInterrupted` (used to demonstrate and test resuming). Ctrl-C does the same.
    - `settings`: extra libtorrent session settings.

    Returns a DownloadReport; `cached=True` when the file was already complete.
    """
    # 1. resolve the source; 2. already there? (the file, plus the metadata to check its pieces against)
    target = _resolve_target(source, dest_dir)
    cached = _cached_report(target, verify_cached_pieces, sha256)
    if cached is not None:
        return cached
    if target.expected_size:
        check_disk_space(target.dest, target.expected_size, target.path)
    # 3. start (or resume) the torrent
    extra_peers = list(peers) + (list(target.magnet.peers) if target.magnet else [])
    session_settings = _session_settings(listen_interfaces, dht, settings)
    run = _Torrent(target, _start_params(target), session_settings, extra_peers, dht=dht, progress=progress)
    # 4. wait until every piece is in and verified; 5. check the file on disk and report
    limits = _Limits(metadata_timeout, stall_timeout, timeout, resume_interval, stop_when)
    st = run.wait_until_complete(limits)
    return run.report(st, sha256)


# ---------------------------------------------------------------------------------------------------------------
# the model hub
# ---------------------------------------------------------------------------------------------------------------


def download_hub(
    repo_id: str = SD15_REPO,
    filename: str = SD15_FILENAME,
    dest_dir: str | Path | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    expected_size: int | None = None,
    sha256: str | None = None,
) -> DownloadReport:
    """Download `filename` of `repo_id` with `huggingface_hub.hf_hub_download`, timed and verified.

    `dest_dir` given: the file lands in that folder (`local_dir`); else in the hub cache. A file that is
    already there is reported as cached (hf_hub_download's `dry_run` says so), not downloaded again.
    """
    from huggingface_hub import hf_hub_download

    kwargs = {"revision": revision, "cache_dir": cache_dir}
    if dest_dir is not None:
        kwargs["local_dir"] = ensure_writable_dir(dest_dir)
    t0, started = _now()
    try:
        plan = hf_hub_download(repo_id, filename, dry_run=True, **kwargs)
    except Exception as exc:  # offline, no such repo/file, auth: say which
        raise DownloadError(f"cannot reach {repo_id}/{filename} on the hub: {type(exc).__name__}: {exc}") from exc
    if isinstance(plan, (str, Path)):  # offline with the file already in local_dir: the library returns its path
        plan = types.SimpleNamespace(is_cached=True, will_download=False, file_size=None, commit_hash=None)
    cached = bool(plan.is_cached and not plan.will_download)
    size = plan.file_size or expected_size
    if not cached and size:
        check_disk_space(_existing_parent(kwargs.get("local_dir") or cache_dir or _hub_cache()), size)
    try:
        path = Path(hf_hub_download(repo_id, filename, **kwargs))
    except Exception as exc:
        raise DownloadError(f"hub download of {repo_id}/{filename} failed: {type(exc).__name__}: {exc}") from exc
    t1, finished = _now()
    size = path.stat().st_size
    verified = verify_file(path, expected_size or plan.file_size, sha256=sha256)
    return DownloadReport(
        "hub",
        str(path),
        size,
        started,
        finished,
        t1 - t0,
        0 if cached else size,
        resumed_bytes=size if cached else 0,
        cached=cached,
        verified=verified,
        detail={"repo_id": repo_id, "filename": filename, "commit": plan.commit_hash},
    )


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _existing_parent(path: str | Path) -> Path:
    path = Path(path).expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# ---------------------------------------------------------------------------------------------------------------
# which source; BitTorrent, else the hub; the file against the hub's, without downloading it again
# ---------------------------------------------------------------------------------------------------------------

# The swarm failed, not the request: the hub may well serve the same file.
TORRENT_FALLBACK_ERRORS = (NoPeersError, DownloadTimeoutError, CorruptDataError)


@dataclass(frozen=True)
class HubFile:
    """What the hub publishes about one file: its size and, for a file in LFS (every checkpoint), its SHA-256."""

    repo_id: str
    filename: str
    size: int
    sha256: str | None
    where: str  # "hub" (asked over the network) or "local hub cache" (offline)


def hub_file_info(repo_id: str, filename: str, revision: str | None = None) -> HubFile | None:
    """The hub's size and SHA-256 of `filename`, without downloading it; None when neither the hub nor the cache has it.

    Online: `HfApi.get_paths_info` (a few hundred bytes of JSON). Offline (HF_HUB_OFFLINE=1), or when the hub does not
    answer: the local hub cache, whose blobs of LFS files are named by the SHA-256 (their ETag) the hub sent.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoFile

    if not constants.is_offline_mode():
        try:
            found = HfApi().get_paths_info(repo_id, [filename], revision=revision)
        except Exception:  # no internet, no such repo, gated: the cache may still have it
            found = None
        if found is not None:
            file = next((f for f in found if isinstance(f, RepoFile)), None)
            if file is None:
                return None
            return HubFile(repo_id, filename, file.size, file.lfs.sha256 if file.lfs else None, "hub")
    return _hub_file_in_cache(repo_id, filename, revision)


def _hub_file_in_cache(repo_id: str, filename: str, revision: str | None) -> HubFile | None:
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, filename, revision=revision)
    if not isinstance(path, str):
        return None
    blob = Path(path).resolve()  # blobs/<etag>: an LFS file's ETag is its SHA-256
    sha = blob.name if len(blob.name) == 64 and all(c in "0123456789abcdef" for c in blob.name) else None
    return HubFile(repo_id, filename, blob.stat().st_size, sha, "local hub cache")


def choose_source(source: str, repo_id: str = SD15_REPO, filename: str = SD15_FILENAME) -> tuple[str, str]:
    """(source, why). "auto" is the hub when it has the file (online, or offline from the local hub cache): hosted
    notebooks (Colab, Kaggle) often block peer-to-peer traffic, so BitTorrent is an opt-in ("torrent"). Without the
    hub, "auto" is "loopback", the offline demo on a swarm on this machine. Anything else is used as it is."""
    if source != "auto":
        return source, "as SOURCE says (yours, or the profile's)"
    hub = hub_file_info(repo_id, filename)
    if hub is not None:
        return "hub", f"the hub has {repo_id}/{filename} ({hub.where}); BitTorrent is an opt-in: SOURCE='torrent'"
    return "loopback", f"the hub is out of reach and no local hub cache holds {repo_id}/{filename}: the offline demo"


def download_torrent_or_hub(
    source: str | Path | lt.torrent_info,
    dest_dir: str | Path,
    repo_id: str = SD15_REPO,
    filename: str = SD15_FILENAME,
    *,
    hub_dest_dir: str | Path | None = None,
    sha256: str | None = None,
    **torrent_kwargs,
) -> DownloadReport:
    """`download_torrent`, and when the swarm fails (no peer, too slow, only corrupt data) the same file from the hub
    (`download_hub` into `hub_dest_dir`, default the hub cache). The hub's report records why in
    `detail["fallback"]`. Errors the hub cannot help with (a wrong link, a full disk, a stop) are raised."""
    try:
        return download_torrent(source, dest_dir, sha256=sha256, **torrent_kwargs)
    except TORRENT_FALLBACK_ERRORS as exc:
        failure = exc
    why = f"{type(failure).__name__}: {failure}"
    print(f"BitTorrent failed ({why}). Hosted notebooks (Colab, Kaggle) often block peer-to-peer traffic; "
          f"falling back to the hub: {repo_id}/{filename}")
    try:
        report = download_hub(repo_id, filename, hub_dest_dir, sha256=sha256)
    except DownloadError as exc:
        exc.add_note(f"the hub was the fallback: BitTorrent failed first ({why})")
        partial = _incomplete_torrent_file(source, dest_dir)
        if isinstance(exc, InsufficientDiskSpaceError) and partial is not None:
            exc.add_note(f"the incomplete torrent download {partial} takes {format_bytes(_bytes_on_disk(partial))}: "
                         f"delete it and {resume_path(partial.parent, partial.name).name} to make room")
        raise
    report.detail["fallback"] = {"from": "torrent", "error": type(failure).__name__, "why": str(failure)}
    return report


def _incomplete_torrent_file(source, dest_dir: str | Path) -> Path | None:
    """The file an unfinished download of a magnet link left in `dest_dir`, if there is one."""
    try:
        name = parse_magnet(source).name if isinstance(source, str) else None
    except MagnetError:
        return None
    path = Path(dest_dir) / name if name else None
    return path if path is not None and _bytes_on_disk(path) > 0 else None


def compare_with_hub(
    path: str | Path, repo_id: str = SD15_REPO, filename: str = SD15_FILENAME, *, file_sha256: str | None = None
) -> dict:
    """Is `path` byte for byte the hub's `filename`? Its size and SHA-256 against the ones the hub publishes
    (`hub_file_info`): no second download. `file_sha256`, when already known, saves one read of the file."""
    hub = hub_file_info(repo_id, filename)
    if hub is None:
        raise DownloadError(
            f"cannot get the size and SHA-256 of {repo_id}/{filename} from the hub, nor from a local hub cache: "
            "is the internet on? (Kaggle: Settings > Internet)"
        )
    size = Path(path).stat().st_size
    result = {"repo_id": repo_id, "filename": filename, "where": hub.where, "hub_size": hub.size,
              "hub_sha256": hub.sha256, "file_size": size, "file_sha256": None}
    if size != hub.size:
        return {**result, "same": False, "why": f"{size:,} bytes here, {hub.size:,} on the hub"}
    if hub.sha256 is None:
        return {**result, "same": None, "why": "same size; the hub publishes no SHA-256 for it (not an LFS file)"}
    result["file_sha256"] = file_sha256 or sha256_file(path)
    same = result["file_sha256"] == hub.sha256
    return {**result, "same": same, "why": "same SHA-256" if same else "the SHA-256 differs"}


def local_file_report(path: str | Path, expected_size: int | None = None, sha256: str | None = None) -> DownloadReport:
    """The same report for a file the user already has (source 'local'): verified, nothing downloaded."""
    t0, started = _now()
    path = Path(path)
    verified = verify_file(path, expected_size, sha256=sha256)
    t1, finished = _now()
    return DownloadReport(
        "local",
        str(path),
        path.stat().st_size,
        started,
        finished,
        t1 - t0,
        0,
        resumed_bytes=path.stat().st_size,
        cached=True,
        verified=verified,
    )
