"""Point clouds for ImageBind's point modality (Point-Bind): read the common file formats, normalise, resample."""

from __future__ import annotations

import os

import numpy as np
import torch

from model.errors import ModelInputError

FORMATS = (".npy", ".pt", ".ply", ".pcd", ".xyz", ".pts", ".obj")
DEFAULT_POINTS = 8192  # Point-BERT's cloud size
ARRAY_COLUMNS = (3, 6)  # xyz, or xyz + normals (ModelNet's layout)

_PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}
_PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}
_PCD_TYPES = {("F", 4): "f4", ("F", 8): "f8"} | {
    (kind, size): f"{kind.lower()}{size}" for kind in "IU" for size in (1, 2, 4, 8)
}


class PointCloudError(ModelInputError):
    """A point-cloud file that cannot be used; the message names the file and says why."""


def read_points(path: str | os.PathLike[str]) -> np.ndarray:
    """The xyz of every point in a cloud file as (N, 3) float32; normals, colours and other properties are dropped.

    Raises:
        PointCloudError: an unknown suffix, a missing file, a malformed or truncated file, no x/y/z, no points,
            or points holding NaN or inf.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise PointCloudError(f"{path}: unknown point-cloud suffix {suffix!r}; accepted: {', '.join(FORMATS)}")
    if not os.path.isfile(path):
        raise PointCloudError(f"{path}: no such point-cloud file")
    xyz = _READERS[suffix](path)
    if len(xyz) == 0:
        raise PointCloudError(f"{path}: the cloud has no points")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, refused below
        xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    bad = int((~np.isfinite(xyz).all(axis=1)).sum())
    if bad:
        raise PointCloudError(f"{path}: {bad} of {len(xyz)} points hold NaN or inf (or overflow float32)")
    return xyz


def normalize_cloud(points: torch.Tensor) -> torch.Tensor:
    """Point-Bind's normalisation: centre on the mean, then scale so the farthest point lies on the unit sphere.

    Works on (N, 3) or batched (..., N, 3); a cloud whose points are all equal comes back as zeros.
    """
    if points.ndim < 2 or points.shape[-1] != 3 or points.shape[-2] == 0:
        raise ValueError(f"normalize_cloud needs (..., N, 3) with N >= 1, got {tuple(points.shape)}")
    if not points.is_floating_point():
        points = points.to(torch.float32)
    centred = points - points.mean(dim=-2, keepdim=True)
    same = (points == points[..., :1, :]).all(dim=-1).all(dim=-1)[..., None, None]  # mean's rounding is not 0
    centred = centred.masked_fill(same, 0)
    scale = centred.norm(dim=-1).amax(dim=-1)[..., None, None]
    return centred / torch.where(scale > 0, scale, torch.ones_like(scale))


def resample_cloud(points: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Exactly `n` points of an (N, 3) (or (..., N, 3)) cloud, drawn from a generator seeded with `seed`.

    N > n: a random subset without replacement, kept in its original order. N < n: every point, then random
    repeats. N == n: the cloud itself.
    """
    count = points.shape[-2]
    if n < 1 or count == 0:
        raise ValueError(f"resample_cloud needs n >= 1 and a non-empty cloud, got n={n} and {count} points")
    if count == n:
        return points
    generator = torch.Generator().manual_seed(seed)
    if count > n:
        index = torch.randperm(count, generator=generator)[:n].sort().values
    else:
        index = torch.cat([torch.arange(count), torch.randint(0, count, (n - count,), generator=generator)])
    return points.index_select(-2, index.to(points.device))


def load_point_cloud(
    path: str | os.PathLike[str], normalize: bool = False, points: int | None = None, seed: int = 0
) -> torch.Tensor:
    """`read_points` as a float32 (N, 3) tensor, then optionally `normalize_cloud`, then `resample_cloud` to `points`.

    The defaults only read: ImageBind-LLM's inference neither normalises nor resamples.
    """
    return prepare_cloud(torch.from_numpy(read_points(path)), normalize, points, seed)


