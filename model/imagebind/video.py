"""Video preprocessing for ImageBind: five 2 s clips, their first and last frames, three spatial crops each."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Sequence
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F

from model.imagebind.decode import TooManyPixels, check_pixels
from model.imagebind.image import CLIP_MEAN, CLIP_STD, IMAGE_SIZE

CLIP_DURATION = 2  # seconds per clip (ConstantClipsPerVideoSampler)
CLIPS_PER_VIDEO = 5
FRAMES_PER_CLIP = 2  # UniformTemporalSubsample(2): the first and the last frame of each clip's window
NUM_CROPS = 3  # SpatialCrop(224, 3): left/centre/right (landscape) or top/centre/bottom (portrait)

VideoSource = str | os.PathLike | bytes


def _describe(source: VideoSource) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray) else os.fspath(source)


def clip_windows(
    duration: float, clip_duration: int = CLIP_DURATION, clips_per_video: int = CLIPS_PER_VIDEO
) -> list[tuple[Fraction, Fraction]]:
    """pytorchvideo's `ConstantClipsPerVideoSampler`: evenly spaced [start, start + clip_duration) windows.

    Starts are `i * Fraction(max(duration - clip_duration, 0)) / (clips_per_video - 1)`, the Fraction taken of the
    float (its exact binary value). A video shorter than one clip gets `clips_per_video` copies of [0, clip_duration).
    """
    max_start = Fraction(max(duration - Fraction(clip_duration), 0))  # float - Fraction is a float
    step = Fraction(max_start, max(clips_per_video - 1, 1))
    return [(step * i, step * i + Fraction(clip_duration)) for i in range(clips_per_video)]


def clip_frame_indices(
    num_frames: int,
    fps: float,
    clip_duration: int = CLIP_DURATION,
    clips_per_video: int = CLIPS_PER_VIDEO,
    frames_per_clip: int = FRAMES_PER_CLIP,
) -> list[list[int]]:
    """The decoded-frame indices each clip keeps, as the reference's decord reader and temporal subsampler pick them.

    The duration is `num_frames / fps`; a window [start, end) holds frames `ceil(fps*start) <= i < ceil(fps*end)`
    (clamped to the video), and `linspace(0, T-1, frames_per_clip).long()` picks among its T frames.

    Returns:
        One list of `frames_per_clip` indices per clip (repeats allowed when a window holds a single frame).
    """
    if num_frames < 1 or fps <= 0:
        raise ValueError(f"a video needs at least one frame and a positive frame rate (got {num_frames}, {fps})")
    duration = float(num_frames) / float(fps)
    plan = []
    for start, end in clip_windows(duration, clip_duration, clips_per_video):
        first = math.ceil(fps * start)
        stop = min(math.ceil(fps * end), num_frames)
        if stop <= first:
            raise ValueError(f"no frame falls in the clip [{float(start):.3f}, {float(end):.3f}) s at {fps} fps")
        picks = torch.linspace(0, stop - first - 1, frames_per_clip).clamp(0, stop - first - 1).long()
        plan.append([first + int(p) for p in picks])
    return plan


def _open(source: VideoSource) -> av.container.InputContainer:
    return av.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else os.fspath(source))


def _video_stream(container: av.container.InputContainer, source: VideoSource) -> av.video.stream.VideoStream:
    """The first video stream, or a ValueError naming the file (an audio file or a still image has none)."""
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise ValueError(f"{_describe(source)} has no video stream (it has: {', '.join(kinds)})")
    return container.streams.video[0]


def _frame_rate(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise ValueError("the video stream has no frame rate")
    return float(rate)


def probe_video(source: VideoSource, max_pixels: int | None = None) -> tuple[int, float]:
    """(frame count, average frame rate) of the first video stream, as decord reports them.

    The count is the container's frame count (nb_frames) or, where the container has none (e.g. Matroska), the
    number of non-empty packets of the stream. Frames larger than `max_pixels` are refused (`TooManyPixels`) from
    the stream's header, before any frame is decoded.
    """
    with _open(source) as container:
        stream = _video_stream(container, source)
        check_pixels(f"video {_describe(source)}", stream.width, stream.height, max_pixels)
        fps = _frame_rate(stream)
        count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size > 0)
    return count, fps


def read_frames(source: VideoSource, indices: Iterable[int]) -> dict[int, np.ndarray]:
    """Decodes frames in presentation order and keeps the requested indices as (H, W, 3) uint8 RGB arrays.

    Decoding stops after the largest index. Indices past the last decodable frame get the last frame (a container
    whose frame count overstates what decodes).
    """
    wanted = set(indices)
    if not wanted:
        return {}
    kept: dict[int, np.ndarray] = {}
    last, stop = None, max(wanted)
    with _open(source) as container:
        stream = _video_stream(container, source)
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            last = frame
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
            if i >= stop:
                break
    if last is None:
        raise ValueError("no frame could be decoded")
    missing = wanted - kept.keys()
    if missing:
        tail = last.to_ndarray(format="rgb24")
        kept.update(dict.fromkeys(missing, tail))
    return kept


def short_side_scale(clip: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """pytorchvideo's `ShortSideScale`: bilinear (align_corners=False), long side `floor(long/short*size)`.

    Args:
        clip: (C, T, H, W) float32.

    Returns:
        (C, T, H', W') float32 with min(H', W') == size.
    """
    _, _, h, w = clip.shape
    new_h, new_w = (math.floor(h / w * size), size) if w < h else (size, math.floor(w / h * size))
    return F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)


def spatial_crops(clip: torch.Tensor, size: int = IMAGE_SIZE) -> list[torch.Tensor]:
    """ImageBind's `SpatialCrop(size, 3)`: crops 0/1/2 along the long side, centre offset `ceil((L - size) / 2)`.

    Args:
        clip: (C, T, H, W) with min(H, W) == size.

    Returns:
        Three (C, T, size, size) views: left, centre, right (top, centre, bottom when H > W).
    """
    _, _, h, w = clip.shape
    y, x = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    crops = []
    for idx in range(NUM_CROPS):
        top, left = y, x
        if h > w:
            top = {0: 0, 1: y, 2: h - size}[idx]
        else:
            left = {0: 0, 1: x, 2: w - size}[idx]
        crops.append(clip[:, :, top : top + size, left : left + size])
    return crops


def transform_clips(clips: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Scale, normalise and crop sampled clips, clip-major then crop.

    Args:
        clips: (S, T, H, W, 3) uint8 RGB frames, S clips of T frames.

    Returns:
        (S * 3, 3, T, 224, 224) float32.
    """
    clips = torch.as_tensor(clips)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None, None]
    out = []
    for frames in clips:
        x = frames.to(torch.float32).permute(3, 0, 1, 2) / 255.0  # (3, T, H, W)
        x = short_side_scale(x).sub_(mean).div_(std)
        out.extend(spatial_crops(x))
    return torch.stack(out).contiguous()  # (S*3, 3, T, 224, 224)


