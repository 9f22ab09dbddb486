"""Point-cloud files: every format round trips exact float32 xyz, bad files are refused by name, normalise, resample."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import ModelInputError
from model.imagebind.point_files import (
    DEFAULT_POINTS,
    FORMATS,
    PointCloudError,
    load_point_cloud,
    normalize_cloud,
    read_points,
    resample_cloud,
)

N = 37


def cloud(n: int = N, seed: int = 0) -> np.ndarray:
    """Seeded float32 points (N, 3); any swapped axis or dropped digit shows."""
    return (np.random.default_rng(seed).standard_normal((n, 3)) * 10).astype(np.float32)


def extras(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Normals (float32) and colours (uint8) to put beside the xyz."""
    rng = np.random.default_rng(1)
    return rng.standard_normal((n, 3)).astype(np.float32), rng.integers(0, 256, (n, 3), dtype=np.uint8)


def text(values: np.ndarray, sep: str = " ") -> str:
    """A row of numbers, floats written with enough digits to come back exactly."""
    return sep.join(repr(float(v)) if isinstance(v, float | np.floating) else str(int(v)) for v in values)


def refused(path: Path, *reason: str) -> str:
    """read_points' PointCloudError for `path`, checked to name the file and every part of `reason`."""
    with pytest.raises(PointCloudError) as caught:
        read_points(str(path))
    message = str(caught.value)
    assert str(path) in message
    for part in reason:
        assert part in message
    return message


# --- formats -------------------------------------------------------------------------------------------------


def test_npy_xyz_and_xyz_normals(tmp_path: Path) -> None:
    xyz, normals = cloud(), extras()[0]
    np.save(tmp_path / "a.npy", xyz)
    np.save(tmp_path / "b.npy", np.concatenate([xyz, normals], axis=1))
    for name in ("a.npy", "b.npy"):
        got = read_points(str(tmp_path / name))
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, xyz)


def test_float64_comes_back_float32(tmp_path: Path) -> None:
    xyz = np.random.default_rng(2).standard_normal((N, 3))
    np.save(tmp_path / "c.npy", xyz)
    got = read_points(tmp_path / "c.npy")  # a Path works as well as a str
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, xyz.astype(np.float32))


def test_pt_tensor(tmp_path: Path) -> None:
    xyz, normals = cloud(), extras()[0]
    torch.save(torch.from_numpy(xyz), tmp_path / "a.pt")
    torch.save(torch.from_numpy(np.concatenate([xyz, normals], axis=1)).double(), tmp_path / "b.pt")
    np.testing.assert_array_equal(read_points(str(tmp_path / "a.pt")), xyz)
    got = read_points(str(tmp_path / "b.pt"))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, xyz)


def ply_header(fmt: str, vertex_props: list[str], before: str = "", after: str = "") -> bytes:
    props = "".join(f"property {p}\n" for p in vertex_props)
    return (
        f"ply\nformat {fmt} 1.0\ncomment made by a test\nobj_info none\n{before}"
        f"element vertex {N}\n{props}{after}end_header\n"
    ).encode()


def test_ply_ascii(tmp_path: Path) -> None:
    xyz, (normals, rgb) = cloud(), extras()
    props = [f"float {a}" for a in ("nx", "ny", "nz", "x", "y", "z")] + [f"uchar {c}" for c in ("red", "green", "blue")]
    before = "element camera 2\nproperty list uchar int ids\nproperty float focal\n"  # lines to skip
    after = "element face 1\nproperty list uchar int vertex_indices\n"
    rows = [f"{text(n)} {text(p)} {text(c)}" for n, p, c in zip(normals, xyz, rgb, strict=True)]
    body = "2 0 1 0.5\n1 7 1.5\n" + "\n".join(rows) + "\n3 0 1 2\n"
    (tmp_path / "a.ply").write_bytes(ply_header("ascii", props, before, after) + body.encode())
    np.testing.assert_array_equal(read_points(str(tmp_path / "a.ply")), xyz)


