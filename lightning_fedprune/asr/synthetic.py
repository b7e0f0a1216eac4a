"""An embedded, download-free speech corpus synthesised with eSpeak NG, in LibriSpeech layout.

:func:`generate_corpus` writes::

    <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac   (16 kHz, 16-bit FLAC)
    <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt         ("<id> TRANSCRIPT")
    <root>/SPEAKERS.TXT                                                       (LibriSpeech-style)
    <root>/corpus.json                                                        (config + speakers)

so :mod:`lightning_fedprune.asr.librispeech` reads it exactly like real LibriSpeech.

A *speaker* is a fixed ``(voice, variant, rate, pitch)`` combination (``en-gb-scotland+m3`` at
162 words/min, pitch 41, ...), so clients that own speakers are naturally non-IID. Train and test
speakers are disjoint (different ids and, up to 96 speakers, different voice+variant pairs).

Engine
    libespeak-ng is driven through ``ctypes`` from the ``espeakng-loader`` wheel (library plus
    voice data, no root needed), in synchronous mode with a synth callback that collects the
    16-bit samples (22050 Hz), which are resampled to 16 kHz and written as 16-bit FLAC (soundfile).
    If the wheel is missing, the ``espeak-ng`` command-line program is used as a fallback.
    Resampling 22050 -> 16000 Hz is a band-limited FFT resampler in numpy (torchaudio's sinc
    resampler rebuilds its kernel on every call, which dominated the generation time).

Determinism
    libespeak-ng keeps synthesis state in static variables (pitch "flutter" phase, echo buffer,
    ...) that survive ``espeak_Terminate``/``espeak_Initialize``, and some variants use libc
    ``rand()`` for breath noise, so the same text gives different samples on every call. We
    therefore load a *private copy* of the shared library for every speaker (fresh static state;
    unloaded afterwards) and re-seed ``rand()``/``espeak_ng_SetRandSeed`` before every utterance.
    A speaker's audio is then a pure function of ``(seed, speaker, utterance)``: the same seed gives
    byte-identical FLAC files and transcripts, independently of the order of generation or
    of other speakers. Synthesis is serialised by a process-wide lock (``rand()`` is global).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from lightning_fedprune.validation import (
    check_bool,
    check_choice,
    check_each,
    check_float,
    check_int,
    check_path,
    check_str,
    fail,
)

log = logging.getLogger(__name__)

__all__ = [
    "CorpusConfig",
    "SpeakerProfile",
    "VOCABULARIES",
    "DIGITS",
    "COMMANDS",
    "generate_corpus",
    "default_corpus",
    "cache_root",
    "load_corpus_info",
    "espeak_backend",
]

PathLike = Union[str, os.PathLike]

#: bump when the audio/text produced for the same config changes (invalidates cached corpora)
GENERATOR_VERSION = 1

DIGITS: tuple[str, ...] = ("ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE")
COMMANDS: tuple[str, ...] = (
    "UP", "DOWN", "LEFT", "RIGHT", "STOP", "GO", "YES", "NO", "OPEN", "CLOSE",
    "ON", "OFF", "START", "PAUSE", "PLAY", "NEXT", "BACK", "FORWARD", "FASTER", "SLOWER",
    "LOUDER", "QUIETER", "HELP", "CANCEL", "SAVE", "DELETE", "SELECT", "COPY", "PASTE", "UNDO",
    "REDO", "HOME", "MENU", "SEARCH", "CALL", "ANSWER", "MUTE", "VOLUME", "LIGHTS", "MUSIC",
    "TIMER", "ALARM", "WEATHER", "NEWS", "SEND", "REPLY", "LOCK", "UNLOCK", "CAMERA", "ZOOM",
)  # fmt: skip
#: vocabulary name -> (words, default (min, max) words per utterance)
VOCABULARIES: dict[str, tuple[tuple[str, ...], tuple[int, int]]] = {
    "digits": (DIGITS, (3, 7)),
    "commands": (COMMANDS, (1, 4)),
}

#: English voices of eSpeak NG (accents) and voice variants used to build speakers
VOICES: tuple[str, ...] = (
    "en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
)  # fmt: skip
VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
RATE_RANGE = (135, 195)  # words per minute (espeak default 175)
PITCH_RANGE = (30, 70)  # 0..100 (espeak default 50)



# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeakerProfile:
    """One synthetic speaker."""

    id: str
    split: str
    voice: str
    variant: str
    rate: int
    pitch: int
    chapter: str

    @property
    def sex(self) -> str:
        return "F" if self.variant.startswith("f") else "M"

    @property
    def voice_name(self) -> str:
        return f"{self.voice}+{self.variant}" if self.variant else self.voice


@dataclass(frozen=True)
class CorpusConfig:
    """Everything that determines a synthetic corpus: the one definition of the generator settings.

    :func:`generate_corpus` and :func:`default_corpus` take one, its fields are hashed into the
    cache key (:meth:`key`), and :class:`~lightning_fedprune.asr.datamodule.ASRDataModule` takes one
    as ``corpus`` -- in YAML a nested block, ``corpus: {vocabulary: digits, num_speakers: 16}``
    (fields not given keep the defaults below). Every field is checked here, at construction: a
    typo fails before minutes of synthesis, with the field's name.

    Args:
        vocabulary: ``"digits"`` (ZERO..NINE, 3-7 words per utterance) or ``"commands"`` (50
            command words, 1-4 words per utterance).
        num_speakers: speakers of the first split (``train``); with ``ASRDataModule`` each is one
            federated client.
        utterances_per_speaker: utterances of every training speaker (at most 9999: the
            utterance ids have 4 digits).
        test_speakers: speakers of the second split (``test``), all different from the training
            speakers (other ids and, up to 96 speakers in all, other voices); 0 = no second split.
        test_utterances_per_speaker: utterances of every test speaker (at most 9999).
        seed: seed of the corpus (the speakers' voices, rates and pitches, the transcripts, the
            noise); ``ASRDataModule`` keeps it apart from its own ``seed``, so changing the training
            seed does not regenerate the corpus.
        splits: names of the one or two split directories (training, then test speakers).
        min_words: fewest words in an utterance (``None``: the vocabulary's default, 3 for digits, 1
            for commands).
        max_words: most words in an utterance (``None``: the vocabulary's default, 7 for digits, 4 for
            commands).
        word_alpha: if set, every speaker draws words from its own Dirichlet(``word_alpha``)
            preferences (label skew across clients); ``None`` = uniform words.
        noise_snr_db: white noise floor added to the audio, as a signal-to-noise ratio in dB
            (``None`` = digital silence between words).
        sample_rate: sample rate of the FLAC files in Hz (eSpeak NG's 22050 Hz is resampled).
    """

    vocabulary: str = "digits"
    num_speakers: int = 16
    utterances_per_speaker: int = 50
    test_speakers: int = 4
    test_utterances_per_speaker: int = 25
    seed: int = 0
    splits: tuple[str, ...] = ("train", "test")
    min_words: Optional[int] = None
    max_words: Optional[int] = None
    word_alpha: Optional[float] = None
    noise_snr_db: Optional[float] = 40.0
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        # normalised values (ints, floats, a tuple) make equal configurations hash to the same key
        fields = {
            "vocabulary": check_choice(self.vocabulary, "vocabulary", tuple(VOCABULARIES)),
            "num_speakers": check_int(self.num_speakers, "num_speakers", min=1),
            "utterances_per_speaker": check_int(self.utterances_per_speaker, "utterances_per_speaker", min=1,
                                                max=9999),
            "test_speakers": check_int(self.test_speakers, "test_speakers", min=0),
            "test_utterances_per_speaker": check_int(self.test_utterances_per_speaker, "test_utterances_per_speaker",
                                                     min=1, max=9999),
            "seed": check_int(self.seed, "seed", min=0),  # numpy seeds must be >= 0
            "splits": check_each(self.splits, "splits", check_str),
            "min_words": check_int(self.min_words, "min_words", min=1, optional=True),
            "max_words": check_int(self.max_words, "max_words", min=1, optional=True),
            "word_alpha": check_float(self.word_alpha, "word_alpha", min=0, min_open=True, optional=True),
            "noise_snr_db": check_float(self.noise_snr_db, "noise_snr_db", optional=True),
            "sample_rate": check_int(self.sample_rate, "sample_rate", min=1),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        splits = self.splits
        if not 1 <= len(splits) <= 2 or len(set(splits)) != len(splits):
            fail("splits", "one or two distinct split names (train[, test])", list(splits))
        for i, split in enumerate(splits):
            if "/" in split or os.sep in split or split.startswith("."):
                fail(f"splits[{i}]", "a directory name (no '/', not starting with '.')", split)
        lo, hi = self.word_range
        if hi < lo:
            default = VOCABULARIES[self.vocabulary][1]
            raise ValueError(f"`max_words` ({hi}) must be >= `min_words` ({lo}); `None` stands for the "
                             f"{self.vocabulary!r} vocabulary's default range {default}.")

    @property
    def words(self) -> tuple[str, ...]:
        return VOCABULARIES[self.vocabulary][0]

    @property
    def word_range(self) -> tuple[int, int]:
        lo, hi = VOCABULARIES[self.vocabulary][1]
        return (self.min_words if self.min_words is not None else lo, self.max_words if self.max_words is not None else hi)

    @property
    def num_test_speakers(self) -> int:
        return self.test_speakers if len(self.splits) == 2 else 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["splits"] = list(self.splits)
        return d

    def speakers(self) -> list[SpeakerProfile]:
        """The deterministic speaker list: ``num_speakers`` train speakers, then the test speakers."""
        rng = random.Random(f"fedprune-speakers-{self.seed}")
        pairs = [(v, var) for v in VOICES for var in VARIANTS]
        rng.shuffle(pairs)
        total = self.num_speakers + self.num_test_speakers
        out: list[SpeakerProfile] = []
        seen: set[tuple] = set()
        for i in range(total):
            voice, variant = pairs[i % len(pairs)]
            while True:  # beyond len(pairs) speakers a pair repeats with another rate/pitch
                rate, pitch = rng.randint(*RATE_RANGE), rng.randint(*PITCH_RANGE)
                if (voice, variant, rate, pitch) not in seen:
                    break
            seen.add((voice, variant, rate, pitch))
            spk = str(101 + i)
            split = self.splits[0] if i < self.num_speakers else self.splits[1]
            out.append(SpeakerProfile(spk, split, voice, variant, rate, pitch, chapter=str((101 + i) * 10)))
        return out

    def transcripts(self, speaker_index: int) -> list[str]:
        """Upper-case transcripts of speaker ``speaker_index`` (position in :meth:`speakers`)."""
        n = self.utterances_per_speaker if speaker_index < self.num_speakers else self.test_utterances_per_speaker
        rng = np.random.default_rng([self.seed, 1, speaker_index])
        words = self.words
        p = None
        if self.word_alpha is not None:
            p = rng.dirichlet(np.full(len(words), float(self.word_alpha)))
        lo, hi = self.word_range
        out = []
        for _ in range(n):
            k = int(rng.integers(lo, hi + 1))
            idx = rng.choice(len(words), size=k, replace=True, p=p)
            out.append(" ".join(words[j] for j in idx))
        return out

    def key(self, engine_id: str) -> str:
        payload = json.dumps(
            {"config": self.to_dict(), "generator": GENERATOR_VERSION, "engine": engine_id}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# eSpeak NG engines: lightning_fedprune/asr/espeak.py
from .espeak import _SYNTH_LOCK, _CliEngine, _CtypesEngine, _engine_id, _make_engine, espeak_backend  # noqa: E402,F401


# --------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------


def _utterance_seed(seed: int, speaker_index: int, utt: int) -> int:
    h = hashlib.sha256(f"{seed}/{speaker_index}/{utt}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited FFT resampling (``scipy.signal.resample``-style), float32 output.

    The input is zero-padded to a multiple of ``src / gcd`` so the output length is exact; the
    spectrum is cut at the lower Nyquist frequency. Much faster than torchaudio's sinc resampler
    for one-off calls (no kernel construction) and deterministic. eSpeak output starts and ends
    in silence, so the circular-convolution edge effects are negligible.
    """
    if src == dst or x.size == 0:
        return x.astype(np.float32)
    g = np.gcd(src, dst)
    up, down = dst // g, src // g
    n = -(-x.size // down) * down
    m = n // down * up
    X = np.fft.rfft(x, n)
    k = min(X.size, m // 2 + 1)
    Y = np.zeros(m // 2 + 1, dtype=np.complex128)
    Y[:k] = X[:k]
    if m % 2 == 0 and k == m // 2 + 1 and m < n:  # the new Nyquist bin must be real
        Y[-1] = Y[-1].real
    y = np.fft.irfft(Y, m) * (m / n)
    return y[: int(round(x.size * dst / src))].astype(np.float32)


def _postprocess(samples: np.ndarray, src_rate: int, cfg: CorpusConfig, rng: np.random.Generator) -> np.ndarray:
    """int16 @ src_rate -> int16 @ cfg.sample_rate with silence padding, level and noise floor."""
    x = _resample(samples.astype(np.float64) / 32768.0, src_rate, cfg.sample_rate)
    sr = cfg.sample_rate
    lead = np.zeros(int(rng.uniform(0.05, 0.25) * sr), np.float32)
    trail = np.zeros(int(rng.uniform(0.05, 0.20) * sr), np.float32)
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > 0:
        x = x * (rng.uniform(0.3, 0.9) / peak)
    y = np.concatenate([lead, x.astype(np.float32), trail])
    if cfg.noise_snr_db is not None and x.size:
        active = x[np.abs(x) > 0.01 * np.abs(x).max()] if peak > 0 else x
        power = float(np.mean(active.astype(np.float64) ** 2)) if active.size else 0.0
        if power > 0:
            y = y + rng.normal(0.0, np.sqrt(power / 10 ** (cfg.noise_snr_db / 10)), size=y.shape).astype(np.float32)
    return np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16)


def _progress(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="utt", leave=False)
        except ImportError:
            pass

    class _LogProgress:
        def __init__(self) -> None:
            self.n, self.t0 = 0, time.perf_counter()

        def update(self, k: int = 1) -> None:
            self.n += k
            if enabled and (self.n % 100 == 0 or self.n == total):
                log.info("%s: %d/%d utterances (%.1fs)", desc, self.n, total, time.perf_counter() - self.t0)

        def close(self) -> None:
            pass

    return _LogProgress()


def generate_corpus(
    root: PathLike,
    config: CorpusConfig = CorpusConfig(),
    *,
    backend: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Synthesise the corpus described by ``config`` in LibriSpeech layout under ``root``; returns ``root``.

    ``config.splits[0]`` gets ``num_speakers`` speakers x ``utterances_per_speaker`` utterances;
    ``config.splits[1]`` (if given and ``test_speakers > 0``) gets ``test_speakers`` *other*
    speakers x ``test_utterances_per_speaker`` (see :class:`CorpusConfig` for every setting).

    ``backend``: ``"ctypes"`` (libespeak-ng from the espeakng-loader wheel), ``"cli"`` (the
    espeak-ng program) or ``"auto"`` (ctypes if available). Raises ``FileExistsError`` if a split
    directory to be written already has content, unless ``overwrite=True``.
    """
    root = check_path(root, "root", kind="dir", optional=False)
    _check_config(config)
    return _generate(root, config, backend=backend, overwrite=check_bool(overwrite, "overwrite"),
                     progress=check_bool(progress, "progress"))


def _check_config(config: CorpusConfig) -> None:
    if not isinstance(config, CorpusConfig):
        fail("config", "a CorpusConfig (e.g. CorpusConfig(num_speakers=4))", config)


def _generate(root: Path, cfg: CorpusConfig, *, backend: str, overwrite: bool, progress: bool) -> Path:
    import soundfile as sf

    backend = espeak_backend(backend)
    splits = cfg.splits[: 1 + (cfg.num_test_speakers > 0)]
    for s in splits:
        d = root / s
        if d.exists() and any(d.iterdir()):
            if not overwrite:
                raise FileExistsError(f"split directory {d} already exists and is not empty (pass overwrite=True)")
            shutil.rmtree(d)
    root.mkdir(parents=True, exist_ok=True)

    speakers = cfg.speakers()
    jobs = [(i, spk, cfg.transcripts(i)) for i, spk in enumerate(speakers)]
    total = sum(len(t) for _, _, t in jobs)
    t0 = time.perf_counter()
    log.info("synthesising %d utterances (%s, %d speakers) into %s", total, cfg.vocabulary, len(speakers), root)
    bar = _progress(total, f"synthesising {cfg.vocabulary} corpus", progress)
    seconds = {s: 0.0 for s in splits}
    counts = {s: 0 for s in splits}
    version = None
    try:
        for i, spk, texts in jobs:
            chapter_dir = root / spk.split / spk.id / spk.chapter
            chapter_dir.mkdir(parents=True, exist_ok=True)
            engine = _make_engine(backend)  # fresh engine state per speaker
            try:
                version = engine.version
                lines = []
                for u, text in enumerate(texts):
                    useed = _utterance_seed(cfg.seed, i, u)
                    raw = engine.synthesize(text.lower(), spk.voice_name, spk.rate, spk.pitch, useed)
                    if raw.size == 0:
                        raise RuntimeError(f"eSpeak NG produced no audio for {text!r} ({spk.voice_name})")
                    audio = _postprocess(raw, engine.sample_rate, cfg, np.random.default_rng([cfg.seed, 2, i, u]))
                    utt_id = f"{spk.id}-{spk.chapter}-{u:04d}"
                    sf.write(str(chapter_dir / f"{utt_id}.flac"), audio, cfg.sample_rate, format="FLAC", subtype="PCM_16")
                    lines.append(f"{utt_id} {text}\n")
                    seconds[spk.split] += audio.size / cfg.sample_rate
                    counts[spk.split] += 1
                    bar.update(1)
                (chapter_dir / f"{spk.id}-{spk.chapter}.trans.txt").write_text("".join(lines), encoding="utf-8")
            finally:
                engine.close()
    finally:
        bar.close()

    # LibriSpeech-style SPEAKERS.TXT and a machine-readable description
    with open(root / "SPEAKERS.TXT", "w", encoding="utf-8") as f:
        f.write("; lightning-fedprune synthetic eSpeak NG corpus\n;ID  |SEX| SUBSET           | VOICE\n")
        for spk in speakers:
            f.write(f"{spk.id:<5}| {spk.sex} | {spk.split:<17}| {spk.voice_name} rate={spk.rate} pitch={spk.pitch}\n")
    info = {
        "generator": "lightning_fedprune.asr.synthetic",
        "generator_version": GENERATOR_VERSION,
        "engine": {"backend": backend, "espeak_version": version},
        "config": cfg.to_dict(),
        "splits": {s: {"utterances": counts[s], "hours": round(seconds[s] / 3600, 4)} for s in splits},
        "speakers": [dataclasses.asdict(s) for s in speakers],
        "vocabulary": list(cfg.words),
    }
    (root / "corpus.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    dt = time.perf_counter() - t0
    log.info("synthesised %d utterances (%.2f h of audio) in %.1fs", total, sum(seconds.values()) / 3600, dt)
    return root


def load_corpus_info(root: PathLike) -> dict:
    """The ``corpus.json`` written by :func:`generate_corpus`."""
    p = Path(root) / "corpus.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: {root} is not a corpus written by generate_corpus")
    return json.loads(p.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------
# cached default corpus
# --------------------------------------------------------------------------------------


def cache_root(cache_dir: Optional[PathLike] = None) -> Path:
    """``cache_dir``, else ``$FEDPRUNE_CACHE``, else ``platformdirs.user_cache_dir("lightning-fedprune")``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FEDPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("lightning-fedprune"))
    except ImportError:  # pragma: no cover
        return Path.home() / ".cache" / "lightning-fedprune"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_tmp(parent: Path) -> None:
    for d in parent.glob(".tmp-*"):
        parts = d.name.split("-")
        try:
            pid = int(parts[-2])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def default_corpus(
    config: CorpusConfig = CorpusConfig(),
    *,
    backend: str = "auto",
    cache_dir: Optional[PathLike] = None,
    progress: bool = True,
) -> Path:
    """The synthetic corpus for ``config``, generated once and cached.

    Lives in ``<cache_root(cache_dir)>/corpora/synth-<vocabulary>-<hash>`` where the hash
    (:meth:`CorpusConfig.key`) covers the configuration, the generator version and the eSpeak NG
    backend+version. Generation goes to a temporary sibling directory that is renamed into place
    when complete, so an interrupted run never leaves a partial corpus (and leftovers of dead
    processes are removed). A second call only checks that the directory exists and returns
    immediately.
    """
    _check_config(config)
    check_path(cache_dir, "cache_dir", kind="dir")
    progress = check_bool(progress, "progress")
    parent = cache_root(cache_dir) / "corpora"
    final = parent / f"synth-{config.vocabulary}-{config.key(_engine_id(backend))}"
    if (final / "corpus.json").is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(parent)
    tmp = parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _generate(tmp, config, backend=backend, overwrite=False, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "corpus.json").is_file():  # not a concurrent winner: a real error
                raise
            log.info("corpus %s was generated concurrently; using it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