def preprocess_frames(frames: torch.Tensor | np.ndarray, fps: float) -> torch.Tensor:
    """ImageBind's video transform on already decoded frames.

    Args:
        frames: (N, H, W, 3) uint8 RGB, every frame of the video in presentation order.
        fps: the frame rate.

    Returns:
        (15, 3, 2, 224, 224) float32.
    """
    plan = np.asarray(clip_frame_indices(len(frames), fps))  # (5, 2)
    return transform_clips(torch.as_tensor(frames[plan]))  # indexing copies: a read-only array is fine


def preprocess_video(source: VideoSource, max_pixels: int | None = None) -> torch.Tensor:
    """Decodes a video (path or bytes) with PyAV and applies ImageBind's video transform.

    Only the 10 frames the clips use are converted to RGB; decoding stops after the last of them. Frames of more
    than `max_pixels` pixels are refused before any is decoded.

    Returns:
        (15, 3, 2, 224, 224) float32: 5 clips x 3 crops, each 2 frames.

    Raises:
        FileNotFoundError: the path does not exist.
        TooManyPixels: the frames are larger than `max_pixels`.
        ValueError: no video stream or nothing decodable; the message names the file (or the byte count).
    """
    try:
        num_frames, fps = probe_video(source, max_pixels)
        plan = clip_frame_indices(num_frames, fps)
        frames = read_frames(source, [i for clip in plan for i in clip])
    except (FileNotFoundError, TooManyPixels):
        raise
    except (av.FFmpegError, ValueError) as err:  # ValueError: e.g. no video stream
        raise ValueError(f"cannot decode video {_describe(source)}: {err}") from err
    clips = np.stack([np.stack([frames[i] for i in clip]) for clip in plan])  # (5, 2, H, W, 3)
    return transform_clips(clips)


def preprocess_videos(items: Sequence[VideoSource], max_pixels: int | None = None) -> torch.Tensor:
    """`preprocess_video` over a batch; returns (B, 15, 3, 2, 224, 224), the 6-D form ImageBind reads as clips."""
    if not items:
        return torch.empty(0, CLIPS_PER_VIDEO * NUM_CROPS, 3, FRAMES_PER_CLIP, IMAGE_SIZE, IMAGE_SIZE)
    return torch.stack([preprocess_video(it, max_pixels) for it in items])


def image_to_video(images: torch.Tensor, frames: int = FRAMES_PER_CLIP) -> torch.Tensor:
    """An image as a one-clip video by repeating it in time (what ImageBind's PadIm2Video does inside the model).

    Args:
        images: (3, H, W) or (B, 3, H, W).

    Returns:
        (1, 3, frames, H, W) or (B, 1, 3, frames, H, W).
    """
    clip = images.unsqueeze(-3).expand(*images.shape[:-2], frames, *images.shape[-2:])  # (..., 3, T, H, W)
    return clip.unsqueeze(-5).contiguous()
