"""ImageBind audio preprocessing: decode, resample to 16 kHz, three 2 s clips, Kaldi log-mel, pad to 204, normalise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
import soundfile
import torch
import torch.nn.functional as F

from model.errors import ModelInputError

SAMPLE_RATE = 16000  # Hz; every file is resampled to this rate before clipping
CLIP_SECONDS = 2  # ConstantClipsPerVideoSampler(clip_duration=2, ...)
CLIPS = 3  # clips per file, evenly spread from the start to the end
MEL_BINS = 128
TARGET_FRAMES = 204  # log-mel columns per clip; a 2 s clip has 198 frames, zero-padded on the right
AUDIO_MEAN = -4.268  # normalisation applied after padding: (x - mean) / std
AUDIO_STD = 9.138

FRAME_LENGTH_MS = 25.0  # Kaldi frame: 400 samples at 16 kHz, zero-padded to a 512-point FFT
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0  # Hz, lower edge of the first mel triangle; the upper edge of the last one is the Nyquist rate
LOG_FLOOR = torch.finfo(torch.float32).eps  # log(max(energy, eps)), Kaldi's floor

RESAMPLE_ZERO_CROSSINGS = 6  # torchaudio.functional.resample defaults: lowpass_filter_width=6, rolloff=0.99, Hann
RESAMPLE_ROLLOFF = 0.99

SOUNDFILE_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga"})  # everything else is decoded with PyAV (FFmpeg)


class AudioDecodeError(ModelInputError):
    """A file that cannot be decoded or is too short to preprocess; the message names the file."""


class NoAudioStream(ValueError):
    """A media file FFmpeg opens that holds no audio stream (a silent video, a still image)."""


def load_audio(path: str) -> tuple[torch.Tensor, int]:
    """Decode an audio file into float samples, as `torchaudio.load` does.

    WAV, FLAC and OGG are read with soundfile (libsndfile), anything else (mp3, m4a, the audio track of an mp4, ...)
    with PyAV; a WAV/FLAC/OGG that libsndfile refuses is tried with PyAV too.

    Args:
        path: A local file.

    Returns:
        The waveform `(channels, samples)` float32, nominally in [-1, 1] (not clipped: lossy decoders can overshoot
        a little), and its sample rate in Hz.

    Raises:
        FileNotFoundError: If `path` is not a file.
        AudioDecodeError: If no decoder can read it or it holds no samples.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    decoders = [_read_pyav]
    if Path(path).suffix.lower() in SOUNDFILE_SUFFIXES:
        decoders.insert(0, _read_soundfile)
    problems = []
    for decode in decoders:
        try:
            samples, rate = decode(path)
        except NoAudioStream as err:  # a media file FFmpeg reads, without sound: nothing else would find any
            raise AudioDecodeError(f"cannot decode audio {path}: no audio stream ({err})") from None
        except av.InvalidDataError:
            problems.append(f"{decode.__name__.removeprefix('_read_')}: not a media file FFmpeg can read")
            continue
        except (RuntimeError, OSError, ValueError, IndexError, av.FFmpegError) as err:
            problems.append(f"{decode.__name__.removeprefix('_read_')}: {err}")
            continue
        if samples.shape[1] == 0:
            problems.append(f"{decode.__name__.removeprefix('_read_')}: no audio samples")
            continue
        return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), rate
    raise AudioDecodeError(f"cannot decode audio {path}: {'; '.join(problems)}")


def _read_soundfile(path: str) -> tuple[np.ndarray, int]:
    """libsndfile decode, scaled to float like torchaudio (int16 / 32768, ...); returns `(channels, samples)`."""
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)  # (samples, channels)
    return samples.T, int(rate)


