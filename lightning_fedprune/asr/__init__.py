"""ASR part of lightning-fedprune: speech data (synthetic eSpeak NG corpus, LibriSpeech reader,
features) and the Conformer-Transducer task.

Names are imported lazily (PEP 562) so ``import lightning_fedprune.asr`` stays cheap; torchaudio
is only imported when features are computed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_LAZY = {
    # synthetic.py
    "generate_corpus": "synthetic",
    "default_corpus": "synthetic",
    "CorpusConfig": "synthetic",
    "SpeakerProfile": "synthetic",
    "load_corpus_info": "synthetic",
    "cache_root": "synthetic",
    "DIGITS": "synthetic",
    "COMMANDS": "synthetic",
    "VOCABULARIES": "synthetic",
    # librispeech.py
    "Utterance": "librispeech",
    "LibriSpeechIndex": "librispeech",
    "LibriSpeechDataset": "librispeech",
    "scan_librispeech": "librispeech",
    "collate_asr": "librispeech",
    "split_speakers": "librispeech",
    "CorpusFormatError": "librispeech",
    "AudioReadError": "librispeech",
    # features.py
    "FeatureConfig": "features",
    "FeatureCache": "features",
    "FeatureExtractor": "features",
    "SpecAugment": "features",
    "spec_augment": "features",
    "log_mel": "features",
    "load_audio": "features",
    # conformer_transducer.py
    "ConformerTransducer": "conformer_transducer",
    # datamodule.py
    "ASRDataModule": "datamodule",
    "SpeakerDataset": "datamodule",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover
    from .conformer_transducer import ConformerTransducer
    from .datamodule import ASRDataModule, SpeakerDataset
    from .features import (FeatureCache, FeatureConfig, FeatureExtractor, SpecAugment, load_audio, log_mel,
                           spec_augment)
    from .librispeech import (AudioReadError, CorpusFormatError, LibriSpeechDataset, LibriSpeechIndex, Utterance,
                              collate_asr, scan_librispeech, split_speakers)
    from .synthetic import (COMMANDS, DIGITS, VOCABULARIES, CorpusConfig, SpeakerProfile, cache_root,
                            default_corpus, generate_corpus, load_corpus_info)
