"""ImageBind audio preprocessing: decoding, resampling, the clip sampler, the Kaldi fbank and the final tensors."""

from __future__ import annotations

import fractions
import math
import re
from pathlib import Path

import av
import kaldi_native_fbank as knf
import numpy as np
import pytest
import soundfile
import torch
from scipy.signal import resample_poly

from model.imagebind.audio import (
    AUDIO_MEAN,
    AUDIO_STD,
    LOG_FLOOR,
    AudioDecodeError,
    clip_ranges,
    kaldi_fbank,
    load_audio,
    preprocess_audio,
    preprocess_waveform,
    resample,
    waveform_to_melspec,
)

TONES = ((220.0, 0.3, 0.1), (1000.0, 0.25, 1.0), (1800.0, 0.2, 2.0))  # (Hz, amplitude, phase), all below 2 kHz
EDGE = 320  # output samples (20 ms) left out at each end of the resampler checks: the zero-padded borders
PAD_VALUE = ((torch.zeros(()) - AUDIO_MEAN) / AUDIO_STD).item()  # a zero log-mel column after normalisation (float32)


def tones(rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    """A band-limited test signal `(channels, samples)` float64; channel c is the sum of TONES scaled by 1/(c+1)."""
    t = np.arange(round(rate * seconds)) / rate
    signal = sum(a * np.sin(2 * np.pi * f * t + p) for f, a, p in TONES)
    return np.stack([signal / (c + 1) for c in range(channels)])


def pcm16(samples: np.ndarray) -> np.ndarray:
    """Floats in [-1, 1] quantised to int16."""
    return np.round(samples * 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """16-bit PCM WAV of `(channels, samples)` floats, holding exactly `pcm16(samples)`."""
    soundfile.write(path, pcm16(samples).T, rate, subtype="PCM_16")
    return path


def write_pyav(path: Path, samples: np.ndarray, rate: int, codec: str) -> Path:
    """Encode `(channels, samples)` floats with PyAV; the container follows the file suffix."""
    layout = "stereo" if samples.shape[0] == 2 else "mono"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(samples.astype(np.float32), format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, fractions.Fraction(1, rate)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def kaldi_reference(samples: np.ndarray, num_bins: int) -> np.ndarray:
    """kaldi-native-fbank with ImageBind's options (on the same float samples, not rescaled to int16)."""
    opts = knf.FbankOptions()
    frame = opts.frame_opts
    frame.samp_freq, frame.frame_length_ms, frame.frame_shift_ms = 16000, 25, 10
    frame.dither, frame.snip_edges, frame.window_type = 0.0, True, "hanning"  # Kaldi's "hanning" is symmetric
    frame.remove_dc_offset, frame.preemph_coeff = True, 0.97
    opts.mel_opts.num_bins, opts.mel_opts.low_freq, opts.mel_opts.high_freq = num_bins, 20, 8000
    opts.use_energy, opts.htk_compat = False, True
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, samples.tolist())
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


def test_clip_ranges_reproduce_the_constant_clips_sampler() -> None:
    # 5.3 s: D - 2 is the float 3.2999999999999998..., so the starts floor to 26399 and 52799, not 26400/52800
    assert clip_ranges(84800) == [(0, 32000), (26399, 58399), (52799, 84799)]
    assert clip_ranges(48000) == [(0, 32000), (8000, 40000), (16000, 48000)]
    assert clip_ranges(32000) == [(0, 32000)] * 3
    assert clip_ranges(20000) == [(0, 20000)] * 3  # shorter than a clip: three identical clips of everything
    assert clip_ranges(84800, clips=1) == [(0, 32000)]


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resample_matches_the_analytic_signal_and_resample_poly(rate: int) -> None:
    source = tones(rate, 1.0)
    out = resample(torch.from_numpy(source.astype(np.float32)), rate, 16000)[0].double().numpy()
    assert out.shape == (16000,)
    exact = tones(16000, 1.0)[0]
    gcd = math.gcd(rate, 16000)
    poly = resample_poly(source[0], 16000 // gcd, rate // gcd)
    # measured: at most 7.6e-4 vs the analytic signal, 9.5e-4 vs resample_poly (signal peak 0.75)
    assert np.abs(out - exact)[EDGE:-EDGE].max() < 1e-3
    assert np.abs(out - poly)[EDGE:-EDGE].max() < 1.5e-3


def test_resample_shapes_no_op_and_anti_aliasing() -> None:
    waveform = torch.from_numpy(tones(44100, 0.5, channels=2).astype(np.float32))
    assert resample(waveform, 16000, 16000) is waveform
    batched = resample(waveform.expand(3, 2, -1), 44100, 16000)
    assert batched.shape == (3, 2, math.ceil(waveform.shape[1] * 160 / 441))
    assert torch.equal(batched[2, 1], resample(waveform[1], 44100, 16000))  # channels are independent
    t = torch.arange(48000, dtype=torch.float64) / 48000
    above_nyquist = torch.sin(2 * math.pi * 12000 * t).float()
    assert resample(above_nyquist, 48000, 16000)[EDGE:-EDGE].abs().max() < 0.005  # measured 0.0018
    with pytest.raises(ValueError, match="positive"):
        resample(waveform, 0, 16000)


def signals() -> dict[str, np.ndarray]:
    """2 s test signals at 16 kHz: noise, pure tones, tones over a -60 dB noise floor."""
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    tonal = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)
    return {
        "noise": rng.uniform(-0.5, 0.5, 32000),
        "quiet-noise": 0.01 * rng.standard_normal(32000),
        "tones": tonal,
        "tones-on-noise": tonal + 1e-3 * rng.standard_normal(32000),
        "tone-with-dc": 0.3 + 0.5 * np.sin(2 * np.pi * 1000 * t),
    }


@pytest.mark.parametrize("num_bins", [64, 120])
@pytest.mark.parametrize("name", list(signals()))
def test_kaldi_fbank_matches_kaldi_native_fbank(name: str, num_bins: int) -> None:
    # Kaldi refuses 128 bins at a 512-point FFT (filter 3 covers no FFT bin), so the same code is compared at 64 and
    # 120 bins; both sides run in float32 and differ only where a band's energy is tiny against the frame's.
    samples = signals()[name].astype(np.float32)
    ours = kaldi_fbank(torch.from_numpy(samples), num_mel_bins=num_bins).numpy()
    reference = kaldi_reference(samples, num_bins)
    assert ours.shape == reference.shape == (198, num_bins)
    difference = np.abs(ours - reference)
    assert difference.max() < 5e-3  # measured: at most 2.9e-3 (pure tones, 120 bins), 5.5e-5 on noise at 64 bins
    assert difference.mean() < 1e-4


def test_kaldi_fbank_with_imagebind_settings() -> None:
    noise = torch.from_numpy(signals()["noise"].astype(np.float32))
    fbank = kaldi_fbank(noise)
    assert fbank.shape == (198, 128) and fbank.dtype == torch.float32
    assert torch.all(fbank[:, 3] == math.log(LOG_FLOOR))  # the empty filter reads log(eps) in every frame
    assert torch.all(fbank[:, [0, 1, 2, *range(4, 128)]] > math.log(LOG_FLOOR))
    stereo = torch.stack([noise, torch.zeros_like(noise)])
    assert torch.equal(kaldi_fbank(stereo), fbank)  # channel 0 only
    assert kaldi_fbank(noise[:400]).shape == (1, 128)
    with pytest.raises(ValueError, match="shorter than one"):
        kaldi_fbank(noise[:399])


def test_melspec_pads_with_the_normalised_zero_and_crops_long_clips() -> None:
    noise = torch.from_numpy(signals()["noise"].astype(np.float32))[None]
    spec = waveform_to_melspec(noise)
    assert spec.shape == (1, 128, 204)
    assert torch.all(spec[..., 198:] == PAD_VALUE) and abs(PAD_VALUE - 0.467) < 1e-3
    assert torch.allclose(spec[0, :, :198], (kaldi_fbank(noise - noise.mean()).T - AUDIO_MEAN) / AUDIO_STD)
    longer = torch.cat([noise, noise[:, :1600]], dim=1)  # 2.1 s -> 208 frames, cropped to the first 204
    assert torch.allclose(waveform_to_melspec(longer)[..., :198], spec[..., :198], atol=1e-3)


def test_clip_means_are_removed_in_place_over_all_channels_as_upstream() -> None:
    rng = np.random.default_rng(1)
    waveform = torch.from_numpy(rng.uniform(-0.1, 0.1, (2, 84800)).astype(np.float32))
    waveform[1] += 0.5  # only channel 1 has a DC offset, so clip 0's mean (all channels) is about 0.25
    before = waveform.clone()
    clips = preprocess_waveform(waveform, 16000)
    assert torch.equal(waveform, before)  # the caller's tensor is untouched
    standalone = waveform_to_melspec(waveform[:, 26399:58399])
    changed = (clips[1] - standalone).abs().amax(dim=(0, 1)) > 1e-3  # (204,)
    # clip 0 [0, 32000) was centred in place first, so channel 0 of clip 1 steps at sample 32000 - 26399 = 5601:
    # the frames straddling it (33, 34, 35) differ; a channel-0-only mean would have left no step at all
    assert changed.nonzero().flatten().tolist() == [33, 34, 35]
    assert torch.equal(clips[0], waveform_to_melspec(waveform[:, :32000]))


def test_preprocess_waveform_shapes_and_determinism() -> None:
    waveform = torch.from_numpy(tones(48000, 5.3, channels=2).astype(np.float32))
    first, second = preprocess_waveform(waveform, 48000), preprocess_waveform(waveform, 48000)
    assert first.shape == (3, 1, 128, 204) and first.dtype == torch.float32
    assert torch.equal(first, second) and torch.isfinite(first).all()
    mono = preprocess_waveform(waveform[0], 48000)
    assert mono.shape == (3, 1, 128, 204)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_wav_files_at_every_rate(tmp_path: Path, rate: int, channels: int) -> None:
    samples = tones(rate, 2.5, channels)
    path = write_wav(tmp_path / f"tones_{rate}.wav", samples, rate)
    waveform, read_rate = load_audio(str(path))
    assert read_rate == rate and waveform.shape == samples.shape and waveform.dtype == torch.float32
    assert np.array_equal(waveform.numpy(), pcm16(samples) / np.float32(32768))  # torchaudio's scaling of 16-bit PCM
    batch = preprocess_audio([str(path)])
    assert batch.shape == (1, 3, 1, 128, 204)
    assert torch.equal(batch[0], preprocess_waveform(waveform, rate))
    # the band-limited tones look the same whatever the source rate: compare with the analytic 16 kHz signal
    expected = preprocess_waveform(torch.from_numpy(tones(16000, 2.5, channels).astype(np.float32)), 16000)
    loud = expected > (-8 - AUDIO_MEAN) / AUDIO_STD  # bands within reach of the tones' energy
    assert (batch[0] - expected)[loud].abs().max() < 0.01


def test_audio_shorter_than_a_clip(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "short.wav", tones(22050, 1.2), 22050)
    clips = preprocess_audio([str(path)])[0]  # 19200 samples at 16 kHz -> 118 frames
    # the same samples three times; upstream centres the one shared slice in place three times, so later clips see
    # a second and third (near-zero) mean removed: equal up to float rounding
    assert torch.allclose(clips[0], clips[1], atol=1e-3) and torch.allclose(clips[0], clips[2], atol=1e-3)
    assert torch.all(clips[..., 118:] == PAD_VALUE) and not torch.any(clips[..., 117] == PAD_VALUE)


@pytest.mark.parametrize(("suffix", "fmt", "subtype"), [(".flac", "FLAC", "PCM_16"), (".ogg", "OGG", "VORBIS")])
def test_flac_and_ogg_through_soundfile(tmp_path: Path, suffix: str, fmt: str, subtype: str) -> None:
    samples = tones(44100, 2.0, channels=2)
    path = tmp_path / f"tones{suffix}"
    soundfile.write(path, samples.T, 44100, format=fmt, subtype=subtype)
    waveform, rate = load_audio(str(path))
    assert rate == 44100 and waveform.shape == samples.shape
    assert np.abs(waveform.numpy() - samples).max() < (1e-4 if fmt == "FLAC" else 0.05)
    assert preprocess_audio([str(path)]).shape == (1, 3, 1, 128, 204)


@pytest.mark.parametrize(("suffix", "codec"), [(".m4a", "aac"), (".mp4", "aac"), (".mp3", "libmp3lame")])
def test_compressed_containers_through_pyav(tmp_path: Path, suffix: str, codec: str) -> None:
    samples = tones(44100, 1.5, channels=2)
    path = write_pyav(tmp_path / f"tones{suffix}", samples, 44100, codec)
    waveform, rate = load_audio(str(path))
    assert rate == 44100 and waveform.shape[0] == 2 and waveform.dtype == torch.float32
    assert abs(waveform.shape[1] - samples.shape[1]) <= 1024  # encoder delay is trimmed; AAC pads the last frame
    n = min(waveform.shape[1], samples.shape[1])
    decoded = waveform.numpy()[:, :n]
    correlation = (decoded * samples[:, :n]).sum(1) / np.sqrt((decoded**2).sum(1) * (samples[:, :n] ** 2).sum(1))
    assert np.all(correlation > 0.98)
    assert preprocess_audio([str(path)]).shape == (1, 3, 1, 128, 204)


def test_unreadable_files_name_the_path(tmp_path: Path) -> None:
    for name in ("broken.wav", "broken.m4a"):
        path = tmp_path / name
        path.write_bytes(b"RIFF\x00\x00not really audio" * 10)
        with pytest.raises(AudioDecodeError, match=re.escape(str(path))):
            load_audio(str(path))
    missing = tmp_path / "missing.wav"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_audio(str(missing))
    silent = tmp_path / "silent.mp4"
    with av.open(str(silent), "w") as container:  # a video without sound
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(
        AudioDecodeError, match=re.escape(f"cannot decode audio {silent}: no audio stream (it has: video)")
    ):
        load_audio(str(silent))
    (tmp_path / "notes.txt").write_text("not audio\n" * 20)
    with pytest.raises(AudioDecodeError, match=r"notes\.txt: pyav: not a media file FFmpeg can read"):
        load_audio(str(tmp_path / "notes.txt"))
    tiny = write_wav(tmp_path / "tiny.wav", tones(16000, 0.01), 16000)  # 160 samples: not one 25 ms frame
    with pytest.raises(AudioDecodeError, match=re.escape(str(tiny))):
        preprocess_audio([str(tiny)])


def test_batch_keeps_the_order_of_paths(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    paths = [str(write_wav(tmp_path / f"{i}.wav", rng.uniform(-0.5, 0.5, (1, 40000)), 16000)) for i in range(2)]
    batch = preprocess_audio(paths)
    assert batch.shape == (2, 3, 1, 128, 204)
    assert torch.equal(batch[1], preprocess_audio(paths[1:])[0])
    assert not torch.equal(batch[0], batch[1])
    assert preprocess_audio([]).shape == (0, 3, 1, 128, 204)