def prepare_cloud(
    cloud: torch.Tensor, normalize: bool = False, points: int | None = None, seed: int = 0
) -> torch.Tensor:
    """An (N, 3) cloud as float32 on the CPU, then optionally `normalize_cloud`, then `resample_cloud` to `points`."""
    if cloud.ndim != 2 or cloud.shape[-1] != 3:
        raise PointCloudError(f"a point cloud is (N, 3), got a tensor of shape {tuple(cloud.shape)}")
    cloud = cloud.detach().to("cpu", torch.float32)
    if normalize:
        cloud = normalize_cloud(cloud)
    if points is not None:
        cloud = resample_cloud(cloud, points, seed)
    return cloud


def _xyz_columns(path: str, array: np.ndarray) -> np.ndarray:
    """The first 3 columns of an (N, 3) or (N, 6) numeric array; any other shape or dtype is refused."""
    if array.dtype.kind not in "fiu":
        raise PointCloudError(f"{path}: expected a real-valued array, found dtype {array.dtype}")
    if array.ndim != 2 or array.shape[1] not in ARRAY_COLUMNS:
        raise PointCloudError(f"{path}: expected an (N, 3) or (N, 6) array, found shape {tuple(array.shape)}")
    return array[:, :3]


def _read_npy(path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as e:
        raise PointCloudError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(array, np.ndarray):
        raise PointCloudError(f"{path}: expected one .npy array, found {type(array).__name__}")
    return _xyz_columns(path, array)


def _read_pt(path: str) -> np.ndarray:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise PointCloudError(f"{path}: not a weights-only tensor file ({type(e).__name__}: {reason})") from None
    if not isinstance(value, torch.Tensor):
        raise PointCloudError(f"{path}: expected a tensor, found {type(value).__name__}")
    if value.is_complex() or value.dtype == torch.bool:
        raise PointCloudError(f"{path}: expected a real-valued tensor, found dtype {value.dtype}")
    if value.ndim != 2 or value.shape[1] not in ARRAY_COLUMNS:
        raise PointCloudError(f"{path}: expected an (N, 3) or (N, 6) tensor, found shape {tuple(value.shape)}")
    return value[:, :3].to(torch.float32).numpy()


def _split_header(path: str, data: bytes, last: bytes, what: str) -> tuple[list[str], bytes]:
    """The header lines up to and including the first line starting with `last`, and the bytes after it."""
    start = 0
    lines = []
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            raise PointCloudError(f"{path}: the {what} header has no {last.decode()} line")
        line = data[start:end].rstrip(b"\r")
        try:
            lines.append(line.decode("ascii").strip())
        except UnicodeDecodeError:
            raise PointCloudError(f"{path}: the {what} header is not ASCII text") from None
        start = end + 1
        if line.strip().startswith(last):
            return lines, data[start:]


def _text_rows(path: str, lines: list[str], columns: tuple[int, ...]) -> np.ndarray:
    """`columns` of whitespace-separated numeric lines as float64 (len(lines), len(columns))."""
    try:
        return np.loadtxt(lines, dtype=np.float64, usecols=columns, comments=None, ndmin=2)
    except ValueError as e:
        raise PointCloudError(f"{path}: malformed numeric data ({e})") from None


def _binary_slice(path: str, body: bytes, dtype: np.dtype, count: int, offset: int = 0) -> np.ndarray:
    """`count` records of `dtype` at `offset` in `body`, refusing data shorter than the header promised."""
    needed = offset + count * dtype.itemsize
    if len(body) < needed:
        raise PointCloudError(
            f"{path}: truncated binary data: the header promises {needed} bytes of records, the file holds {len(body)}"
        )
    return np.frombuffer(body, dtype=dtype, count=count, offset=offset)


def _read_ply(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"ply"):
        raise PointCloudError(f"{path}: not a PLY file (it does not start with 'ply')")
    lines, body = _split_header(path, data, b"end_header", "PLY")
    byte_order: str | None = None
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str | None]]]] = []  # name, count, [(property, type or None)]
    for line in lines[1:-1]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) == 3 and words[1] in _PLY_FORMATS:
            fmt, byte_order = words[1], _PLY_FORMATS[words[1]]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) == 3 and words[1] in _PLY_TYPES:
            elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
        elif words[0] == "property" and elements and len(words) == 5 and words[1] == "list":
            elements[-1][2].append((words[4], None))
        else:
            raise PointCloudError(f"{path}: unsupported PLY header line {line!r}")
    if fmt is None:
        raise PointCloudError(
            f"{path}: the PLY header has no 'format ascii|binary_little_endian|binary_big_endian 1.0'"
        )
    names = [name for name, _, _ in elements]
    if "vertex" not in names:
        raise PointCloudError(f"{path}: the PLY header declares no vertex element")
    before = elements[: names.index("vertex")]
    _, count, props = elements[names.index("vertex")]
    columns = [name for name, _ in props]
    missing = [axis for axis in "xyz" if axis not in columns]
    if missing:
        raise PointCloudError(f"{path}: the PLY vertex element has no {', '.join(missing)} property")
    if any(kind is None for _, kind in props):
        raise PointCloudError(f"{path}: a list property in the PLY vertex element is not supported")
    if byte_order is None:
        text = [line for line in _decode(path, body).splitlines() if line.strip()]
        start = sum(n for _, n, _ in before)
        if len(text) < start + count:
            promised = f"the header promises {start + count} data lines up to the vertices"
            raise PointCloudError(f"{path}: truncated PLY: {promised}, found {len(text)}")
        return _text_rows(path, text[start : start + count], tuple(columns.index(axis) for axis in "xyz"))
    offset = 0
    for name, n, element_props in before:
        if any(kind is None for _, kind in element_props):
            raise PointCloudError(
                f"{path}: binary PLY with a list-property element {name!r} before the vertex element is not supported"
            )
        offset += n * np.dtype([(p, byte_order + kind) for p, kind in element_props]).itemsize
    record = np.dtype([(f"p{i}", byte_order + kind) for i, (_, kind) in enumerate(props)])
    rows = _binary_slice(path, body, record, count, offset)
    return np.stack([rows[f"p{columns.index(axis)}"].astype(np.float64) for axis in "xyz"], axis=1)


