"""
Files for the load generator: each one different, and cheap to make and hash.

A file is a random body shared by every file of its size, followed by a short
trailer that names the file. The body's length is a multiple of 3, so a file's
Base64 is the body's Base64 (encoded once) followed by the trailer's. Its
sha256 continues a copy of the body's hash state. That way a master can
submit gigabytes without encoding or hashing each byte again, and its own CPU
time stays small next to linkup's. The workers still decode and hash every
byte they receive: they check what actually arrived.
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Sequence

import orjson

__all__ = ["MIME_TYPE", "MIN_FILE_SIZE", "FileMaker", "file_name", "submit_parts"]

MIME_TYPE = "application/octet-stream"
# Room for a newline and the longest file name (file_name) in every trailer.
TRAILER_MIN = 24
MIN_FILE_SIZE = TRAILER_MIN + 3


def file_name(master: int, index: int) -> str:
    """A file name unique in the run: master number and file number."""
    return f"m{master:03d}-{index:07d}.bin"


class FileMaker:
    """The files of one size: their Base64 pieces and their sha256."""

    def __init__(self, size: int, seed: int) -> None:
        if size < MIN_FILE_SIZE:
            raise ValueError(f"files must have at least {MIN_FILE_SIZE} bytes")
        self.size = size
        # 24 to 26 bytes, so that the body left over is a multiple of 3.
        self.trailer_size = TRAILER_MIN + (size - TRAILER_MIN) % 3
        body = random.Random(f"{seed}/{size}").randbytes(size - self.trailer_size)
        self.body_base64 = base64.b64encode(body)
        self._body_hash = hashlib.sha256(body)

    def trailer(self, name: str) -> bytes:
        encoded = f"\n{name}".encode()
        if len(encoded) > self.trailer_size:
            raise ValueError(f"file name too long for a trailer: {name}")
        return encoded.ljust(self.trailer_size, b"#")

    def digest(self, name: str) -> str:
        """The sha256 (hex) of the file called ``name``."""
        state = self._body_hash.copy()
        state.update(self.trailer(name))
        return state.hexdigest()

    def content(self, name: str) -> bytes:
        """The whole file, decoded; for tests of this module, not for the run."""
        return base64.b64decode(self.body_base64) + self.trailer(name)


def submit_parts(
    session_id: str, names: Sequence[str], maker: FileMaker
) -> list[bytes]:
    """
    A SUBMIT_TASKS message in pieces, to be joined or streamed. The body's
    Base64 is the same object in every file, so the list costs almost nothing
    however large the message.

    """
    head = orjson.dumps({"type": "SUBMIT_TASKS", "sessionId": session_id})
    parts = [head[:-1] + b',"tasks":[']
    for number, name in enumerate(names):
        entry = orjson.dumps({"filename": name, "mimeType": MIME_TYPE})
        parts += [
            (b"," if number else b"") + entry[:-1] + b',"dataBase64":"',
            maker.body_base64,
            base64.b64encode(maker.trailer(name)),
            b'","size":' + str(maker.size).encode() + b"}",
        ]
    parts.append(b"]}")
    return parts
