"""ASRDataModule: speech in LibriSpeech layout, one federated client per speaker.

The training split(s) are partitioned **by speaker** (``partition="by_key"`` over the dataset's
``partition_keys`` = speaker ids): every speaker is one simulated client, as in the article's
LibriSpeech setup. Validation and test use **held-out speakers** (other splits, or speakers held
back from the training splits with ``heldout_speakers``), evaluated on the global model.

Data source, chosen by ``root``:

* ``root=None`` (default): the embedded synthetic corpus, generated once with eSpeak NG by
  :func:`~lightning_fedprune.asr.synthetic.default_corpus` from ``corpus`` (a
  :class:`~lightning_fedprune.asr.synthetic.CorpusConfig`: vocabulary, speakers, utterances, ...)
  and cached under ``$FEDPRUNE_CACHE`` (default: the user cache directory). Splits ``train``
  (training speakers) and ``test`` (other speakers).
* ``root="/path/to/LibriSpeech"``: a real LibriSpeech (or any LibriSpeech-layout) corpus, e.g.
  ``train_splits=["train-clean-100"]``, ``val_splits=["dev-clean"]``,
  ``test_splits=["test-clean"]``. ``corpus`` is then ignored.

Building the data module only *indexes* the corpus (transcript files and directory listings);
audio is decoded and turned into log-mel features lazily in the datasets' ``__getitem__`` and
cached on disk (``feature_cache_dir``), so the second and later rounds read cached features.

Every argument is a string, number, list, ``None`` or (``corpus``) a block of them, so the module is
configured from YAML::

    data:
      class_path: lightning_fedprune.asr.datamodule.ASRDataModule
      init_args:
        corpus: {vocabulary: digits, num_speakers: 16}
        batch_size: 10
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, Optional

from lightning_fedprune.federated.data import FederatedDataModule
from lightning_fedprune.validation import (
    check_bool,
    check_choice,
    check_int,
    check_path,
    fail,
)

from .features import FeatureConfig
from .librispeech import (
    LibriSpeechDataset,
    LibriSpeechIndex,
    _split_names,
    collate_asr,
    scan_librispeech,
    split_speakers,
)
from .synthetic import CorpusConfig, cache_root, default_corpus

__all__ = ["ASRDataModule", "SpeakerDataset"]


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
        corpus: the generated corpus (``root=None`` only; ignored when ``root`` is given): a
            :class:`~lightning_fedprune.asr.synthetic.CorpusConfig`, in YAML a block of its fields,
            e.g. ``corpus: {vocabulary: commands, num_speakers: 16, utterances_per_speaker: 100}``
            (fields not given keep their defaults: 16 training speakers x 50 utterances of 3-7
            digits, 4 test speakers x 25). Its ``splits`` are the split names to use in
            ``train_splits``/``val_splits``/``test_splits``.
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
        corpus: CorpusConfig = CorpusConfig(),
        cache_dir: Optional[str] = None,
        max_utterances_per_speaker: Optional[int] = None,
        max_eval_utterances_per_speaker: Optional[int] = None,
        min_client_samples: int = 1,
        batch_size: int = 10,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        n_mels: int = 80,
        feature_cache_dir: Optional[str] = None,
        on_error: Literal["warn", "raise"] = "warn",
        check_audio: bool = False,
        rounds_per_epoch: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        # every argument is checked before a corpus is generated or scanned (that can take minutes); `corpus`
        # checked its own fields when it was built, even if `root` is given (where it is ignored): a bad value is a typo
        check_path(root, "root", kind="dir")  # whether it exists is checked when it is scanned
        heldout_speakers = check_int(heldout_speakers, "heldout_speakers", min=0)
        if not isinstance(corpus, CorpusConfig):
            fail("corpus", "a CorpusConfig (in YAML a block of its fields, e.g. {num_speakers: 16})", corpus)
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
        train = _split_names(train_splits, "train_splits")
        val = _split_names(val_splits, "val_splits")
        test = _split_names(test_splits, "test_splits")
        if not train:
            raise ValueError("`train_splits` is empty: name the split(s) whose speakers are the clients.")
        overlap = set(train) & (set(val) | set(test))
        if overlap:
            raise ValueError(
                f"split(s) {sorted(overlap)} are both in `train_splits` and in `val_splits`/`test_splits`: the "
                "held-out speakers would be training clients. Use `heldout_speakers` to hold speakers of a "
                "training split out."
            )

        self.corpus = corpus
        self.features = FeatureConfig(n_mels=n_mels)
        if root is None:
            bad = [s for s in train + val + test if s not in corpus.splits]
            if bad:
                raise ValueError(
                    f"the generated corpus (`root=None`) has the splits {list(corpus.splits)} (`corpus.splits`); "
                    f"got {bad}. Give `root` for a real LibriSpeech corpus."
                )
            if len(corpus.splits) == 2 and corpus.test_speakers == 0 and corpus.splits[1] in val + test:
                raise ValueError(f"`corpus.test_speakers` must be >= 1 when `val_splits`/`test_splits` use the "
                                 f"split {corpus.splits[1]!r}, got 0.")
            self.corpus_root = default_corpus(corpus, cache_dir=cache_dir, progress=False)
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