def _read_pyav(path: str) -> tuple[np.ndarray, int]:
    """FFmpeg decode of the first audio stream, converted to planar float; returns `(channels, samples)`."""
    chunks: list[np.ndarray] = []
    with av.open(path) as container:
        if not container.streams.audio:
            raise NoAudioStream(f"it has: {', '.join(sorted({s.type for s in container.streams})) or 'no streams'}")
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")  # sample-format conversion only: same layout and rate
        for frame in container.decode(stream):
            chunks.extend(out.to_ndarray() for out in to_float.resample(frame))
        chunks.extend(out.to_ndarray() for out in to_float.resample(None))
        rate = stream.codec_context.sample_rate
    if not chunks:
        raise ValueError("no audio frames")
    return np.concatenate(chunks, axis=1), int(rate)


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """Band-limited resampling with `torchaudio.functional.resample`'s defaults (Hann-windowed sinc, 6 zero crossings,
    rolloff 0.99), rates reduced by their gcd, one strided convolution per output phase.

    Tolerance (tests/model/test_audio.py): a sum of sines at 220, 1000 and 1800 Hz (peak 0.75) resampled from 8,
    22.05, 44.1 or 48 kHz to 16 kHz matches the analytically sampled signal to < 1e-3 max abs (measured <= 7.6e-4)
    and `scipy.signal.resample_poly` to < 1.5e-3 (measured <= 9.5e-4), 20 ms away from either end. The filter rolls
    off well before the cutoff: a 3.5 kHz tone keeps gain 0.96 from 8 kHz and 0.999 from 44.1 kHz; 12 kHz from
    48 kHz is attenuated to 0.002.

    Args:
        waveform: `(..., samples)` floating point; the kernel is built in its dtype, as torchaudio does.
        orig_freq: Its sample rate in Hz.
        new_freq: The wanted sample rate in Hz.

    Returns:
        `(..., ceil(samples * new_freq / orig_freq))`; `waveform` itself when the rates are equal.
    """
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_freq} -> {new_freq}")
    if orig_freq == new_freq:
        return waveform
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    kernel, width = _sinc_kernel(orig, new, waveform.dtype, waveform.device)  # (new, 1, 2 * width + orig)
    length = waveform.shape[-1]
    flat = waveform.reshape(-1, 1, length)  # (N, 1, L)
    phases = F.conv1d(F.pad(flat, (width, width + orig)), kernel, stride=orig)  # (N, new, L / orig + 1)
    out = phases.transpose(1, 2).reshape(flat.shape[0], -1)  # interleave phases: (N, new * steps)
    target = -(-new * length // orig)  # ceil
    return out[:, :target].reshape(*waveform.shape[:-1], target)


def _sinc_kernel(orig: int, new: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, int]:
    """One windowed-sinc filter per output phase, `(new, 1, 2 * width + orig)`, and the padding `width`."""
    cutoff = min(orig, new) * RESAMPLE_ROLLOFF  # in units of the reduced rates: anti-aliasing below both Nyquists
    width = math.ceil(RESAMPLE_ZERO_CROSSINGS * orig / cutoff)  # input samples each side of the output instant
    taps = torch.arange(-width, width + orig, dtype=dtype, device=device)[None, None] / orig  # (1, 1, K)
    offsets = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None, None] / new  # (new, 1, 1)
    t = ((offsets + taps) * cutoff).clamp(-RESAMPLE_ZERO_CROSSINGS, RESAMPLE_ZERO_CROSSINGS)  # in zero crossings
    window = torch.cos(t * math.pi / RESAMPLE_ZERO_CROSSINGS / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.tensor(1.0, dtype=dtype, device=device), t.sin() / t)
    return sinc * (window * (cutoff / orig)), width


def clip_ranges(
    num_samples: int, sample_rate: int = SAMPLE_RATE, clip_seconds: float = CLIP_SECONDS, clips: int = CLIPS
) -> list[tuple[int, int]]:
    """Sample ranges of pytorchvideo's `ConstantClipsPerVideoSampler` as ImageBind slices them.

    Starts are `i * Fraction(max(D - clip_seconds, 0)) / max(clips - 1, 1)` with `D = num_samples / sample_rate`
    (a float, taken at its exact binary value), and bounds are floored to samples: 5.3 s at 16 kHz gives
    `[(0, 32000), (26399, 58399), (52799, 84799)]`. Audio shorter than a clip gives `clips` times `(0, num_samples)`.

    Args:
        num_samples: Length of the waveform.
        sample_rate: Its rate in Hz.
        clip_seconds: Length of a clip.
        clips: Number of clips.

    Returns:
        `clips` half-open `(start, end)` sample ranges, `end` capped at `num_samples`.
    """
    latest_start = Fraction(max(num_samples / sample_rate - clip_seconds, 0))
    step = latest_start / max(clips - 1, 1)
    ranges = []
    for index in range(clips):
        start = step * index
        end = start + Fraction(clip_seconds)
        ranges.append((int(start * sample_rate), min(int(end * sample_rate), num_samples)))
    return ranges


def kaldi_fbank(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = MEL_BINS) -> torch.Tensor:
    """Kaldi log-mel filterbank, as `torchaudio.compliance.kaldi.fbank` with ImageBind's options.

    Channel 0 only; 25 ms frames every 10 ms without edge padding (snip_edges); per frame: DC offset removal,
    pre-emphasis 0.97 (first sample replicated), symmetric Hann window, zero-padding to a power of two, power
    spectrum; triangular filters on the mel scale `1127 ln(1 + f / 700)` from 20 Hz to the Nyquist rate (the Nyquist
    FFT bin has weight 0); `log(max(energy, float32 eps))`. No dither, no energy column.

    Args:
        waveform: `(channels, samples)` or `(samples,)` float.
        sample_rate: Its rate in Hz.
        num_mel_bins: Number of mel filters.

    Returns:
        `(frames, num_mel_bins)`, `frames = 1 + (samples - frame_length) // frame_shift`.
    """
    if waveform.dim() not in (1, 2):
        raise ValueError(f"expected (channels, samples) or (samples,), got shape {tuple(waveform.shape)}")
    signal = waveform[0] if waveform.dim() == 2 else waveform  # (S,)
    size = int(sample_rate * FRAME_LENGTH_MS * 0.001)
    shift = int(sample_rate * FRAME_SHIFT_MS * 0.001)
    if signal.shape[0] < size:
        raise ValueError(f"audio of {signal.shape[0]} samples is shorter than one {FRAME_LENGTH_MS:g} ms frame")
    fft_size = 1 << (size - 1).bit_length()
    frames = signal.unfold(0, size, shift)  # (F, size), views into the signal
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - PREEMPHASIS * previous
    frames = frames * torch.hann_window(size, periodic=False, dtype=frames.dtype, device=frames.device)
    power = torch.fft.rfft(frames, n=fft_size).abs().pow(2.0)  # (F, fft_size / 2 + 1)
    banks = _mel_banks(num_mel_bins, fft_size, sample_rate).to(power)  # (M, fft_size / 2 + 1)
    energies = torch.mm(power, banks.T)  # (F, M)
    return torch.maximum(energies, torch.tensor(LOG_FLOOR, dtype=energies.dtype)).log()


