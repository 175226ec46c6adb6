"""Test fixtures on loopback (127.0.0.1): a free port, and `CorruptPeer`, a BitTorrent peer that lies.

- `free_port()`: a TCP port on 127.0.0.1 with nobody listening (a server to start there, or "no peer answers").
- `CorruptPeer(torrent)`: a minimal, hand-written BitTorrent peer that claims every piece and answers every
  request with garbage, to check that the leecher rejects data that fails the piece hashes.
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import libtorrent as lt

from helpers.checkpoints.swarm import LEECHER_KWARGS, LOOPBACK


def free_port() -> int:
    """A TCP port on 127.0.0.1 with nobody listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class CorruptPeer:
    """A BitTorrent peer on 127.0.0.1 that has every piece of `torrent` and sends garbage for each.

    It speaks just enough of the wire protocol (BEP 3: handshake, bitfield, unchoke, request -> piece) to be
    downloaded from; the leecher must notice that no piece passes its SHA-1 hash and ban it.
    It has no encryption (MSE) and no uTP, so a leecher must use `CorruptPeer.LEECHER_SETTINGS`
    (libtorrent tries both first by default and would only fall back to plain TCP after a timeout).
    """

    LEECHER_SETTINGS = {**LEECHER_KWARGS["settings"], "out_enc_policy": lt.enc_policy.pe_disabled}

    def __init__(self, torrent: str | Path | lt.torrent_info):
        self.info = torrent if isinstance(torrent, lt.torrent_info) else lt.torrent_info(str(torrent))
        self.info_hash = self.info.info_hashes().v1.to_bytes()
        self.blocks_sent = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((LOOPBACK, 0))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="CorruptPeer")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    @staticmethod
    def _recv(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("peer closed")
            data += chunk
        return data

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            handshake = self._recv(conn, 68)
            if handshake[28:48] != self.info_hash:
                return
            conn.sendall(b"\x13BitTorrent protocol" + bytes(8) + self.info_hash + b"-XX0001-corruptpeer!"[:20])
            n = self.info.num_pieces()
            bits = bytearray((n + 7) // 8)
            for i in range(n):
                bits[i // 8] |= 0x80 >> (i % 8)
            conn.sendall(struct.pack(">IB", 1 + len(bits), 5) + bytes(bits))  # bitfield: I have everything
            conn.sendall(struct.pack(">IB", 1, 1))  # unchoke
            while not self._stop.is_set():
                (length,) = struct.unpack(">I", self._recv(conn, 4))
                if length == 0:
                    continue  # keep-alive
                body = self._recv(conn, length)
                if body[0] == 6:  # request: index, begin, length -> piece with garbage
                    index, begin, size = struct.unpack(">III", body[1:13])
                    block = bytes([0xA5]) * size
                    conn.sendall(struct.pack(">IBII", 9 + size, 7, index, begin) + block)
                    self.blocks_sent += 1
        except (OSError, ConnectionError, struct.error):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=2)

    def __enter__(self) -> CorruptPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