def _read_pcd(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    lines, body = _split_header(path, data, b"DATA", "PCD")
    header: dict[str, list[str]] = {}
    for line in lines:
        if line and not line.startswith("#"):
            key, *values = line.split()
            header[key.upper()] = values
    fields = header.get("FIELDS", [])
    sizes, types = header.get("SIZE", []), header.get("TYPE", [])
    counts = header.get("COUNT", ["1"] * len(fields))
    if not fields or not (len(fields) == len(sizes) == len(types) == len(counts)):
        raise PointCloudError(f"{path}: the PCD header's FIELDS, SIZE, TYPE and COUNT do not list the same fields")
    missing = [axis for axis in "xyz" if axis not in fields]
    if missing:
        raise PointCloudError(f"{path}: the PCD header has no {', '.join(missing)} field (FIELDS {' '.join(fields)})")
    try:
        counts_n = [int(c) for c in counts]
        kinds = [_PCD_TYPES[(t.upper(), int(s))] for t, s in zip(types, sizes, strict=True)]
        n = int(header["POINTS"][0]) if "POINTS" in header else int(header["WIDTH"][0]) * int(header["HEIGHT"][0])
    except (KeyError, ValueError, IndexError):
        raise PointCloudError(f"{path}: the PCD header has an unreadable SIZE, TYPE, COUNT or POINTS line") from None
    where = [fields.index(axis) for axis in "xyz"]
    mode = header["DATA"][0].lower() if header["DATA"] else ""
    if mode == "ascii":
        text = [line for line in _decode(path, body).splitlines() if line.strip()]
        if len(text) < n:
            raise PointCloudError(f"{path}: truncated PCD: the header promises {n} points, the data has {len(text)}")
        return _text_rows(path, text[:n], tuple(sum(counts_n[:i]) for i in where))
    if mode == "binary":
        record = np.dtype(
            [(f"f{i}", "<" + kind, (c,)) for i, (kind, c) in enumerate(zip(kinds, counts_n, strict=True))]
        )
        rows = _binary_slice(path, body, record, n)
        return np.stack([rows[f"f{i}"][:, 0].astype(np.float64) for i in where], axis=1)
    if mode == "binary_compressed":
        if n == 0:
            return np.zeros((0, 3))
        compressed, size = (int(v) for v in _binary_slice(path, body, np.dtype("<u4"), 2))
        widths = [np.dtype(kind).itemsize * c * n for kind, c in zip(kinds, counts_n, strict=True)]
        if size != sum(widths):
            raise PointCloudError(f"{path}: corrupt PCD: {n} points need {sum(widths)} bytes, the header says {size}")
        stream = _binary_slice(path, body, np.dtype("u1"), compressed, 8).tobytes()
        try:
            raw = _lzf_decompress(stream, size)
        except ValueError as e:
            raise PointCloudError(f"{path}: corrupt binary_compressed PCD data ({e})") from None
        starts = np.cumsum([0, *widths])
        column = [
            np.frombuffer(raw, "<" + kinds[i], counts_n[i] * n, int(starts[i])).reshape(n, -1)[:, 0] for i in where
        ]
        return np.stack(column, axis=1).astype(np.float64)
    raise PointCloudError(f"{path}: unsupported PCD DATA {mode!r} (expected ascii, binary or binary_compressed)")


def _lzf_decompress(data: bytes, size: int) -> bytes:
    """LZF (liblzf, as PCL writes it): a control byte below 32 starts a literal run of ctrl + 1 bytes; otherwise
    ctrl's top 3 bits are the copy length - 2 (7: one more length byte follows) and its low 5 bits with the next
    byte are the distance - 1 back into the output. Raises ValueError on a stream that does not give `size` bytes."""
    out = bytearray()
    i, end = 0, len(data)
    while i < end:
        ctrl = data[i]
        i += 1
        if ctrl < 32:
            if i + ctrl + 1 > end:
                raise ValueError("a literal run goes past the end of the stream")
            out += data[i : i + ctrl + 1]
            i += ctrl + 1
        else:
            length = ctrl >> 5
            if length == 7:
                length += data[i] if i < end else 0
                i += 1
            if i >= end:
                raise ValueError("a back-reference is cut off by the end of the stream")
            distance = ((ctrl & 0x1F) << 8) + data[i] + 1
            i += 1
            length += 2
            if distance > len(out):
                raise ValueError("a back-reference points before the start of the output")
            pattern = out[len(out) - distance : len(out) - distance + length]  # overlapping copies repeat it
            out += (pattern * (length // len(pattern) + 1))[:length]
        if len(out) > size:
            raise ValueError(f"the stream expands past the {size} bytes it declares")
    if len(out) != size:
        raise ValueError(f"the stream gives {len(out)} bytes, not the {size} it declares")
    return bytes(out)


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PointCloudError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_text(path: str) -> np.ndarray:
    """.xyz/.pts: numeric lines split by whitespace or commas; blank and # lines skipped; a .pts count line skipped."""
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    lines = [line.replace(",", " ") for line in text.splitlines()]
    lines = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if path.lower().endswith(".pts") and lines and len(lines[0].split()) == 1 and lines[0].strip().isdigit():
        lines = lines[1:]
    if not lines:
        return np.zeros((0, 3))
    return _text_rows(path, lines, (0, 1, 2))


def _read_obj(path: str) -> np.ndarray:
    """Every `v x y z [w]` line of a Wavefront .obj; normals, texture coordinates and faces are ignored."""
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    rows = [line.split()[1:4] for line in text.splitlines() if line.startswith(("v ", "v\t"))]
    short = next((row for row in rows if len(row) < 3), None)
    if short is not None:
        raise PointCloudError(f"{path}: a vertex line has fewer than 3 coordinates ({' '.join(short)!r})")
    try:
        return np.array(rows, dtype=np.float64).reshape(-1, 3)
    except ValueError as e:
        raise PointCloudError(f"{path}: a vertex coordinate is not a number ({e})") from None


_READERS = {
    ".npy": _read_npy,
    ".pt": _read_pt,
    ".ply": _read_ply,
    ".pcd": _read_pcd,
    ".xyz": _read_text,
    ".pts": _read_text,
    ".obj": _read_obj,
}
