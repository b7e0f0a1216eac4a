"""ASRDataModule: speech in LibriSpeech layout, one federated client per speaker.

The training split(s) are partitioned **by speaker** (``partition="by_key"`` over the dataset's
``partition_keys`` = speaker ids): every speaker is one simulated client, as in the article's
LibriSpeech setup. Validation and test use **held-out speakers** (other splits, or speakers held
back from the training splits with ``heldout_speakers``), evaluated on the global model.

Data source, chosen by ``root``:

* ``root=None`` (default): the embedded synthetic corpus, generated once with eSpeak NG by
  :func:`~lightning_fedprune.asr.synthetic.default_corpus` from the generator settings
  (``vocabulary``, ``num_speakers``, ``utterances_per_speaker``, ``test_speakers``, ...) and
  cached under ``$FEDPRUNE_CACHE`` (default: the user cache directory). Splits ``train``
  (training speakers) and ``test`` (other speakers).
* ``root="/path/to/LibriSpeech"``: a real LibriSpeech (or any LibriSpeech-layout) corpus, e.g.
  ``train_splits=["train-clean-100"]``, ``val_splits=["dev-clean"]``,
  ``test_splits=["test-clean"]``. The generator settings are ignored.

Building the data module only *indexes* the corpus (transcript files and directory listings);
audio is decoded and turned into log-mel features lazily in the datasets' ``__getitem__`` and
cached on disk (``feature_cache_dir``), so the second and later rounds read cached features.

Every argument is a string, number, list or ``None``, so the module is configured from YAML::

    data:
      class_path: lightning_fedprune.asr.datamodule.ASRDataModule
      init_args: {vocabulary: digits, num_speakers: 16, batch_size: 10}
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

from lightning_fedprune.data import FederatedDataModule
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

from .features import FeatureConfig
from .librispeech import LibriSpeechDataset, LibriSpeechIndex, collate_asr, scan_librispeech, split_speakers
from .synthetic import VOCABULARIES, cache_root, default_corpus

__all__ = ["ASRDataModule", "SpeakerDataset"]

SYNTHETIC_SPLITS = ("train", "test")


def _as_list(value, name: str) -> list[str]:
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


class SpeakerDataset(LibriSpeechDataset):
    """A :class:`LibriSpeechDataset` whose ``partition_keys`` are the speaker ids (no audio is read),
    so :class:`~lightning_fedprune.FederatedDataModule` with ``partition="by_key"`` makes one client
    per speaker."""

    @property
    def partition_keys(self) -> list[str]:
        return self.speaker_ids


class ASRDataModule(FederatedDataModule):
    """Federated speech data: one client per speaker of the training split(s).

    Args:
        root: LibriSpeech root (the directory holding ``train-clean-100/`` etc., or the one
            holding ``LibriSpeech/``). ``None`` = the generated default corpus (see below).
        train_splits: split(s) whose speakers are the clients (real LibriSpeech:
            ``["train-clean-100"]``; the generated corpus: ``["train"]``).
        val_splits: split(s) of held-out speakers for validation on the global model (``[]`` =
            none). Real LibriSpeech: ``["dev-clean"]``.
        test_splits: split(s) of held-out speakers for ``fedprune test`` (``[]`` = none). Real
            LibriSpeech: ``["test-clean"]``.
        heldout_speakers: hold this many speakers of the training splits out of training
            (chosen by ``seed``) and add them to the validation set -- for corpora without a
            separate held-out split.
        vocabulary: generated corpus only (as every argument down to ``noise_snr_db``; ignored
            when ``root`` is given): ``"digits"`` (ZERO..NINE, 3-7 words per utterance) or
            ``"commands"`` (50 command words, 1-4 words per utterance).
        num_speakers: training speakers (= clients) of the generated corpus.
        utterances_per_speaker: utterances of every training speaker.
        test_speakers: held-out speakers of the generated corpus (split ``test``).
        test_utterances_per_speaker: utterances of every held-out speaker.
        corpus_seed: seed of the generated corpus (speakers' voices, transcripts, noise); separate
            from ``seed`` so changing the training seed does not regenerate the corpus.
        min_words, max_words: words per utterance (``None`` = the vocabulary's default range).
        word_alpha: if set, every speaker draws words from its own Dirichlet(``word_alpha``)
            preferences (label skew across clients); ``None`` = uniform words.
        noise_snr_db: white noise floor added to the synthetic audio (``None`` = none).
        cache_dir: where the generated corpus (and, by default, the feature cache) lives;
            ``None`` = ``$FEDPRUNE_CACHE`` or the user cache directory.
        max_utterances_per_speaker: use at most this many utterances of every training speaker.
        max_eval_utterances_per_speaker: the same cap for the validation and test speakers
            (validation costs time; dev-clean has ~68 utterances per speaker).
        min_client_samples: speakers with fewer training utterances are not sampled (reported).
        batch_size: client (local) batch size.
        eval_batch_size: validation/test batch size (``None`` = ``batch_size``).
        num_workers: DataLoader worker processes for validation/test (client loaders run in
            the client's process and use none).
        n_mels: feature dimension (must equal the task's ``n_mels``).
        feature_cache_dir: on-disk feature cache; ``None`` = ``<cache_dir>/features``;
            ``"none"`` disables the cache (features are recomputed every time they are read).
        on_error: ``"warn"`` (skip unreadable utterances with a warning naming the file) or
            ``"raise"``.
        check_audio: read every audio header while indexing (slower; catches corrupt files up front).
        rounds_per_epoch: see :class:`~lightning_fedprune.FederatedDataModule`.
        seed: seed of the held-out speaker choice and of the partition bookkeeping.
    """

    def __init__(
        self,
        root: Optional[str] = None,
        train_splits: list[str] = ["train"],  # noqa: B006 (jsonargparse needs the literal default)
        val_splits: Optional[list[str]] = ["test"],  # noqa: B006
        test_splits: Optional[list[str]] = ["test"],  # noqa: B006
        heldout_speakers: int = 0,
        vocabulary: str = "digits",
        num_speakers: int = 16,
        utterances_per_speaker: int = 50,
        test_speakers: int = 4,
        test_utterances_per_speaker: int = 25,
        corpus_seed: int = 0,
        min_words: Optional[int] = None,
        max_words: Optional[int] = None,
        word_alpha: Optional[float] = None,
        noise_snr_db: Optional[float] = 40.0,
        cache_dir: Optional[str] = None,
        max_utterances_per_speaker: Optional[int] = None,
        max_eval_utterances_per_speaker: Optional[int] = None,
        min_client_samples: int = 1,
        batch_size: int = 10,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        n_mels: int = 80,
        feature_cache_dir: Optional[str] = None,
        on_error: str = "warn",
        check_audio: bool = False,
        rounds_per_epoch: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        # every argument is checked before a corpus is generated or scanned (that can take minutes); the
        # generator settings are checked even with `root` given (where they are ignored): a bad value is a typo
        check_path(root, "root", kind="dir")  # whether it exists is checked when it is scanned
        heldout_speakers = check_int(heldout_speakers, "heldout_speakers", min=0)
        check_str(vocabulary, "vocabulary")
        num_speakers = check_int(num_speakers, "num_speakers", min=1)
        utterances_per_speaker = check_int(utterances_per_speaker, "utterances_per_speaker", min=1, max=9999)
        test_speakers = check_int(test_speakers, "test_speakers", min=0)
        test_utterances_per_speaker = check_int(test_utterances_per_speaker, "test_utterances_per_speaker", min=1,
                                                max=9999)
        corpus_seed = check_int(corpus_seed, "corpus_seed")
        min_words = check_int(min_words, "min_words", min=1, optional=True)
        max_words = check_int(max_words, "max_words", min=1, optional=True)
        if min_words is not None and max_words is not None and max_words < min_words:
            raise ValueError(f"`max_words` ({max_words}) must be >= `min_words` ({min_words}).")
        word_alpha = check_float(word_alpha, "word_alpha", min=0, min_open=True, optional=True)
        noise_snr_db = check_float(noise_snr_db, "noise_snr_db", optional=True)
        check_path(cache_dir, "cache_dir", kind="dir")
        check_int(max_utterances_per_speaker, "max_utterances_per_speaker", min=1, optional=True)
        check_int(max_eval_utterances_per_speaker, "max_eval_utterances_per_speaker", min=1, optional=True)
        check_int(min_client_samples, "min_client_samples", min=1)
        check_int(batch_size, "batch_size", min=1)
        check_int(eval_batch_size, "eval_batch_size", min=1, optional=True)
        num_workers = check_int(num_workers, "num_workers", min=0)
        n_mels = check_int(n_mels, "n_mels", min=1)
        check_path(feature_cache_dir, "feature_cache_dir", kind="dir")
        check_choice(on_error, "on_error", ("warn", "raise"))
        self.check_audio = check_bool(check_audio, "check_audio")
        check_int(rounds_per_epoch, "rounds_per_epoch", min=1, optional=True)
        check_int(seed, "seed")
        train = _as_list(train_splits, "train_splits")
        val = _as_list(val_splits, "val_splits")
        test = _as_list(test_splits, "test_splits")
        if not train:
            raise ValueError("`train_splits` is empty: name the split(s) whose speakers are the clients.")
        overlap = set(train) & (set(val) | set(test))
        if overlap:
            raise ValueError(
                f"split(s) {sorted(overlap)} are both in `train_splits` and in `val_splits`/`test_splits`: the "
                "held-out speakers would be training clients. Use `heldout_speakers` to hold speakers of a "
                "training split out."
            )

        self.vocabulary = vocabulary
        self.features = FeatureConfig(n_mels=n_mels)
        if root is None:
            check_choice(vocabulary, "vocabulary", sorted(VOCABULARIES))
            bad = [s for s in train + val + test if s not in SYNTHETIC_SPLITS]
            if bad:
                raise ValueError(
                    f"the generated corpus (`root=None`) has the splits {list(SYNTHETIC_SPLITS)}; got {bad}. "
                    "Give `root` for a real LibriSpeech corpus."
                )
            if ("test" in val + test) and test_speakers < 1:
                raise ValueError("`test_speakers` must be >= 1 when `val_splits`/`test_splits` use the 'test' split.")
            corpus = default_corpus(
                vocabulary, num_speakers=num_speakers, utterances_per_speaker=utterances_per_speaker,
                test_speakers=test_speakers, test_utterances_per_speaker=test_utterances_per_speaker,
                seed=corpus_seed, splits=SYNTHETIC_SPLITS if test_speakers > 0 else SYNTHETIC_SPLITS[:1],
                min_words=min_words, max_words=max_words, word_alpha=word_alpha, noise_snr_db=noise_snr_db,
                cache_dir=cache_dir, progress=False,
            )  # fmt: skip
            self.corpus_root = Path(corpus)
        else:
            self.corpus_root = Path(root).expanduser()

        if feature_cache_dir is None:
            self.feature_cache_dir: Optional[Path] = cache_root(cache_dir) / "features"
        elif str(feature_cache_dir).lower() == "none":
            self.feature_cache_dir = None
        else:
            self.feature_cache_dir = Path(feature_cache_dir).expanduser()

        self.on_error = on_error
        train_index = self._scan(train, "train_splits")
        heldout: list[str] = []
        if heldout_speakers:
            if heldout_speakers >= len(train_index.speakers):
                raise ValueError(
                    f"`heldout_speakers` ({heldout_speakers}) must leave at least one of the "
                    f"{len(train_index.speakers)} training speakers."
                )
            kept, heldout = split_speakers(train_index.speakers, heldout_speakers, seed=seed)
            heldout_index = train_index.filter(heldout, max_utterances_per_speaker=max_eval_utterances_per_speaker)
            train_index = train_index.filter(kept)
        train_ds = self._dataset(train_index, max_utterances_per_speaker)
        val_ds = None
        if val or heldout:
            utts = list(self._scan(val, "val_splits")) if val else []
            if heldout:
                utts += list(heldout_index)
            val_ds = self._dataset(LibriSpeechIndex(utts, self.corpus_root, val + (["heldout"] if heldout else [])),
                                   max_eval_utterances_per_speaker)
        test_ds = self._dataset(self._scan(test, "test_splits"), max_eval_utterances_per_speaker) if test else None

        self.train_splits, self.val_splits, self.test_splits = train, val, test
        self.heldout_speaker_ids = heldout
        self.num_workers = num_workers
        super().__init__(
            train_dataset=train_ds, val_dataset=val_ds, test_dataset=test_ds, partition="by_key", num_clients=None,
            batch_size=batch_size, eval_batch_size=eval_batch_size, min_client_samples=min_client_samples,
            rounds_per_epoch=rounds_per_epoch, collate_fn=collate_asr, seed=seed,
        )  # fmt: skip
        train_spk = set(train_ds.speakers)
        for name, ds in (("val_splits", val_ds), ("test_splits", test_ds)):
            shared = train_spk & set(ds.speakers) if ds is not None else set()
            if shared:
                warnings.warn(
                    f"{len(shared)} speaker(s) of `{name}` are also training clients ({sorted(shared)[:5]}...): "
                    "the evaluation is not on held-out speakers.",
                    stacklevel=2,
                )

    # ------------------------------------------------------------------ building
    def _scan(self, splits: list[str], arg: str) -> LibriSpeechIndex:
        root = self.corpus_root
        if not root.is_dir():
            what = "does not exist" if not root.exists() else "is not a directory"
            raise FileNotFoundError(
                f"ASRDataModule: `root`={str(root)!r} {what}. Give the LibriSpeech directory (the one holding "
                "train-clean-100/, dev-clean/, ... or LibriSpeech/), or `root: null` for the generated corpus."
            )
        try:
            return scan_librispeech(root, splits, on_error=self.on_error, check_audio=self.check_audio)
        except (FileNotFoundError, NotADirectoryError, ValueError) as err:
            raise type(err)(f"ASRDataModule `{arg}`={splits} under `root`={str(root)!r}: {err}") from err

    def _dataset(self, index: LibriSpeechIndex, cap: Optional[int]) -> SpeakerDataset:
        return SpeakerDataset(index=index, features=self.features, cache_dir=self.feature_cache_dir,
                                  on_error=self.on_error, max_utterances_per_speaker=cap)

    # ------------------------------------------------------------------ speakers
    @property
    def speakers(self) -> list[str]:
        """Training speakers, one per client, in client-id order."""
        self.partitions  # noqa: B018 (builds client_keys)
        return [str(k) for k in self.client_keys]

    @property
    def val_speakers(self) -> list[str]:
        return list(self.val_dataset.speakers) if self.val_dataset is not None else []

    @property
    def test_speakers(self) -> list[str]:
        return list(self.test_dataset.speakers) if self.test_dataset is not None else []

    def client_of_speaker(self, speaker: str) -> int:
        return self.speakers.index(str(speaker))

    def describe(self) -> str:
        ds = self.train_dataset
        sizes = self.client_sizes
        return (f"ASRDataModule({self.corpus_root}: {len(ds)} training utterances of {len(sizes)} speaker-clients "
                f"({min(sizes)}-{max(sizes)} each) from {self.train_splits}; "
                f"validation {len(self.val_dataset) if self.val_dataset is not None else 0} utterances of "
                f"{len(self.val_speakers)} held-out speakers; n_mels={self.features.n_mels})")

    def setup(self, stage: str) -> None:
        if stage == "fit":
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(self.describe())

    # ------------------------------------------------------------------ loaders
    def _eval_loader(self, ds):
        if ds is None:
            return []
        from torch.utils.data import DataLoader

        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate_fn,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
