"""A download shard's tar as webdataset samples, keyed by member path; hostile members fail their sample."""

from __future__ import annotations

import io
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field

KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a fifo",
}


@dataclass
class TarSamples:
    """A tar's samples: {key: {ext: bytes}}, and {key: reason} for each sample that a member of it makes fail."""

    parts: dict[str, dict[str, bytes]] = field(default_factory=lambda: defaultdict(dict))
    refused: dict[str, str] = field(default_factory=dict)

    def sample_keys(self) -> list[str]:
        """Every sample key, the refused ones included, sorted."""
        return sorted(set(self.parts) | set(self.refused))

    def refuse(self, key: str, reason: str) -> None:
        """Fail a sample (its first reason is kept)."""
        self.refused.setdefault(key, reason[:300])


def member_key(name: str) -> tuple[str, str, str | None]:
    """(sample key, extension, why the name is unsafe or None) of a member name.

    The key is the member's whole path up to the first dot of its last component (webdataset's convention), so
    `x/000000600.jpg` and `000000600.jpg` are different samples. A safe name drops `.` and empty components; an
    absolute name or one with a `..` component keeps its path as it is, so it can never be another sample's key.
    """
    parts = name.split("/")
    if name.startswith("/") or ".." in parts:
        why = "an absolute path" if name.startswith("/") else "a '..' component"
    else:
        why, parts = None, [p for p in parts if p not in ("", ".")] or [""]
    stem, _, ext = parts[-1].partition(".")
    return "/".join([*parts[:-1], stem]), ext, why  # "/".join keeps an absolute name's leading slash


def read_tar(data: bytes) -> TarSamples:
    """Members of a webdataset tar grouped by sample key; a damaged tar raises.

    A member that is a link, a device or a fifo, whose name is absolute or has a `..` component, or whose name
    appears twice fails its sample with a reason (`unsafe_member: ...`, `duplicate_member: ...`); directories are
    skipped. Nothing is ever written to disk.
    """
    out = TarSamples()
    seen: set[tuple[str, str]] = set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for member in tf:
            if member.isdir():
                continue
            key, ext, unsafe = member_key(member.name)
            if (key, ext) in seen:
                out.refuse(key, f"duplicate_member: {member.name} appears more than once")
            seen.add((key, ext))
            if unsafe or not member.isfile():
                what = unsafe or KINDS.get(member.type, f"a tar entry of type {member.type!r}")
                out.refuse(key, f"unsafe_member: {member.name} is {what}")
                continue
            f = tf.extractfile(member)
            content = f.read() if f is not None else b""
            if len(content) != member.size:
                raise tarfile.ReadError(f"member {member.name} is truncated")
            out.parts[key][ext] = content
    return out
