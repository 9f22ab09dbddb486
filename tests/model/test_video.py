"""Video preprocessing: clip windows, the first/last frame rule, short-side scale, the three crops, decoding."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.imagebind.image import CLIP_MEAN, CLIP_STD, TooManyPixels
from model.imagebind.video import (
    clip_frame_indices,
    clip_windows,
    image_to_video,
    preprocess_frames,
    preprocess_video,
    preprocess_videos,
    probe_video,
    read_frames,
)

MEAN = torch.tensor(CLIP_MEAN)[:, None, None, None]
STD = torch.tensor(CLIP_STD)[:, None, None, None]


def moving_square_frames(count: int, width: int = 320, height: int = 240) -> np.ndarray:
    """(count, H, W, 3) uint8: a white square moving right over a dark gradient, a different place every frame."""
    frames = np.zeros((count, height, width, 3), dtype=np.uint8)
    frames[..., 2] = np.linspace(20, 120, width, dtype=np.uint8)
    for i in range(count):
        x = 8 + i * (width - 48) // max(count - 1, 1)
        frames[i, height // 2 - 20 : height // 2 + 20, x : x + 40] = 255
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int = 10, fmt: str | None = None) -> Path:
    """Encodes RGB frames as MPEG-4 Part 2 at a constant rate."""
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for rgb in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return path


def decode_all(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "3s": write_video(root / "3s.mp4", moving_square_frames(30)),
        "3s_mkv": write_video(root / "3s.mkv", moving_square_frames(30), fmt="matroska"),
        "1s": write_video(root / "1s.mp4", moving_square_frames(10)),
        "1frame": write_video(root / "1frame.mp4", moving_square_frames(1)),
    }


def test_clip_windows_for_known_durations() -> None:
    quarter = Fraction(1, 4)
    assert clip_windows(3.0) == [(quarter * i, quarter * i + 2) for i in range(5)]
    assert clip_windows(1.0) == [(Fraction(0), Fraction(2))] * 5
    # Fraction of the float: 5.3 - 2 = 3.3 is not exact in binary, so starts are not the decimal 0.825 * i.
    assert clip_windows(5.3)[1][0] == Fraction(5.3 - 2) / 4 != Fraction(33, 40)


def test_clip_frame_indices() -> None:
    # 3 s at 10 fps: windows start at 0, 0.25, 0.5, 0.75, 1; frames ceil(10 s) <= i < ceil(10 (s + 2)).
    assert clip_frame_indices(30, 10.0) == [[0, 19], [3, 22], [5, 24], [8, 27], [10, 29]]
    assert clip_frame_indices(10, 10.0) == [[0, 9]] * 5  # 1 s: every window is the whole video
    assert clip_frame_indices(1, 10.0) == [[0, 0]] * 5
    # 5.3 s at 30 fps: start 0.825 s -> ceil(24.75) = 25, end 2.825 s -> ceil(84.75) = 85 -> frames 25..84.
    assert clip_frame_indices(159, 30.0)[1] == [25, 84]
    assert clip_frame_indices(159, 30.0)[4] == [99, 158]
    with pytest.raises(ValueError, match="frame"):
        clip_frame_indices(0, 10.0)


def test_first_and_last_frame_of_each_window() -> None:
    levels = np.arange(30, dtype=np.uint8) * 8  # frame i is a flat grey of 8 * i
    frames = np.broadcast_to(levels[:, None, None, None], (30, 240, 320, 3))
    out = preprocess_frames(frames, fps=10)
    assert out.shape == (15, 3, 2, 224, 224)
    for clip, (first, last) in enumerate(clip_frame_indices(30, 10.0)):
        for t, index in enumerate((first, last)):
            expected = (torch.tensor(8.0 * index) / 255.0 - MEAN[:, 0]) / STD[:, 0]  # (3, 1, 1)
            for crop in range(3):
                assert torch.allclose(out[3 * clip + crop, :, t], expected.expand(3, 224, 224), atol=1e-6)


def direct(frames: np.ndarray, plan: list[list[int]], size: tuple[int, int], offsets: list[tuple[int, int]]):
    """The reference chain written out: float /255, bilinear resize to `size`, normalise, crop at `offsets`."""
    out = []
    for clip in plan:
        x = torch.from_numpy(frames[clip]).permute(3, 0, 1, 2).float() / 255.0  # (3, 2, H, W)
        x = (F.interpolate(x, size=size, mode="bilinear", align_corners=False) - MEAN) / STD
        out += [x[:, :, top : top + 224, left : left + 224] for top, left in offsets]
    return torch.stack(out)


def test_landscape_video_matches_a_direct_computation(videos: dict[str, Path]) -> None:
    frames = decode_all(videos["3s"])
    assert frames.shape == (30, 240, 320, 3)
    # Short side 240 -> 224, long side floor(320 / 240 * 224) = floor(298.67) = 298; crops at x = 0, ceil(37), 74.
    expected = direct(frames, clip_frame_indices(30, 10.0), (224, 298), [(0, 0), (0, 37), (0, 74)])
    out = preprocess_video(videos["3s"])
    assert out.shape == (15, 3, 2, 224, 224) and out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert torch.equal(out, preprocess_video(videos["3s"].read_bytes()))
    assert torch.equal(out, preprocess_video(str(videos["3s"])))  # deterministic


def test_portrait_crops_are_top_centre_bottom() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (25, 300, 230, 3), dtype=np.uint8)
    # Short side 230 -> 224, long side floor(300 / 230 * 224) = floor(292.17) = 292; crops at y = 0, 34, 68.
    plan = clip_frame_indices(25, 10.0)
    expected = direct(frames, plan, (292, 224), [(0, 0), (34, 0), (68, 0)])
    assert torch.equal(preprocess_frames(frames, fps=10), expected)


def test_short_videos_repeat_one_clip(videos: dict[str, Path]) -> None:
    out = preprocess_video(videos["1s"])
    assert out.shape == (15, 3, 2, 224, 224)
    for clip in range(1, 5):
        assert torch.equal(out[3 * clip : 3 * clip + 3], out[:3])
    frames = decode_all(videos["1s"])
    assert torch.equal(out[:3], direct(frames, [[0, 9]], (224, 298), [(0, 0), (0, 37), (0, 74)]))


def test_single_frame_video(videos: dict[str, Path]) -> None:
    assert probe_video(videos["1frame"]) == (1, 10.0)
    out = preprocess_video(videos["1frame"])
    assert out.shape == (15, 3, 2, 224, 224)
    assert torch.equal(out[:, :, 0], out[:, :, 1])


def test_container_without_frame_count(videos: dict[str, Path]) -> None:
    with av.open(str(videos["3s_mkv"])) as container:
        assert container.streams.video[0].frames == 0  # Matroska stores no count: packets are counted instead
    assert probe_video(videos["3s_mkv"]) == (30, 10.0)
    assert torch.equal(preprocess_video(videos["3s_mkv"]), preprocess_video(videos["3s"]))


def test_read_frames_past_the_end_gives_the_last_frame(videos: dict[str, Path]) -> None:
    frames = decode_all(videos["3s"])
    kept = read_frames(videos["3s"], [0, 29, 40])
    assert sorted(kept) == [0, 29, 40]
    assert np.array_equal(kept[0], frames[0]) and np.array_equal(kept[29], frames[29])
    assert np.array_equal(kept[40], frames[29])
    assert read_frames(videos["3s"], []) == {}


def test_batch_and_errors(videos: dict[str, Path], tmp_path: Path) -> None:
    batch = preprocess_videos([videos["1s"], videos["1frame"].read_bytes()])
    assert batch.shape == (2, 15, 3, 2, 224, 224)
    assert torch.equal(batch[0], preprocess_video(videos["1s"]))
    (tmp_path / "noise.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"noise\.mp4"):
        preprocess_video(tmp_path / "noise.mp4")
    with pytest.raises(FileNotFoundError):
        preprocess_video(tmp_path / "absent.mp4")


def test_frames_above_the_pixel_limit_are_refused_before_decoding(
    videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("frames were decoded")

    monkeypatch.setattr(av.container.InputContainer, "decode", no_decoding)
    with pytest.raises(TooManyPixels, match=r"video .*1s\.mp4 is 320x240 \(76,800 pixels\), above"):
        preprocess_videos([videos["1s"]], max_pixels=320 * 240 - 1)
    with pytest.raises(TooManyPixels, match=r"<\d+ bytes>"):
        preprocess_video(videos["1s"].read_bytes(), max_pixels=1000)
    monkeypatch.undo()
    assert preprocess_video(videos["1s"], max_pixels=320 * 240).shape == (15, 3, 2, 224, 224)


def test_image_to_video() -> None:
    image = torch.randn(3, 224, 224)
    clip = image_to_video(image)
    assert clip.shape == (1, 3, 2, 224, 224)
    assert torch.equal(clip[0, :, 0], image) and torch.equal(clip[0, :, 1], image)
    batch = image_to_video(torch.stack([image, -image]))
    assert batch.shape == (2, 1, 3, 2, 224, 224) and torch.equal(batch[1, 0, :, 1], -image)
