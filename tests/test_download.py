"""Downloads over a real BitTorrent swarm on loopback (127.0.0.1): no tracker, no DHT, no internet.

A libtorrent seeder serves a generated safetensors file; the leecher starts from a magnet link whose only
peer is `x.pe=127.0.0.1:PORT` and gets the metadata from the seeder (BEP 9) before the pieces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from loopback import CorruptPeer, free_port

from helpers.checkpoints import download as D
from helpers.checkpoints.swarm import LEECHER_KWARGS, LoopbackSeeder, generate_safetensors_file, make_torrent

LOOPBACK = {**LEECHER_KWARGS, "progress": False}
SIZE = 8 << 20  # 8 MiB
PIECE = 64 << 10  # 128 pieces of 64 KiB: enough to interrupt half-way


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source_file(tmp_path_factory) -> Path:
    return generate_safetensors_file(tmp_path_factory.mktemp("seed") / "model.safetensors", SIZE, seed=1)


@pytest.fixture
def seeder(source_file):
    with LoopbackSeeder(source_file, piece_size=PIECE) as s:
        yield s


# --- magnet links ------------------------------------------------------------------------------------


def test_magnet_base32_and_hex_are_the_same_torrent():
    hex_link = D.parse_magnet(D.SD15_MAGNET)
    b32_link = D.parse_magnet(D.SD15_MAGNET.replace(hex_link.info_hash, "H6ABMBQRGKWUUR26WM62YVU7HKEEDCLU"))
    assert hex_link.info_hash == b32_link.info_hash == "3f8016061132ad4a475eb33dac569f3a88418974"
    assert hex_link.size == D.SD15_SIZE == 4_265_146_304
    assert hex_link.name == "v1-5-pruned-emaonly.safetensors"
    assert hex_link.trackers == ("udp://exodus.desync.com:6969/announce",)


def test_magnet_peers_are_parsed():
    link = D.parse_magnet("magnet:?xt=urn:btih:" + "ab" * 20 + "&dn=a%20b.bin&xl=10&x.pe=127.0.0.1:6881&x.pe=[::1]:7")
    assert link.peers == (("127.0.0.1", 6881), ("::1", 7))
    assert link.name == "a b.bin" and link.size == 10 and link.trackers == ()


def test_magnet_to_uri_is_the_expected_link():
    tracker = "udp://tracker.example:6969/announce"
    link = D.MagnetLink("ab" * 20, "a b&c.bin", 10, (tracker,), (("127.0.0.1", 6881), ("::1", 7)))
    uri = link.to_uri()
    # written out by hand: every field, percent-encoded where the query syntax needs it, in this order
    assert uri == (
        "magnet:?xt=urn:btih:" + "ab" * 20 + "&dn=a%20b%26c.bin&xl=10"
        "&tr=udp%3A%2F%2Ftracker.example%3A6969%2Fannounce&x.pe=127.0.0.1:6881&x.pe=[::1]:7"
    )
    assert parse_qsl(urlsplit(uri).query) == [
        ("xt", "urn:btih:" + "ab" * 20),
        ("dn", "a b&c.bin"),
        ("xl", "10"),
        ("tr", tracker),
        ("x.pe", "127.0.0.1:6881"),
        ("x.pe", "[::1]:7"),
    ]
    # libtorrent, which starts the download from this link, reads the same torrent out of it
    params = D.lt.parse_magnet_uri(uri)
    assert (str(params.info_hashes.v1), params.name, params.trackers) == ("ab" * 20, "a b&c.bin", [tracker])
    assert params.peers == [("127.0.0.1", 6881), ("::1", 7)]
    # and our parser gets every field back (all but the raw text it was given)
    assert dataclasses.replace(D.parse_magnet(uri), uri="") == link
    # optional fields are left out, not written empty
    assert D.MagnetLink("cd" * 20).to_uri() == "magnet:?xt=urn:btih:" + "cd" * 20
    # a name is decoded once: "%2541" in the link is the text "%41", not "A"
    odd = D.MagnetLink("ab" * 20, "100%41.bin")
    assert D.parse_magnet(odd.to_uri()).name == "100%41.bin" == D.lt.parse_magnet_uri(odd.to_uri()).name


@pytest.mark.parametrize(
    "uri, words",
    [
        ("http://example.com/file", "not a magnet"),
        ("magnet:?dn=x&xl=3", "no 'xt"),
        ("magnet:?xt=urn:btih:1234", "40 (hex) or 32 (base32)"),
        ("magnet:?xt=urn:btih:" + "zz" * 20, "not hexadecimal"),
        ("magnet:?xt=urn:btih:" + "1" * 32, "not base32"),
        ("magnet:?xt=urn:btih:" + "ab" * 20 + "&xl=-5", "positive integer"),
        ("magnet:?xt=urn:btih:" + "ab" * 20 + "&x.pe=localhost", "HOST:PORT"),
        ("magnet:?xt=urn:btih:" + "ab" * 20 + "&dn=../../etc/passwd", "plain file name"),
    ],
)
def test_malformed_magnets_are_rejected(uri, words):
    with pytest.raises(D.MagnetError, match=words.replace("(", r"\(").replace(")", r"\)")):
        D.parse_magnet(uri)
    with pytest.raises(D.MagnetError):  # and download_torrent refuses before opening a session
        D.download_torrent(uri, "/nonexistent-never-created", **LOOPBACK)


# --- the happy path: metadata exchange, pieces, report, cache ---------------------------------------


def test_loopback_download_from_magnet_then_cached(seeder, source_file, tmp_path):
    assert "x.pe=127.0.0.1:" in seeder.magnet and "tr=" not in seeder.magnet
    report = D.download_torrent(seeder.magnet, tmp_path, metadata_timeout=20, stall_timeout=20, **LOOPBACK)
    path = tmp_path / "model.safetensors"
    assert report.path == str(path) and not report.cached
    assert sha(path) == sha(source_file)
    assert report.size_bytes == SIZE == report.downloaded_bytes
    assert report.average_speed == pytest.approx(SIZE / report.elapsed_s), "bytes fetched per second of wall time"
    assert report.peers_max >= 1
    assert report.verified["size"] == "ok" and report.verified["safetensors"].startswith("ok")
    assert report.detail["hash_failures"] == 0
    text = str(report)
    for word in ("start", "finish", "elapsed", "size", "average"):
        assert word in text
    assert D.resume_path(tmp_path, "model.safetensors").is_file()  # metadata kept for cache checks

    seeder.close()  # the second call must not need the network at all
    again = D.download_torrent(seeder.magnet, tmp_path, metadata_timeout=2, **LOOPBACK)
    assert again.cached and again.downloaded_bytes == 0
    assert again.verified["pieces"].startswith("ok")
    assert "cached" in str(again)


def test_download_from_torrent_file_with_sha256(seeder, source_file, tmp_path):
    report = D.download_torrent(
        seeder.torrent_path,
        tmp_path,
        peers=[("127.0.0.1", seeder.port)],
        sha256=sha(source_file),
        stall_timeout=20,
        **LOOPBACK,
    )
    assert report.verified["sha256"] == "ok"


# --- resume -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_resume_data", [True, False])
def test_interrupted_download_resumes_without_refetching(source_file, tmp_path, keep_resume_data):
    with LoopbackSeeder(source_file, piece_size=PIECE, upload_rate_limit=2 << 20) as seeder:  # 2 MB/s: ~4 s
        with pytest.raises(D.DownloadInterrupted) as stopped:
            D.download_torrent(
                seeder.magnet, tmp_path, stall_timeout=20, stop_when=lambda st: st.progress >= 0.4, **LOOPBACK
            )
        done_first = stopped.value.done_bytes
        assert 0.3 * SIZE <= done_first < SIZE  # progress counts unfinished pieces too; done_bytes does not
        resume_file = D.resume_path(tmp_path, "model.safetensors")
        assert resume_file.is_file()
        if not keep_resume_data:  # then libtorrent hashes what is on disk once the metadata arrives
            resume_file.unlink()
        seeder.set_upload_rate_limit(0)
        report = D.download_torrent(seeder.magnet, tmp_path, stall_timeout=20, **LOOPBACK)
    assert sha(tmp_path / "model.safetensors") == sha(source_file)
    assert not report.cached
    assert report.resumed_bytes >= done_first
    # only the missing pieces travel again: the leecher's own payload counter for this run
    assert report.downloaded_bytes <= SIZE - done_first
    assert report.detail["payload_downloaded"] <= SIZE - done_first + PIECE
    again = D.download_torrent(seeder.magnet, tmp_path, metadata_timeout=2, **LOOPBACK)  # seeder closed: offline
    assert again.cached and again.verified["pieces"].startswith("ok")


def test_damaged_piece_on_disk_is_refetched_alone(seeder, source_file, tmp_path):
    D.download_torrent(seeder.magnet, tmp_path, stall_timeout=20, **LOOPBACK)
    path = tmp_path / "model.safetensors"
    with open(path, "r+b") as f:  # flip bytes in the middle of piece 70
        f.seek(70 * PIECE + 123)
        f.write(b"\x00\xff" * 8)
    with pytest.raises(D.CorruptDataError, match="1 of 128 pieces"):
        D.verify_file(path, SIZE, info=seeder.info)
    report = D.download_torrent(seeder.magnet, tmp_path, stall_timeout=20, **LOOPBACK)
    assert not report.cached
    assert sha(path) == sha(source_file)
    assert report.downloaded_bytes == PIECE
    assert report.detail["payload_downloaded"] == PIECE


def test_complete_file_without_metadata_is_checked_by_libtorrent(seeder, source_file, tmp_path):
    # e.g. the file came from the hub: no resume data, so libtorrent hashes it once the metadata arrives
    (tmp_path / "model.safetensors").write_bytes(source_file.read_bytes())
    report = D.download_torrent(seeder.magnet, tmp_path, stall_timeout=20, **LOOPBACK)
    assert report.cached and report.downloaded_bytes == 0 and report.detail["payload_downloaded"] == 0


# --- bad cases ----------------------------------------------------------------------------------------


def test_no_peer_times_out_quickly(tmp_path):
    port = free_port()  # nobody listens there
    magnet = f"magnet:?xt=urn:btih:{'ab' * 20}&dn=x.safetensors&xl=1000&x.pe=127.0.0.1:{port}"
    t = time.monotonic()
    with pytest.raises(D.NoPeersError, match="no metadata .* after 2 s .*no peer connected"):
        D.download_torrent(magnet, tmp_path, metadata_timeout=2, **LOOPBACK)
    assert time.monotonic() - t < 10
    assert not (tmp_path / "x.safetensors").exists()


def test_wrong_magnet_for_the_swarm(seeder, tmp_path):
    # right peer, wrong info hash: the seeder drops the handshake, so no metadata ever comes
    wrong = seeder.magnet.replace(seeder.info_hash, "cd" * 20)
    with pytest.raises(D.NoPeersError):
        D.download_torrent(wrong, tmp_path, metadata_timeout=2, **LOOPBACK)
    # right torrent, wrong size in the link: caught as soon as the metadata arrives
    wrong_size = seeder.magnet.replace(f"xl={SIZE}", f"xl={SIZE - 1}")
    with pytest.raises(D.MagnetError, match="xl=8,388,607"):
        D.download_torrent(wrong_size, tmp_path, metadata_timeout=10, **LOOPBACK)


def test_corrupt_peer_data_is_rejected(source_file, tmp_path):
    torrent = make_torrent(source_file, PIECE, tmp_path / "model.torrent")
    dest = tmp_path / "dest"
    with CorruptPeer(torrent) as liar:
        with pytest.raises(D.CorruptDataError, match="failed their SHA-1"):
            D.download_torrent(
                torrent,
                dest,
                peers=[("127.0.0.1", liar.port)],
                stall_timeout=3,
                metadata_timeout=5,
                **{**LOOPBACK, "settings": CorruptPeer.LEECHER_SETTINGS},
            )
        assert liar.blocks_sent > 0  # it did send data, and none of it was accepted
    path = dest / "model.safetensors"
    assert not path.exists() or D.check_pieces(path, D.lt.torrent_info(str(torrent))) != []


def test_not_enough_disk_space(seeder, tmp_path, monkeypatch):
    huge = f"magnet:?xt=urn:btih:{'ab' * 20}&dn=big.safetensors&xl={10**18}"
    with pytest.raises(D.InsufficientDiskSpaceError, match="not enough disk space"):
        D.download_torrent(huge, tmp_path, metadata_timeout=1, **LOOPBACK)
    # and when only the metadata tells the size (no xl), after the metadata arrives
    no_xl = seeder.magnet.replace(f"&xl={SIZE}", "")
    monkeypatch.setattr(D.shutil, "disk_usage", lambda p: _Usage(SIZE // 2))
    with pytest.raises(D.InsufficientDiskSpaceError):
        D.download_torrent(no_xl, tmp_path, metadata_timeout=10, **LOOPBACK)


class _Usage:
    def __init__(self, free):
        self.free = free


def test_destination_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(D.NotWritableError, match="is a file"):
        D.download_torrent(D.SD15_MAGNET, blocker / "sub", **LOOPBACK)
    with pytest.raises(PermissionError):  # NotWritableError is a PermissionError too
        D.ensure_writable_dir(blocker)


def test_truncated_and_corrupt_files_are_reported(source_file, tmp_path):
    good = tmp_path / "good.safetensors"
    good.write_bytes(source_file.read_bytes())
    assert D.verify_file(good, SIZE, sha256=sha(source_file))["sha256"] == "ok"

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(source_file.read_bytes()[: SIZE - 1000])
    with pytest.raises(D.TruncatedFileError, match="1,000 missing"):
        D.verify_file(cut, SIZE)
    with pytest.raises(D.TruncatedFileError):  # no expected size: the header still knows
        D.verify_file(cut)

    bad_header = tmp_path / "bad.safetensors"
    bad_header.write_bytes(source_file.read_bytes()[:8] + b"{not json" + source_file.read_bytes()[17:])
    with pytest.raises(D.VerificationError, match="not valid JSON"):
        D.verify_file(bad_header, SIZE)

    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(source_file.read_bytes())
    data[SIZE // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(D.CorruptDataError, match="SHA-256"):
        D.verify_file(flipped, SIZE, sha256=sha(source_file))


# --- the hub (offline here: the library is exercised through hf_hub_download's own offline mode) ------


def test_hub_offline_without_cache_is_a_clear_error(tmp_path):
    with pytest.raises(D.DownloadError, match="cannot reach"):
        D.download_hub("someone/not-here", "model.safetensors", tmp_path / "hub", cache_dir=tmp_path / "cache")


def test_hub_report_uses_hf_hub_download(source_file, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.file_download import DryRunFileInfo

    calls = []

    def fake_hf_hub_download(repo_id, filename, *, dry_run=False, local_dir=None, **kwargs):
        target = Path(local_dir) / filename
        calls.append(dry_run)
        if dry_run:
            cached = target.is_file()
            return DryRunFileInfo(
                commit_hash="0" * 40,
                file_size=SIZE,
                filename=filename,
                is_cached=cached,
                local_path=str(target),
                will_download=not cached,
            )
        if not target.is_file():
            target.write_bytes(source_file.read_bytes())
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    first = D.download_hub("org/repo", "model.safetensors", tmp_path)
    assert not first.cached and first.downloaded_bytes == SIZE and first.source == "hub"
    second = D.download_hub("org/repo", "model.safetensors", tmp_path)
    assert second.cached and second.downloaded_bytes == 0
    assert calls == [True, False, True, False]


def test_hub_offline_with_the_file_in_local_dir_is_cached(source_file, tmp_path):
    # the real library, offline: hf_hub_download falls back to the file already in local_dir
    (tmp_path / "model.safetensors").write_bytes(source_file.read_bytes())
    report = D.download_hub("org/repo", "model.safetensors", tmp_path, expected_size=SIZE)
    assert report.cached and report.downloaded_bytes == 0 and report.verified["size"] == "ok"
    with pytest.raises(D.TruncatedFileError):  # and a file of the wrong size is not taken for the real one
        D.download_hub("org/repo", "model.safetensors", tmp_path, expected_size=SIZE + 1)


def test_magnet_without_or_with_another_dn(seeder, source_file, tmp_path):
    no_name = seeder.magnet.replace("&dn=model.safetensors", "")
    report = D.download_torrent(no_name, tmp_path / "a", stall_timeout=20, **LOOPBACK)
    assert Path(report.path).name == "model.safetensors" and sha(Path(report.path)) == sha(source_file)
    other_name = seeder.magnet.replace("dn=model.safetensors", "dn=other.safetensors")
    report = D.download_torrent(other_name, tmp_path / "b", stall_timeout=20, **LOOPBACK)
    assert report.path == str(tmp_path / "b" / "model.safetensors")  # the torrent's own name wins


def test_ctrl_c_keeps_the_verified_pieces(source_file, tmp_path):
    def press_ctrl_c(status):
        if status.progress >= 0.3:
            raise KeyboardInterrupt

    with LoopbackSeeder(source_file, piece_size=PIECE, upload_rate_limit=2 << 20) as seeder:
        with pytest.raises(KeyboardInterrupt):
            D.download_torrent(seeder.magnet, tmp_path, stall_timeout=20, stop_when=press_ctrl_c, **LOOPBACK)
        resume = D.lt.read_resume_data(D.resume_path(tmp_path, "model.safetensors").read_bytes())
        assert sum(resume.have_pieces) >= 0.2 * SIZE / PIECE


def test_storage_error_is_reported_not_hung(seeder, tmp_path):
    (tmp_path / "model.safetensors").mkdir()  # a folder where the file must go
    t = time.monotonic()
    with pytest.raises(D.DownloadError, match="storage error|cannot write"):
        D.download_torrent(seeder.magnet, tmp_path, stall_timeout=20, metadata_timeout=10, **LOOPBACK)
    assert time.monotonic() - t < 15


# --- Colab/Kaggle: the hub by default, BitTorrent an opt-in that falls back to it, a comparison that downloads nothing


@pytest.fixture
def sd15_on_hub(source_file, tmp_path, monkeypatch) -> Path:
    """A local hub cache (offline) holding `source_file` as SD 1.5's single file; returns the cached file."""
    from hub_cache import put_in_hub_cache, use_hub_cache

    snapshot = put_in_hub_cache(tmp_path / "hub-cache", D.SD15_REPO, {D.SD15_FILENAME: source_file})
    use_hub_cache(tmp_path / "hub-cache", monkeypatch)
    return snapshot / D.SD15_FILENAME


