"""Hostile inputs for tests: a tiny PNG whose header claims a huge size, and tar members of every unsafe kind."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

from PIL import Image


def png_claiming(width: int, height: int) -> bytes:
    """A few-dozen-byte PNG whose IHDR says `width` x `height` (its pixel data is one pixel's: never decodable)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())  # 8-byte signature, then IHDR: length, b"IHDR", 13 bytes of fields, CRC
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def add_member(
    tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> None:
    """Append one member: a regular file with `data`, or a link/device of `kind` (to `link`)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