@pytest.mark.parametrize("fmt, order", [("binary_little_endian", "<"), ("binary_big_endian", ">")])
def test_ply_binary(tmp_path: Path, fmt: str, order: str) -> None:
    xyz, (normals, rgb) = cloud(), extras()
    record = np.dtype(
        [(n, order + k) for n, k in [("x", "f4"), ("y", "f4"), ("z", "f4"), ("nx", "f4"), ("ny", "f4"), ("nz", "f4")]]
        + [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    )
    rows = np.zeros(N, record)
    for i, name in enumerate("xyz"):
        rows[name], rows["n" + name] = xyz[:, i], normals[:, i]
    for i, name in enumerate(("red", "green", "blue")):
        rows[name] = rgb[:, i]
    props = [f"float {n}" for n in ("x", "y", "z", "nx", "ny", "nz")] + ["uchar red", "uchar green", "uchar blue"]
    before = "element meta 2\nproperty int a\nproperty double b\n"  # 2 x 12 bytes skipped
    after = "element face 1\nproperty list uchar int vertex_indices\n"
    meta = np.zeros(2, [("a", order + "i4"), ("b", order + "f8")]).tobytes()
    face = b"\x03" + np.array([0, 1, 2], order + "i4").tobytes()
    (tmp_path / "a.ply").write_bytes(ply_header(fmt, props, before, after) + meta + rows.tobytes() + face)
    np.testing.assert_array_equal(read_points(str(tmp_path / "a.ply")), xyz)


PLY_TYPES = {
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


@pytest.mark.parametrize("kind, code", PLY_TYPES.items())
def test_ply_every_scalar_type(tmp_path: Path, kind: str, code: str) -> None:
    xyz = np.random.default_rng(3).integers(0, 100, (N, 3)).astype(">" + code)
    (tmp_path / "a.ply").write_bytes(ply_header("binary_big_endian", [f"{kind} {a}" for a in "xyz"]) + xyz.tobytes())
    got = read_points(str(tmp_path / "a.ply"))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, xyz.astype(np.float32))


# A COUNT 2 field before x: the x column is not the first.
PCD_FIELDS = [("pair", "F", 4, 2), ("x", "F", 4, 1), ("y", "F", 4, 1), ("z", "F", 4, 1)]
PCD_FIELDS += [("normal_x", "F", 4, 1), ("normal_y", "F", 4, 1), ("normal_z", "F", 4, 1), ("rgb", "U", 4, 1)]


def pcd_header(data: str, fields: list[tuple[str, str, int, int]] = PCD_FIELDS, n: int = N) -> bytes:
    return (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
        f"FIELDS {' '.join(f[0] for f in fields)}\nSIZE {' '.join(str(f[2]) for f in fields)}\n"
        f"TYPE {' '.join(f[1] for f in fields)}\nCOUNT {' '.join(str(f[3]) for f in fields)}\n"
        f"WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {data}\n"
    ).encode()


def pcd_columns(xyz: np.ndarray) -> list[np.ndarray]:
    """Each PCD_FIELDS field's values, (N, COUNT)."""
    normals, rgb = extras(len(xyz))
    packed = (rgb.astype(np.uint32) * np.array([1 << 16, 1 << 8, 1], np.uint32)).sum(axis=1, dtype=np.uint32)
    pair = np.full((len(xyz), 2), 0.25, np.float32)
    return [pair, xyz[:, :1], xyz[:, 1:2], xyz[:, 2:], normals[:, :1], normals[:, 1:2], normals[:, 2:], packed[:, None]]


def pcd_records(xyz: np.ndarray) -> np.ndarray:
    record = np.dtype([(name, "<" + kind.lower() + str(size), (count,)) for name, kind, size, count in PCD_FIELDS])
    rows = np.zeros(len(xyz), record)
    for (name, *_), values in zip(PCD_FIELDS, pcd_columns(xyz), strict=True):
        rows[name] = values
    return rows


def lzf_literals(raw: bytes) -> bytes:
    """The simplest valid LZF stream: literal runs of at most 32 bytes, no back-references."""
    return b"".join(bytes([len(raw[i : i + 32]) - 1]) + raw[i : i + 32] for i in range(0, len(raw), 32))


def lzf_copy(distance: int, length: int) -> bytes:
    """One LZF back-reference: copy `length` (3..264) bytes from `distance` (1..8192) bytes back."""
    d, n = distance - 1, length - 2
    return bytes([(n << 5) | (d >> 8), d & 0xFF]) if n < 7 else bytes([(7 << 5) | (d >> 8), n - 7, d & 0xFF])


def compressed_pcd(stream: bytes, size: int, fields: list[tuple[str, str, int, int]], n: int) -> bytes:
    return pcd_header("binary_compressed", fields, n) + struct.pack("<II", len(stream), size) + stream


def test_pcd_ascii(tmp_path: Path) -> None:
    xyz = cloud()
    rows = np.concatenate([c.astype(object) for c in pcd_columns(xyz)], axis=1)
    body = "\n".join(text(row) for row in rows) + "\n"
    (tmp_path / "a.pcd").write_bytes(pcd_header("ascii") + body.encode())
    np.testing.assert_array_equal(read_points(str(tmp_path / "a.pcd")), xyz)


def test_pcd_binary(tmp_path: Path) -> None:
    xyz = cloud()
    (tmp_path / "a.pcd").write_bytes(pcd_header("binary") + pcd_records(xyz).tobytes())
    np.testing.assert_array_equal(read_points(str(tmp_path / "a.pcd")), xyz)


def test_pcd_binary_compressed(tmp_path: Path) -> None:
    xyz = cloud(DEFAULT_POINTS)
    raw = b"".join(np.ascontiguousarray(c).astype(c.dtype.newbyteorder("<")).tobytes() for c in pcd_columns(xyz))
    (tmp_path / "a.pcd").write_bytes(compressed_pcd(lzf_literals(raw), len(raw), PCD_FIELDS, DEFAULT_POINTS))
    np.testing.assert_array_equal(read_points(str(tmp_path / "a.pcd")), xyz)


def test_pcd_binary_compressed_back_references(tmp_path: Path) -> None:
    """y copies x from 400 bytes back (a far, non-overlapping copy, in two 264 + 136 pieces); z is one value repeated
    by overlapping copies from 4 bytes back (8 + 264 + 124)."""
    n = 100
    x = cloud(n)[:, 0]
    fields = [("x", "F", 4, 1), ("y", "F", 4, 1), ("z", "F", 4, 1)]
    stream = (
        lzf_literals(x.tobytes())
        + lzf_copy(400, 264)
        + lzf_copy(400, 136)
        + lzf_literals(np.float32(2.5).tobytes())
        + lzf_copy(4, 8)  # a short copy: the length fits in the control byte
        + lzf_copy(4, 264)
        + lzf_copy(4, 124)
    )
    (tmp_path / "a.pcd").write_bytes(compressed_pcd(stream, 12 * n, fields, n))
    np.testing.assert_array_equal(read_points(str(tmp_path / "a.pcd")), np.stack([x, x, np.full(n, 2.5)], axis=1))
    (tmp_path / "b.pcd").write_bytes(compressed_pcd(lzf_copy(4, 8) + b"\x00" * 1192, 12 * n, fields, n))
    refused(tmp_path / "b.pcd", "corrupt binary_compressed", "before the start")


def test_xyz_text(tmp_path: Path) -> None:
    xyz, (_, rgb) = cloud(), extras()
    rows = [
        text(p, ", " if i % 2 else ",") if i % 3 else f"{text(p)} {text(c)}"
        for i, (p, c) in enumerate(zip(xyz, rgb, strict=True))
    ]
    body = "# x y z r g b\n\n" + "\n".join(rows[:5]) + "\n   \n# more\n" + "\n".join(rows[5:])
    (tmp_path / "a.xyz").write_text(body)
    np.testing.assert_array_equal(read_points(str(tmp_path / "a.xyz")), xyz)


def test_pts_with_count_line(tmp_path: Path) -> None:
    xyz, (_, rgb) = cloud(), extras()
    rows = [f"{text(p)} -1204 {text(c)}" for p, c in zip(xyz, rgb, strict=True)]  # Semantic3D: x y z i r g b
    (tmp_path / "a.pts").write_text(f"{N}\n" + "\n".join(rows) + "\n")
    np.testing.assert_array_equal(read_points(str(tmp_path / "a.pts")), xyz)


def test_obj_vertices_only(tmp_path: Path) -> None:
    xyz = cloud()
    lines = ["# a mesh", "mtllib none.mtl", "o thing"]
    for i, p in enumerate(xyz):
        lines.append(f"v {text(p)}" + (" 1.0" if i % 3 == 0 else ""))  # an optional w
        lines += [f"vn {text(p)}", "vt 0.5 0.5"]
    lines += ["f 1/1/1 2/2/2 3/3/3", "vp 0.1 0.2"]
    (tmp_path / "a.obj").write_text("\n".join(lines) + "\n")
    np.testing.assert_array_equal(read_points(str(tmp_path / "a.obj")), xyz)


def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    xyz = cloud()
    (tmp_path / "A.XYZ").write_text("\n".join(text(p) for p in xyz))
    np.testing.assert_array_equal(read_points(str(tmp_path / "A.XYZ")), xyz)


# --- refusals ------------------------------------------------------------------------------------------------


def test_unknown_suffix_lists_the_accepted_ones(tmp_path: Path) -> None:
    for name in ("a.stl", "a.npy.txt", "npy"):
        path = tmp_path / name
        path.write_bytes(b"")
        message = refused(path, "unknown point-cloud suffix")
        assert all(suffix in message for suffix in FORMATS)
    assert issubclass(PointCloudError, ModelInputError)


def test_missing_file(tmp_path: Path) -> None:
    refused(tmp_path / "nowhere.ply", "no such point-cloud file")


def test_empty_cloud(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((0, 3), np.float32))
    refused(tmp_path / "a.npy", "no points")
    (tmp_path / "b.xyz").write_text("# nothing here\n\n")
    refused(tmp_path / "b.xyz", "no points")


def test_non_finite_rows_are_counted(tmp_path: Path) -> None:
    xyz = cloud()
    xyz[3, 0] = np.nan
    xyz[5] = np.inf
    xyz[7, 1:] = np.nan  # one row, two values
    np.save(tmp_path / "a.npy", xyz)
    refused(tmp_path / "a.npy", f"3 of {N} points hold NaN or inf")


@pytest.mark.parametrize("shape", [(N, 2), (N,), (N, 4), (1, N, 3)])
def test_wrong_npy_shapes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    np.save(tmp_path / "a.npy", np.zeros(shape, np.float32))
    refused(tmp_path / "a.npy", "expected an (N, 3) or (N, 6) array", f"found shape {shape}")


def test_pt_holding_a_dict(tmp_path: Path) -> None:
    torch.save({"points": torch.zeros(N, 3)}, tmp_path / "a.pt")
    refused(tmp_path / "a.pt", "expected a tensor, found dict")
    torch.save(torch.zeros(N, 2), tmp_path / "b.pt")
    refused(tmp_path / "b.pt", "found shape (37, 2)")


def test_truncated_binary_ply(tmp_path: Path) -> None:
    xyz = cloud()
    header = ply_header("binary_little_endian", ["float x", "float y", "float z"])
    (tmp_path / "a.ply").write_bytes(header + xyz.tobytes()[:-5])
    refused(tmp_path / "a.ply", "truncated", f"promises {12 * N} bytes", f"holds {12 * N - 5}")


def test_binary_ply_list_element_before_vertex(tmp_path: Path) -> None:
    before = "element group 1\nproperty list uchar int ids\n"
    (tmp_path / "a.ply").write_bytes(
        ply_header("binary_little_endian", ["float x", "float y", "float z"], before) + b"\x00" * 500
    )
    refused(tmp_path / "a.ply", "list-property element 'group' before the vertex element")


def test_pcd_missing_z(tmp_path: Path) -> None:
    fields = [("x", "F", 4, 1), ("y", "F", 4, 1), ("intensity", "F", 4, 1)]
    (tmp_path / "a.pcd").write_bytes(pcd_header("binary", fields) + cloud().tobytes())
    refused(tmp_path / "a.pcd", "no z field")


def test_truncated_text_formats(tmp_path: Path) -> None:
    header = pcd_header("ascii", [("x", "F", 4, 1), ("y", "F", 4, 1), ("z", "F", 4, 1)], N + 3)
    (tmp_path / "a.pcd").write_bytes(header + "\n".join(text(p) for p in cloud()).encode())
    refused(tmp_path / "a.pcd", "truncated", f"promises {N + 3} points")
    (tmp_path / "b.xyz").write_text("1 2 3\n4 5\n")
    refused(tmp_path / "b.xyz", "malformed numeric data")


# --- normalise, resample, load -------------------------------------------------------------------------------


def test_normalize_cloud() -> None:
    points = torch.from_numpy(cloud()) + torch.tensor([100.0, -50.0, 3.0])
    out = normalize_cloud(points)
    assert out.dtype == torch.float32 and out.shape == points.shape
    assert out.mean(dim=0).abs().max() < 1e-6
    assert abs(out.norm(dim=1).max().item() - 1) < 1e-6
    batch = normalize_cloud(torch.stack([points, points * 2]))
    torch.testing.assert_close(batch[0], out)
    torch.testing.assert_close(batch[1], out)


def test_normalize_constant_cloud_is_zeros() -> None:
    points = torch.full((DEFAULT_POINTS, 3), 0.1)  # its float32 mean is not exactly 0.1
    out = normalize_cloud(points)
    assert torch.equal(out, torch.zeros_like(points))
    assert torch.equal(normalize_cloud(torch.tensor([[1.0, 2.0, 3.0]])), torch.zeros(1, 3))


def test_resample_down_is_an_ordered_subset() -> None:
    points = torch.arange(300, dtype=torch.float32)[:, None].repeat(1, 3)  # row i is (i, i, i)
    out = resample_cloud(points, 100, seed=5)
    assert out.shape == (100, 3)
    rows = out[:, 0].long()
    assert torch.equal(out, points[rows])
    assert torch.all(rows[1:] > rows[:-1])  # distinct and in the original order
    assert torch.equal(out, resample_cloud(points, 100, seed=5))
    assert not torch.equal(out, resample_cloud(points, 100, seed=6))


def test_resample_up_keeps_every_point_then_repeats() -> None:
    points = torch.from_numpy(cloud(10))
    out = resample_cloud(points, 25, seed=1)
    assert out.shape == (25, 3)
    assert torch.equal(out[:10], points)
    assert all(any(torch.equal(row, p) for p in points) for row in out[10:])
    assert torch.equal(out, resample_cloud(points, 25, seed=1))
    assert not torch.equal(out, resample_cloud(points, 25, seed=2))


def test_resample_equal_and_global_rng_untouched() -> None:
    points = torch.from_numpy(cloud())
    state = torch.get_rng_state()
    assert resample_cloud(points, N) is points
    resample_cloud(points, 5)
    resample_cloud(points, 50)
    assert torch.equal(torch.get_rng_state(), state)


def test_load_point_cloud(tmp_path: Path) -> None:
    xyz = cloud()
    np.save(tmp_path / "a.npy", xyz)
    plain = load_point_cloud(str(tmp_path / "a.npy"))
    assert plain.dtype == torch.float32
    assert torch.equal(plain, torch.from_numpy(xyz))
    ready = load_point_cloud(str(tmp_path / "a.npy"), normalize=True, points=64, seed=3)
    assert torch.equal(ready, resample_cloud(normalize_cloud(plain), 64, seed=3))  # normalised, then resampled