def no_download(*args, **kwargs):
    raise AssertionError("the comparison downloaded the file")


NOBODY_SERVES_SD15 = f"magnet:?xt=urn:btih:{'ab' * 20}&dn={D.SD15_FILENAME}&xl={SIZE}"


def test_auto_source_is_the_hub_when_it_has_the_file(sd15_on_hub):
    source, why = D.choose_source("auto", D.SD15_REPO, D.SD15_FILENAME)
    assert source == "hub" and "local hub cache" in why
    assert D.choose_source("torrent", D.SD15_REPO, D.SD15_FILENAME)[0] == "torrent", "BitTorrent is an opt-in"


def test_auto_source_offline_without_the_file_is_the_loopback_demo(tmp_path, monkeypatch):
    from hub_cache import use_hub_cache

    use_hub_cache(tmp_path / "empty-cache", monkeypatch)
    source, why = D.choose_source("auto", D.SD15_REPO, D.SD15_FILENAME)
    assert source == "loopback" and "out of reach" in why


def test_torrent_without_peers_falls_back_to_the_hub_and_says_why(sd15_on_hub, source_file, tmp_path, capsys):
    t = time.monotonic()
    report = D.download_torrent_or_hub(NOBODY_SERVES_SD15, tmp_path / "torrent", D.SD15_REPO, D.SD15_FILENAME,
                                       metadata_timeout=1, **LOOPBACK)
    assert time.monotonic() - t < 15
    assert report.source == "hub" and Path(report.path).resolve() == sd15_on_hub.resolve()
    assert report.detail["fallback"]["from"] == "torrent" and report.detail["fallback"]["error"] == "NoPeersError"
    said = capsys.readouterr().out
    assert "NoPeersError" in said and "peer-to-peer" in said and D.SD15_REPO in said
    assert "fallback" in str(report) and "NoPeersError" in str(report), "the report says why it came from the hub"


