"""Acoustic features for the ASR task: log-mel filterbanks, an on-disk cache, SpecAugment.

Feature pipeline (:func:`log_mel`)
    waveform (mono, resampled to ``FeatureConfig.sample_rate`` with
    ``torchaudio.functional.resample`` if needed)
    -> power mel spectrogram (``torchaudio.transforms.MelSpectrogram``: Hann window of
    ``win_ms``, hop ``hop_ms``, ``n_fft`` = next power of two >= window length unless given,
    ``center=True`` so a signal of ``N`` samples gives ``1 + N // hop_length`` frames, i.e.
    ~100 frames per second at the default 10 ms hop; HTK mel scale, no filter normalisation)
    -> ``log(mel + log_offset)``
    -> per-utterance mean/variance normalisation of every mel bin (on by default).

We use ``MelSpectrogram`` rather than ``torchaudio.compliance.kaldi.fbank`` because it is
batched, differentiable and has no Kaldi-specific framing quirks (snip-edges, pre-emphasis,
per-frame DC removal); the numbers are close to Kaldi fbank but not identical.

Audio is read with ``soundfile`` (:func:`load_audio`); ``torchaudio.load`` is never used because
recent torchaudio versions route it through torchcodec/FFmpeg.

Heavy imports (``torchaudio``) happen lazily, the first time features are computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from lightning_fedprune.validation import check_bool, check_float, check_int

log = logging.getLogger(__name__)

__all__ = [
    "FeatureConfig",
    "FeatureCache",
    "FeatureExtractor",
    "SpecAugment",
    "spec_augment",
    "load_audio",
    "log_mel",
]

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel feature configuration (hashable; :meth:`hash` keys the on-disk cache).

    Args:
        sample_rate: rate the audio is resampled to before analysis.
        n_mels: number of mel bins (the feature dimension).
        win_ms: analysis window length in milliseconds (25 ms -> 400 samples at 16 kHz).
        hop_ms: frame shift in milliseconds (10 ms -> 100 frames per second).
        n_fft: FFT size; ``None`` derives it as the next power of two >= the window length
            (512 at the defaults).
        f_min, f_max: mel filterbank range in Hz (``f_max=None`` -> Nyquist).
        log_offset: ``log(mel + log_offset)``; avoids ``log(0)`` on digital silence.
        normalize: per-utterance mean/variance normalisation of every mel bin.
    """

    sample_rate: int = 16000
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: Optional[int] = None
    f_min: float = 0.0
    f_max: Optional[float] = None
    log_offset: float = 1e-6
    normalize: bool = True

    def __post_init__(self) -> None:
        # normalised values: equal configurations must give the same cache hash
        fields = {
            "sample_rate": check_int(self.sample_rate, "sample_rate", min=1),
            "n_mels": check_int(self.n_mels, "n_mels", min=1),
            "win_ms": check_float(self.win_ms, "win_ms", min=0, min_open=True),
            "hop_ms": check_float(self.hop_ms, "hop_ms", min=0, min_open=True),
            "n_fft": check_int(self.n_fft, "n_fft", min=1, optional=True),
            "f_min": check_float(self.f_min, "f_min", min=0),
            "f_max": check_float(self.f_max, "f_max", min=0, min_open=True, optional=True),
            "log_offset": check_float(self.log_offset, "log_offset", min=0, min_open=True),
            "normalize": check_bool(self.normalize, "normalize"),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        if self.win_length < 1 or self.hop_length < 1:
            raise ValueError(f"`win_ms` ({self.win_ms:g}) and `hop_ms` ({self.hop_ms:g}) must each be at least one "
                             f"sample at `sample_rate` {self.sample_rate} Hz.")
        if self.n_fft is not None and self.n_fft < self.win_length:
            raise ValueError(f"`n_fft` ({self.n_fft}) must be >= the window length ({self.win_length} samples: "
                             f"`win_ms` {self.win_ms:g} at {self.sample_rate} Hz), or None.")
        nyquist = self.sample_rate / 2
        if not self.f_min < (self.f_max if self.f_max is not None else nyquist) <= nyquist:
            raise ValueError(f"need `f_min` ({self.f_min:g}) < `f_max` ({self.f_max}) <= the Nyquist frequency "
                             f"({nyquist:g} Hz at `sample_rate` {self.sample_rate}); `f_max=None` = Nyquist.")

    @property
    def win_length(self) -> int:
        """Window length in samples."""
        return int(round(self.sample_rate * self.win_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        """Frame shift in samples."""
        return int(round(self.sample_rate * self.hop_ms / 1000.0))

    @property
    def fft_size(self) -> int:
        """The FFT size actually used (``n_fft`` or the next power of two >= window length)."""
        if self.n_fft is not None:
            return int(self.n_fft)
        n = 1
        while n < self.win_length:
            n *= 2
        return n

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: int) -> int:
        """Number of frames :func:`log_mel` returns for ``num_samples`` samples (at ``sample_rate``)."""
        return 1 + int(num_samples) // self.hop_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable hex digest of the configuration (plus the pipeline version)."""
        payload = json.dumps({"v": _FEATURE_PIPELINE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# bump when the numbers log_mel produces change for the same FeatureConfig (invalidates caches)
_FEATURE_PIPELINE_VERSION = 1


# --------------------------------------------------------------------------------------
# audio + log-mel
# --------------------------------------------------------------------------------------


def load_audio(path: PathLike) -> tuple[torch.Tensor, int]:
    """Read an audio file with ``soundfile``; returns ``(float32 mono waveform (N,), sample_rate)``.

    Multi-channel audio is averaged to mono. Raises whatever ``soundfile`` raises
    (``soundfile.LibsndfileError`` / ``RuntimeError``) on unreadable files.
    """
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = torch.from_numpy(data)
    wav = wav[:, 0] if wav.shape[1] == 1 else wav.mean(dim=1)
    return wav.contiguous(), int(sr)


_MEL_LOCK = threading.Lock()
_MEL_TRANSFORMS: dict = {}


def _mel_transform(config: FeatureConfig):
    with _MEL_LOCK:
        t = _MEL_TRANSFORMS.get(config)
        if t is None:
            import torchaudio

            t = torchaudio.transforms.MelSpectrogram(
                sample_rate=config.sample_rate,
                n_fft=config.fft_size,
                win_length=config.win_length,
                hop_length=config.hop_length,
                f_min=config.f_min,
                f_max=config.f_max,
                n_mels=config.n_mels,
                power=2.0,
                center=True,
                pad_mode="reflect",
                norm=None,
                mel_scale="htk",
            )
            _MEL_TRANSFORMS[config] = t
        return t


def log_mel(waveform: torch.Tensor, sample_rate: int, config: FeatureConfig = FeatureConfig()) -> torch.Tensor:
    """Log-mel features of one utterance, shape ``(T, n_mels)``, float32.

    ``waveform`` is ``(N,)`` or ``(channels, N)`` (channels are averaged). It is resampled to
    ``config.sample_rate`` if ``sample_rate`` differs. ``T == config.num_frames(N')`` where
    ``N'`` is the length after resampling.
    """
    wav = torch.as_tensor(waveform)
    if wav.dim() == 2:
        wav = wav.mean(dim=0)
    elif wav.dim() != 1:
        raise ValueError(f"expected a waveform of shape (N,) or (C, N), got {tuple(wav.shape)}")
    wav = wav.to(torch.float32)
    if int(sample_rate) != config.sample_rate:
        import torchaudio

        wav = torchaudio.functional.resample(wav, int(sample_rate), config.sample_rate)
    if wav.numel() == 0:
        return torch.zeros(0, config.n_mels)
    if wav.numel() < config.fft_size // 2 + 1:  # reflect padding needs a few samples
        wav = torch.nn.functional.pad(wav, (0, config.fft_size // 2 + 1 - wav.numel()))
    with torch.no_grad():
        mel = _mel_transform(config)(wav)  # (n_mels, T)
        feats = torch.log(mel + config.log_offset).transpose(0, 1).contiguous()  # (T, n_mels)
        if config.normalize:
            mean = feats.mean(dim=0, keepdim=True)
            std = feats.std(dim=0, keepdim=True, unbiased=False)
            feats = (feats - mean) / (std + 1e-5)
    return feats


# --------------------------------------------------------------------------------------
# on-disk cache
# --------------------------------------------------------------------------------------


class FeatureCache:
    """On-disk cache of per-file features.

    An entry is keyed by the file's absolute path, its size and ``st_mtime_ns`` and the
    :meth:`FeatureConfig.hash`, stored as ``<cache_dir>/<config hash>/<key[:2]>/<key>.pt``
    (``torch.save`` of a float32 tensor). Writes are atomic (temp file + ``os.replace``), so a
    crash never leaves a truncated entry; an unreadable entry is recomputed and overwritten.

    ``hits`` / ``misses`` count lookups in this process (DataLoader workers have their own copy).
    """

    def __init__(self, cache_dir: PathLike, config: FeatureConfig = FeatureConfig()) -> None:
        self.config = config
        self.root = Path(cache_dir).expanduser() / config.hash()
        self.hits = 0
        self.misses = 0

    def key(self, path: PathLike) -> str:
        p = Path(path).resolve()
        st = p.stat()
        payload = f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{self.config.hash()}"
        return hashlib.sha256(payload.encode()).hexdigest()

    def entry_path(self, path: PathLike) -> Path:
        k = self.key(path)
        return self.root / k[:2] / f"{k}.pt"

    def get(self, path: PathLike) -> Optional[torch.Tensor]:
        entry = self.entry_path(path)
        if not entry.is_file():
            return None
        try:
            return torch.load(entry, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt entry: recompute
            warnings.warn(f"feature cache entry {entry} is unreadable ({err}); recomputing", stacklevel=2)
            return None

    def put(self, path: PathLike, features: torch.Tensor) -> Path:
        entry = self.entry_path(path)
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(features.detach().cpu().contiguous(), f)
            os.replace(tmp, entry)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return entry

    def get_or_compute(self, path: PathLike, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        cached = self.get(path)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        feats = compute()
        try:
            self.put(path, feats)
        except OSError as err:  # read-only / full disk: still return the features
            warnings.warn(f"could not write feature cache entry for {path}: {err}", stacklevel=2)
        return feats


class FeatureExtractor:
    """``path -> (T, n_mels)`` features, optionally through a :class:`FeatureCache`."""

    def __init__(self, config: FeatureConfig = FeatureConfig(), cache_dir: Optional[PathLike] = None) -> None:
        self.config = config
        self.cache: Optional[FeatureCache] = FeatureCache(cache_dir, config) if cache_dir is not None else None

    def compute(self, path: PathLike) -> torch.Tensor:
        wav, sr = load_audio(path)
        return log_mel(wav, sr, self.config)

    def __call__(self, path: PathLike) -> torch.Tensor:
        if self.cache is None:
            return self.compute(path)
        return self.cache.get_or_compute(path, lambda: self.compute(path))


# --------------------------------------------------------------------------------------
# SpecAugment
# --------------------------------------------------------------------------------------


def _span_mask(
    num_masks: int, max_width: torch.Tensor, size: torch.Tensor, dim: int, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """(B, dim) bool mask with ``num_masks`` random spans per row.

    Row ``b``: each span has width ``~U{0..max_width[b]}`` and start ``~U{0..size[b]-width}``.
    """
    B = size.shape[0]
    pos = torch.arange(dim)
    mask = torch.zeros(B, dim, dtype=torch.bool)
    for _ in range(num_masks):
        u = torch.rand(B, 2, generator=generator)
        width = torch.minimum(torch.floor(u[:, 0] * (max_width + 1).float()).long(), size)
        start = torch.floor(u[:, 1] * (size - width + 1).float()).long()
        mask |= (pos[None, :] >= start[:, None]) & (pos[None, :] < (start + width)[:, None])
    return mask


def spec_augment(
    features: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    *,
    freq_masks: int = 2,
    freq_width: int = 27,
    time_masks: int = 2,
    time_width: Union[int, float] = 0.05,
    fill: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """SpecAugment (Park et al., 2019) time and frequency masking, without time warping.

    Args:
        features: ``(T, F)`` or ``(B, T, F)``.
        lengths: ``(B,)`` valid frames per example (masks stay inside them); default all ``T``.
        freq_masks, freq_width: number of frequency masks, maximum width in bins.
        time_masks, time_width: number of time masks, maximum width: frames if ``int``, fraction
            of the example's length if ``float`` (``0.05`` = 5%).
        fill: value written into masked cells (0 = the mean of normalised features).
        generator: CPU ``torch.Generator``; the same generator state gives the same masks.

    Returns a new tensor (the input is not modified).
    """
    squeeze = features.dim() == 2
    x = features.unsqueeze(0) if squeeze else features
    if x.dim() != 3:
        raise ValueError(f"expected (T, F) or (B, T, F) features, got {tuple(features.shape)}")
    B, T, F = x.shape
    if lengths is None:
        lengths_cpu = torch.full((B,), T, dtype=torch.long)
    else:
        lengths_cpu = torch.as_tensor(lengths).detach().to("cpu", torch.long).clamp(0, T)
    mask = torch.zeros(B, T, F, dtype=torch.bool)
    if freq_masks > 0 and freq_width > 0:
        fm = _span_mask(freq_masks, torch.full((B,), int(freq_width)), torch.full((B,), F), F, generator)
        mask |= fm[:, None, :]
    if time_masks > 0 and time_width > 0:
        if isinstance(time_width, float):
            max_w = torch.floor(lengths_cpu.float() * float(time_width)).long()
        else:
            max_w = torch.full((B,), int(time_width))
        tm = _span_mask(time_masks, max_w, lengths_cpu, T, generator)
        mask |= tm[:, :, None]
    out = x.masked_fill(mask.to(x.device), fill)
    return out.squeeze(0) if squeeze else out


class SpecAugment(nn.Module):
    """Module wrapper of :func:`spec_augment`; a no-op in ``eval()`` mode or when ``enabled=False``.

    Call it from the training step on the padded batch::

        feats = self.spec_augment(batch["features"], batch["feature_lengths"], generator=g)
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 27,
        time_masks: int = 2,
        time_width: Union[int, float] = 0.05,
        fill: float = 0.0,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        self.freq_masks = freq_masks
        self.freq_width = freq_width
        self.time_masks = time_masks
        self.time_width = time_width
        self.fill = fill
        self.enabled = enabled

    def forward(
        self,
        features: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        if not (self.training and self.enabled):
            return features
        return spec_augment(
            features,
            lengths,
            freq_masks=self.freq_masks,
            freq_width=self.freq_width,
            time_masks=self.time_masks,
            time_width=self.time_width,
            fill=self.fill,
            generator=generator,
        )

    def extra_repr(self) -> str:
        return (
            f"freq_masks={self.freq_masks}, freq_width={self.freq_width}, time_masks={self.time_masks}, "
            f"time_width={self.time_width}, enabled={self.enabled}"
        )