@lru_cache(maxsize=8)
def _mel_banks(num_bins: int, fft_size: int, sample_rate: int) -> torch.Tensor:
    """Triangular mel filters `(num_bins, fft_size / 2 + 1)`, computed in float32 as torchaudio does."""
    mel_low = 1127.0 * math.log(1.0 + LOW_FREQ / 700.0)
    mel_high = 1127.0 * math.log(1.0 + 0.5 * sample_rate / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins).unsqueeze(1)  # (M, 1)
    left = mel_low + index * delta
    center = mel_low + (index + 1.0) * delta
    right = mel_low + (index + 2.0) * delta
    fft_mel = 1127.0 * (1.0 + (sample_rate / fft_size) * torch.arange(fft_size // 2) / 700.0).log()  # (fft_size / 2,)
    rising = (fft_mel - left) / (center - left)
    falling = (right - fft_mel) / (right - center)
    banks = torch.minimum(rising, falling).clamp_min(0.0)  # (M, fft_size / 2)
    return F.pad(banks, (0, 1))  # the Nyquist bin gets weight 0


def waveform_to_melspec(clip: torch.Tensor) -> torch.Tensor:
    """One clip's normalised log-mel: mean removal (all channels), Kaldi fbank of channel 0, pad or crop to 204.

    Args:
        clip: `(channels, samples)` float at 16 kHz, at least 400 samples.

    Returns:
        `(1, 128, 204)` float; zero-padded columns read `(0 - AUDIO_MEAN) / AUDIO_STD` = 0.467.
    """
    return _melspec_of_centred(clip - clip.mean())


def _melspec_of_centred(clip: torch.Tensor) -> torch.Tensor:
    """`waveform_to_melspec` after the mean removal."""
    fbank = kaldi_fbank(clip).T  # (128, F)
    missing = TARGET_FRAMES - fbank.shape[1]
    fbank = F.pad(fbank, (0, missing)) if missing > 0 else fbank[:, :TARGET_FRAMES]
    mean = torch.tensor([AUDIO_MEAN], dtype=fbank.dtype, device=fbank.device).view(-1, 1, 1)  # as torchvision's
    std = torch.tensor([AUDIO_STD], dtype=fbank.dtype, device=fbank.device).view(-1, 1, 1)  # Normalize computes
    return (fbank.unsqueeze(0) - mean) / std  # (1, 128, 204)


def preprocess_waveform(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """ImageBind's audio input for one waveform: resample to 16 kHz, three 2 s clips, normalised log-mel each.

    Like the official code, each clip's mean is subtracted in place from the shared waveform, so a clip overlapping
    an earlier one sees that clip's mean removed from the overlap (this changes the frames that straddle the
    boundary, by an amount proportional to the earlier clip's mean).

    Args:
        waveform: `(channels, samples)` or `(samples,)` float.
        sample_rate: Its rate in Hz.

    Returns:
        `(3, 1, 128, 204)` float32.
    """
    if waveform.dim() == 1:
        waveform = waveform.unsqueeze(0)
    waveform = resample(waveform.to(torch.float32), sample_rate, SAMPLE_RATE).clone()  # (C, S), ours to modify
    clips = []
    for start, end in clip_ranges(waveform.shape[1]):
        clip = waveform[:, start:end]  # a view: the in-place subtraction below reaches later, overlapping clips
        clip -= clip.mean()
        clips.append(_melspec_of_centred(clip))
    return torch.stack(clips)  # (3, 1, 128, 204)


def preprocess_audio(paths: Sequence[str]) -> torch.Tensor:
    """`load_and_transform_audio_data` without a device: decode each file and build its three clips.

    Args:
        paths: Local audio files.

    Returns:
        `(B, 3, 1, 128, 204)` float32, in the order of `paths`.

    Raises:
        FileNotFoundError: If a path is not a file.
        AudioDecodeError: If a file cannot be decoded or is shorter than one 25 ms frame; the message names it.
    """
    batch = []
    for path in paths:
        waveform, rate = load_audio(path)
        try:
            batch.append(preprocess_waveform(waveform, rate))
        except ValueError as err:
            raise AudioDecodeError(f"cannot preprocess audio {path}: {err}") from err
    if not batch:
        return torch.empty(0, CLIPS, 1, MEL_BINS, TARGET_FRAMES)
    return torch.stack(batch)  # (B, 3, 1, 128, 204)