def test_torrent_timeout_falls_back_to_the_hub(sd15_on_hub, tmp_path, monkeypatch):
    def too_slow(*args, **kwargs):
        raise D.DownloadTimeoutError("download not finished after 7200 s (3.1% done)")

    monkeypatch.setattr(D, "download_torrent", too_slow)
    report = D.download_torrent_or_hub(NOBODY_SERVES_SD15, tmp_path, D.SD15_REPO, D.SD15_FILENAME)
    assert report.source == "hub" and report.detail["fallback"]["error"] == "DownloadTimeoutError"


@pytest.mark.parametrize("error", [D.MagnetError("wrong link"), D.InsufficientDiskSpaceError("full"),
                                   D.DownloadInterrupted("stopped")])
def test_torrent_errors_the_hub_cannot_help_with_are_raised(sd15_on_hub, tmp_path, monkeypatch, error):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(D, "download_torrent", fails)
    with pytest.raises(type(error)):
        D.download_torrent_or_hub(NOBODY_SERVES_SD15, tmp_path, D.SD15_REPO, D.SD15_FILENAME)


def test_fallback_to_an_unreachable_hub_names_both_failures(tmp_path, monkeypatch):
    from hub_cache import use_hub_cache

    use_hub_cache(tmp_path / "empty-cache", monkeypatch)
    with pytest.raises(D.DownloadError, match="cannot reach") as raised:
        D.download_torrent_or_hub(NOBODY_SERVES_SD15, tmp_path / "t", D.SD15_REPO, D.SD15_FILENAME,
                                  metadata_timeout=1, **LOOPBACK)
    assert any("NoPeersError" in note for note in raised.value.__notes__)


