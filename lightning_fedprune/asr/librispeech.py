"""Reader for corpora in LibriSpeech layout (real LibriSpeech or :mod:`.synthetic`).

Layout::

    <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   lines "<utt id> TRANSCRIPT"
    <root>/<split>/<speaker>/<chapter>/<utt id>.flac

``root`` may also be the directory that *contains* ``LibriSpeech/`` (what the OpenSLR tarballs
extract to). Any split names work (``train-clean-100``, ``dev-other``, ``train``, ...) and several
splits can be combined.

* :func:`scan_librispeech` builds a :class:`LibriSpeechIndex` of :class:`Utterance` records
  from the transcript files and directory listings only; it never decodes audio (unless
  ``check_audio=True``, which reads each file's header).
* :class:`LibriSpeechDataset` is a lazy map-style ``Dataset``: audio is read (``soundfile``)
  and turned into log-mel features in ``__getitem__``; speaker bookkeeping (``speakers``,
  ``speaker_ids``, ``speaker_of``, ``indices_by_speaker``) is available without touching audio,
  so a federated data module can partition clients by speaker cheaply.
* :func:`collate_asr` pads a list of items into a batch.

Problems are never silent: ``on_error="warn"`` skips the offending utterance with a
``warnings.warn`` naming the file, ``on_error="raise"`` raises. A missing root, a missing split
directory or a split without any utterance always raise.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union, overload

import torch
from torch.utils.data import Dataset

from lightning_fedprune.validation import check_bool, check_choice, check_each, check_int, check_path, check_str, fail

from .features import FeatureConfig, FeatureExtractor

__all__ = [
    "Utterance",
    "LibriSpeechIndex",
    "LibriSpeechDataset",
    "CorpusFormatError",
    "AudioReadError",
    "scan_librispeech",
    "collate_asr",
    "split_speakers",
]

PathLike = Union[str, os.PathLike]
AUDIO_EXTENSIONS = (".flac", ".wav")
_ON_ERROR = ("warn", "raise")


class CorpusFormatError(ValueError):
    """The corpus on disk does not follow the LibriSpeech layout (e.g. a transcript without audio)."""


class AudioReadError(RuntimeError):
    """An audio file exists but cannot be decoded."""


def _natural_key(s: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]


def _split_names(value: Union[str, Sequence[str], None], name: str) -> list[str]:
    """A split name or a list of distinct split names (``None`` = none), checked under the argument's ``name``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [check_str(value, name)]
    if not isinstance(value, (list, tuple)):
        fail(name, "a split name or a list of split names", value)
    out = list(check_each(value, name, check_str))
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}` lists a split twice: {out}")
    return out


def _problem(on_error: str, exc: Exception) -> None:
    if on_error == "raise":
        raise exc
    warnings.warn(f"{exc} -- skipped", RuntimeWarning, stacklevel=3)


@dataclass(frozen=True)
class Utterance:
    """One utterance of the index (no audio loaded)."""

    id: str
    speaker: str
    chapter: str
    path: Path
    transcript: str  # as in the transcript file (LibriSpeech: upper case)
    split: str

    @property
    def text(self) -> str:
        """Lower-case transcript (what the dataset returns)."""
        return self.transcript.lower()


class LibriSpeechIndex(Sequence[Utterance]):
    """An ordered collection of :class:`Utterance` records (split order, then natural
    speaker / chapter / utterance order), built by :meth:`scan` / :func:`scan_librispeech`."""

    def __init__(self, utterances: Iterable[Utterance], root: Optional[PathLike] = None, splits: Sequence[str] = ()):
        self.utterances: list[Utterance] = list(utterances)
        self.root = Path(root) if root is not None else None
        self.splits = tuple(splits)

    @classmethod
    def scan(
        cls,
        root: PathLike,
        splits: Union[str, Sequence[str]],
        *,
        on_error: str = "warn",
        check_audio: bool = False,
    ) -> "LibriSpeechIndex":
        return scan_librispeech(root, splits, on_error=on_error, check_audio=check_audio)

    # Sequence protocol
    def __len__(self) -> int:
        return len(self.utterances)

    @overload
    def __getitem__(self, i: int) -> Utterance: ...
    @overload
    def __getitem__(self, i: slice) -> list[Utterance]: ...
    def __getitem__(self, i):
        return self.utterances[i]

    def __iter__(self) -> Iterator[Utterance]:
        return iter(self.utterances)

    def __repr__(self) -> str:
        return f"LibriSpeechIndex({len(self)} utterances, {len(self.speakers)} speakers, splits={self.splits})"

    @property
    def speakers(self) -> list[str]:
        """Sorted (natural order) list of speaker ids."""
        return sorted({u.speaker for u in self.utterances}, key=_natural_key)

    def by_speaker(self) -> "OrderedDict[str, list[Utterance]]":
        out: OrderedDict[str, list[Utterance]] = OrderedDict((s, []) for s in self.speakers)
        for u in self.utterances:
            out[u.speaker].append(u)
        return out

    def filter(
        self,
        speakers: Optional[Iterable[str]] = None,
        max_utterances: Optional[int] = None,
        max_utterances_per_speaker: Optional[int] = None,
    ) -> "LibriSpeechIndex":
        """A sub-index: only ``speakers`` (all must exist), at most ``max_utterances_per_speaker``
        per speaker (the first ones) and at most ``max_utterances`` in total (the first ones)."""
        utts = self.utterances
        if speakers is not None:
            wanted = {str(s) for s in speakers}
            missing = wanted - {u.speaker for u in utts}
            if missing:
                raise ValueError(
                    f"speakers not found in {self.root} splits {list(self.splits)}: {sorted(missing, key=_natural_key)}"
                )
            utts = [u for u in utts if u.speaker in wanted]
        if max_utterances_per_speaker is not None:
            counts: dict[str, int] = {}
            kept = []
            for u in utts:
                if counts.get(u.speaker, 0) < max_utterances_per_speaker:
                    counts[u.speaker] = counts.get(u.speaker, 0) + 1
                    kept.append(u)
            utts = kept
        if max_utterances is not None:
            utts = utts[: max(0, int(max_utterances))]
        return LibriSpeechIndex(utts, self.root, self.splits)


def _resolve_split(root: Path, split: str) -> Path:
    for cand in (root / split, root / "LibriSpeech" / split):
        if cand.is_dir():
            return cand
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    nested = root / "LibriSpeech"
    if nested.is_dir():
        available += sorted(f"LibriSpeech/{p.name}" for p in nested.iterdir() if p.is_dir())
    raise FileNotFoundError(f"split {split!r} not found under LibriSpeech root {root} (available: {available})")


def _check_header(path: Path) -> Optional[Exception]:
    import soundfile as sf

    try:
        info = sf.info(str(path))
        if info.frames <= 0:
            return AudioReadError(f"audio file {path} is empty")
    except Exception as err:
        return AudioReadError(f"unreadable audio file {path}: {err}")
    return None


def scan_librispeech(
    root: PathLike,
    splits: Union[str, Sequence[str]],
    *,
    on_error: str = "warn",
    check_audio: bool = False,
) -> LibriSpeechIndex:
    """Index the utterances of one or several splits of a LibriSpeech-layout corpus.

    Raises ``FileNotFoundError`` if ``root`` or a split directory does not exist and
    :class:`CorpusFormatError` if a split contains no utterance. Per-utterance problems -- a
    transcript line without its audio file, a malformed line, a duplicate id, and with
    ``check_audio=True`` an audio file whose header cannot be read -- are skipped with a
    warning naming the file (``on_error="warn"``) or raised (``"raise"``).
    """
    check_choice(on_error, "on_error", _ON_ERROR)
    check_bool(check_audio, "check_audio")
    split_list = _split_names(splits, "splits")
    if not split_list:
        fail("splits", "a split name or a non-empty list of split names", splits)
    root = check_path(root, "root", kind="dir", optional=False)
    if not root.exists():
        raise FileNotFoundError(f"LibriSpeech root {root} does not exist")

    utterances: list[Utterance] = []
    seen: dict[str, Path] = {}
    for split in split_list:
        split_dir = _resolve_split(root, split)
        n_before = len(utterances)
        n_trans = 0
        for spk_dir in sorted((d for d in split_dir.iterdir() if d.is_dir()), key=lambda d: _natural_key(d.name)):
            for chap_dir in sorted((d for d in spk_dir.iterdir() if d.is_dir()), key=lambda d: _natural_key(d.name)):
                names = set(os.listdir(chap_dir))
                trans_files = sorted(n for n in names if n.endswith(".trans.txt"))
                for tname in trans_files:
                    n_trans += 1
                    tpath = chap_dir / tname
                    with open(tpath, encoding="utf-8") as f:
                        lines = f.read().splitlines()
                    for lineno, line in enumerate(lines, 1):
                        line = line.strip()
                        if not line:
                            continue
                        parts = line.split(maxsplit=1)
                        if len(parts) != 2:
                            _problem(on_error, CorpusFormatError(f"{tpath}:{lineno}: malformed transcript line {line!r}"))
                            continue
                        utt_id, text = parts
                        audio = next((chap_dir / (utt_id + e) for e in AUDIO_EXTENSIONS if utt_id + e in names), None)
                        if audio is None:
                            _problem(
                                on_error,
                                CorpusFormatError(
                                    f"{tpath}:{lineno}: no audio file for utterance {utt_id} "
                                    f"(expected {chap_dir / (utt_id + '.flac')})"
                                ),
                            )
                            continue
                        if utt_id in seen:
                            _problem(on_error, CorpusFormatError(f"duplicate utterance id {utt_id}: {audio} and {seen[utt_id]}"))
                            continue
                        if check_audio:
                            err = _check_header(audio)
                            if err is not None:
                                _problem(on_error, err)
                                continue
                        seen[utt_id] = audio
                        utterances.append(Utterance(utt_id, spk_dir.name, chap_dir.name, audio, text.strip(), split))
        if len(utterances) == n_before:
            what = "no *.trans.txt transcript files" if n_trans == 0 else "no usable utterances"
            raise CorpusFormatError(f"split {split!r} ({split_dir}) is empty: {what}")
    return LibriSpeechIndex(utterances, root, split_list)


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


class LibriSpeechDataset(Dataset):
    """Lazy map-style dataset over a LibriSpeech-layout corpus.

    Items are ``{"features": FloatTensor (T, n_mels), "text": lower-case transcript,
    "speaker": str, "id": str}``. Audio is decoded only in ``__getitem__``; speaker lookups
    (``speakers``, ``speaker_ids``, ``speaker_of``, ``indices_by_speaker``) never touch audio.

    Args:
        root, splits: corpus root and one or several split names (combined in that order).
        speakers: keep only these speaker ids (all must exist).
        features: :class:`FeatureConfig`.
        cache_dir: on-disk feature cache directory (see :class:`FeatureCache`); ``None`` = no cache.
        on_error: ``"warn"`` or ``"raise"`` for index problems (see :func:`scan_librispeech`) and
            for audio that cannot be decoded in ``__getitem__``. With ``"warn"`` such an item is
            returned as ``None`` (after a warning naming the file) and :func:`collate_asr` drops it.
        max_utterances, max_utterances_per_speaker: caps (the first utterances in index order).
        check_audio: read every audio header while indexing (catches corrupt files up front).
        index: use a prebuilt :class:`LibriSpeechIndex` instead of scanning ``root``/``splits``.
    """

    def __init__(
        self,
        root: Optional[PathLike] = None,
        splits: Union[str, Sequence[str], None] = None,
        speakers: Optional[Iterable[str]] = None,
        features: FeatureConfig = FeatureConfig(),
        cache_dir: Optional[PathLike] = None,
        on_error: str = "warn",
        max_utterances: Optional[int] = None,
        max_utterances_per_speaker: Optional[int] = None,
        check_audio: bool = False,
        index: Optional[LibriSpeechIndex] = None,
    ) -> None:
        check_choice(on_error, "on_error", _ON_ERROR)
        if not isinstance(features, FeatureConfig):
            fail("features", "a FeatureConfig", features)
        check_path(cache_dir, "cache_dir", kind="dir")
        check_int(max_utterances, "max_utterances", min=0, optional=True)
        check_int(max_utterances_per_speaker, "max_utterances_per_speaker", min=1, optional=True)
        if index is None:
            if root is None or splits is None:
                raise ValueError(f"give `root` and `splits` (or a prebuilt `index`), got root={root!r}, "
                                 f"splits={splits!r}.")
            index = scan_librispeech(root, splits, on_error=on_error, check_audio=check_audio)
        elif not isinstance(index, LibriSpeechIndex):
            fail("index", "a LibriSpeechIndex or None", index)
        self.index = index.filter(speakers, max_utterances, max_utterances_per_speaker)
        self.on_error = on_error
        self.feature_config = features
        self.extractor = FeatureExtractor(features, cache_dir)
        self.speaker_ids: list[str] = [u.speaker for u in self.index]
        self.speakers: list[str] = self.index.speakers
        self.failed: set[str] = set()  # ids whose audio could not be decoded (this process)

    @property
    def cache(self):
        """The :class:`FeatureCache` (``None`` without ``cache_dir``); has ``hits``/``misses``."""
        return self.extractor.cache

    @property
    def utterances(self) -> list[Utterance]:
        return self.index.utterances

    def __len__(self) -> int:
        return len(self.index)

    def speaker_of(self, i: int) -> str:
        return self.speaker_ids[i]

    def indices_by_speaker(self) -> "OrderedDict[str, list[int]]":
        """``{speaker: [item indices]}`` in :attr:`speakers` order; no audio is read."""
        out: OrderedDict[str, list[int]] = OrderedDict((s, []) for s in self.speakers)
        for i, s in enumerate(self.speaker_ids):
            out[s].append(i)
        return out

    def features(self, i: int) -> torch.Tensor:
        return self.extractor(self.index[i].path)

    def __getitem__(self, i: int) -> Optional[dict]:
        u = self.index[i]
        try:
            feats = self.extractor(u.path)
        except Exception as err:
            exc = AudioReadError(f"cannot decode audio file {u.path} (utterance {u.id}): {err}")
            self.failed.add(u.id)
            if self.on_error == "raise":
                raise exc from err
            warnings.warn(f"{exc} -- item {i} skipped", RuntimeWarning, stacklevel=2)
            return None
        return {"features": feats, "text": u.text, "speaker": u.speaker, "id": u.id}

    def __repr__(self) -> str:
        return (
            f"LibriSpeechDataset({len(self)} utterances, {len(self.speakers)} speakers, "
            f"splits={list(self.index.splits)}, n_mels={self.feature_config.n_mels})"
        )


def collate_asr(batch: Sequence[Optional[dict]]) -> Optional[dict]:
    """Pad dataset items into a batch.

    Returns ``{"features": FloatTensor (B, T_max, n_mels) zero-padded, "feature_lengths":
    LongTensor (B,), "texts": list[str], "speakers": list[str], "ids": list[str]}``. ``None``
    items (undecodable audio with ``on_error="warn"``) are dropped; if nothing is left the result
    is ``None`` (a training step should then return ``None`` to skip the batch).
    """
    items = [b for b in batch if b is not None]
    if not items:
        return None
    feats = [torch.as_tensor(b["features"], dtype=torch.float32) for b in items]
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    n_mels = feats[0].shape[1]
    out = torch.zeros(len(feats), int(lengths.max()), n_mels, dtype=torch.float32)
    for k, f in enumerate(feats):
        if f.shape[1] != n_mels:
            raise ValueError(f"items have different feature sizes ({n_mels} vs {f.shape[1]})")
        out[k, : f.shape[0]] = f
    return {
        "features": out,
        "feature_lengths": lengths,
        "texts": [b["text"] for b in items],
        "speakers": [b["speaker"] for b in items],
        "ids": [b["id"] for b in items],
    }


def split_speakers(speakers: Iterable[str], num_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministically split speakers into ``(kept, heldout)``; both sorted (natural order).

    The result depends only on the *set* of speakers, ``num_heldout`` and ``seed``.
    """
    spk = sorted({str(s) for s in speakers}, key=_natural_key)
    check_int(num_heldout, "num_heldout", min=0, max=len(spk))  # at most every speaker
    check_int(seed, "seed")
    shuffled = spk[:]
    random.Random(f"fedprune-split-speakers-{seed}").shuffle(shuffled)
    held = set(shuffled[:num_heldout])
    return [s for s in spk if s not in held], [s for s in spk if s in held]