def test_fallback_without_room_for_the_hub_says_which_partial_download_to_delete(sd15_on_hub, tmp_path,
                                                                                   monkeypatch):
    def too_slow_after_half(source, dest_dir, **kwargs):
        (Path(dest_dir) / D.SD15_FILENAME).write_bytes(b"x" * 4096)  # what an unfinished download leaves
        raise D.DownloadTimeoutError("download not finished after 7200 s (50.0% done)")

    def no_room(*args, **kwargs):
        raise D.InsufficientDiskSpaceError("not enough disk space in /kaggle/working: the file needs 4.27 GB more, "
                                           "only 2.10 GB free. Free some space or choose another destination.")

    monkeypatch.setattr(D, "download_torrent", too_slow_after_half)
    monkeypatch.setattr(D, "download_hub", no_room)
    with pytest.raises(D.InsufficientDiskSpaceError, match="needs 4.27 GB more, only 2.10 GB free") as raised:
        D.download_torrent_or_hub(NOBODY_SERVES_SD15, tmp_path, D.SD15_REPO, D.SD15_FILENAME)
    notes = " ".join(raised.value.__notes__)
    assert "DownloadTimeoutError" in notes and str(tmp_path / D.SD15_FILENAME) in notes and ".fastresume" in notes


def test_compare_with_hub_offline_reads_the_hash_from_the_cache_and_downloads_nothing(
        sd15_on_hub, source_file, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    same = D.compare_with_hub(source_file, D.SD15_REPO, D.SD15_FILENAME)
    assert same["same"] is True and same["hub_sha256"] == sha(source_file) and same["where"] == "local hub cache"
    other = tmp_path / "other.safetensors"
    other.write_bytes(source_file.read_bytes()[:-1] + b"!")
    differs = D.compare_with_hub(other, D.SD15_REPO, D.SD15_FILENAME)
    assert differs["same"] is False and differs["file_sha256"] == sha(other)
    shorter = tmp_path / "shorter.safetensors"
    shorter.write_bytes(source_file.read_bytes()[:1000])
    assert D.compare_with_hub(shorter, D.SD15_REPO, D.SD15_FILENAME)["same"] is False


def test_compare_with_hub_online_asks_for_the_published_sha256_only(source_file, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.hf_api import RepoFile

    asked = []

    def get_paths_info(self, repo_id, paths, **kwargs):
        asked.append((repo_id, paths))
        return [RepoFile(path=paths[0], size=SIZE, oid="f" * 40,
                         lfs={"size": SIZE, "oid": sha(source_file), "pointerSize": 134})]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", get_paths_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    result = D.compare_with_hub(source_file, D.SD15_REPO, D.SD15_FILENAME)
    assert result["same"] is True and result["where"] == "hub" and asked == [(D.SD15_REPO, [D.SD15_FILENAME])]


def test_compare_with_hub_out_of_reach_is_a_clear_error(source_file, tmp_path, monkeypatch):
    from hub_cache import use_hub_cache

    use_hub_cache(tmp_path / "empty-cache", monkeypatch)
    with pytest.raises(D.DownloadError, match="SHA-256"):
        D.compare_with_hub(source_file, D.SD15_REPO, D.SD15_FILENAME)


def test_hub_download_checks_free_disk_before_it_starts(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.file_download import DryRunFileInfo

    def plan_only(repo_id, filename, *, dry_run=False, **kwargs):
        assert dry_run, "the download started without room for it"
        return DryRunFileInfo(commit_hash="0" * 40, file_size=10**18, filename=filename, is_cached=False,
                              local_path=str(tmp_path / filename), will_download=True)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", plan_only)
    with pytest.raises(D.InsufficientDiskSpaceError, match=r"needs 1000000\.00 TB.* free"):
        D.download_hub(D.SD15_REPO, D.SD15_FILENAME, tmp_path)
