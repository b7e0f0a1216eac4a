"""Speech data: synthetic eSpeak NG corpus, LibriSpeech reader, features."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("soundfile")
pytest.importorskip("torchaudio")
pytest.importorskip("espeakng_loader")

import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from lightning_fedprune.asr import features as F  # noqa: E402
from lightning_fedprune.asr import synthetic as S  # noqa: E402
from lightning_fedprune.asr.features import FeatureCache, FeatureConfig, SpecAugment, log_mel  # noqa: E402
from lightning_fedprune.asr.librispeech import (  # noqa: E402
    AudioReadError,
    CorpusFormatError,
    LibriSpeechDataset,
    collate_asr,
    scan_librispeech,
    split_speakers,
)

TINY = S.CorpusConfig(num_speakers=4, utterances_per_speaker=5, test_speakers=2, test_utterances_per_speaker=3, seed=0)




@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "corpus"
    return S.generate_corpus(root, TINY, progress=False)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (p.suffix == ".flac" or p.name.endswith(".trans.txt"))
    }


def _copy_split(corpus: Path, dst: Path, split: str = "train") -> Path:
    shutil.copytree(corpus / split, dst / split)
    return dst


# --------------------------------------------------------------------------------------
# generator
# --------------------------------------------------------------------------------------


def test_layout_and_transcripts(corpus: Path):
    flacs = sorted(corpus.rglob("*.flac"))
    assert len(flacs) == 4 * 5 + 2 * 3
    pat = re.compile(r"^(train|test)/(\d+)/(\d+)/\2-\3-(\d{4})\.flac$")
    for f in flacs:
        assert pat.match(str(f.relative_to(corpus)).replace(os.sep, "/")), f
    trans = sorted(corpus.rglob("*.trans.txt"))
    assert len(trans) == 6
    for t in trans:
        spk, chap = t.parent.parent.name, t.parent.name
        assert t.name == f"{spk}-{chap}.trans.txt"
        lines = t.read_text().splitlines()
        for line in lines:
            utt, text = line.split(" ", 1)
            assert (t.parent / f"{utt}.flac").is_file()
            words = text.split()
            assert 3 <= len(words) <= 7 and all(w in S.DIGITS for w in words) and text == text.upper()
    info = sf.info(str(flacs[0]))
    assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
    assert 0.5 < info.duration < 6.0
    meta = S.load_corpus_info(corpus)
    assert meta["config"]["num_speakers"] == 4 and meta["splits"]["train"]["utterances"] == 20
    assert (corpus / "SPEAKERS.TXT").read_text().count("| train") == 4


def test_train_and_test_speakers_differ(corpus: Path):
    train = {d.name for d in (corpus / "train").iterdir()}
    test = {d.name for d in (corpus / "test").iterdir()}
    assert len(train) == 4 and len(test) == 2 and not train & test
    spk = S.load_corpus_info(corpus)["speakers"]
    combos = {(s["voice"], s["variant"]) for s in spk}
    assert len(combos) == len(spk) == 6  # every speaker is a different voice+variant


def test_generation_is_deterministic(corpus: Path, tmp_path: Path):
    # same seed, fewer speakers/utterances: identical bytes for what both contain (a speaker's
    # audio does not depend on the other speakers or on the generation order)
    fewer = replace(TINY, num_speakers=2, utterances_per_speaker=2, test_speakers=0)
    again = S.generate_corpus(tmp_path / "again", fewer, progress=False)
    a, b = _hashes(corpus), _hashes(again)
    flacs = [k for k in b if k.endswith(".flac")]
    assert len(flacs) == 4 and all(a[k] == b[k] for k in flacs)
    other = S.generate_corpus(tmp_path / "other", replace(fewer, seed=1), progress=False)
    c = _hashes(other)
    assert len(c) == len(b) and not set(c.values()) & set(b.values())


def test_espeak_engine_reset_per_instance():
    e1 = S._CtypesEngine()
    try:
        first = e1.synthesize("one two", "en+f2", 170, 50, seed=7)
        second = e1.synthesize("one two", "en+f2", 170, 50, seed=7)
    finally:
        e1.close()
    e2 = S._CtypesEngine()
    try:
        fresh = e2.synthesize("one two", "en+f2", 170, 50, seed=7)
        with pytest.raises(ValueError, match="voice"):
            e2.synthesize("one", "no-such-voice", 170, 50, seed=0)
    finally:
        e2.close()
    assert first.size > 10000 and first.tobytes() == fresh.tobytes()
    # libespeak-ng carries state between calls: that is why every speaker gets a fresh instance
    assert second.size > 0


def test_commands_vocabulary(tmp_path: Path):
    commands = S.CorpusConfig(vocabulary="commands", num_speakers=1, utterances_per_speaker=4, test_speakers=0,
                              splits=("train",))
    root = S.generate_corpus(tmp_path / "cmd", commands, progress=False)
    idx = scan_librispeech(root, "train")
    assert len(idx) == 4 and len(S.COMMANDS) == 50
    for u in idx:
        words = u.transcript.split()
        assert 1 <= len(words) <= 4 and all(w in S.COMMANDS for w in words)
    with pytest.raises(ValueError, match="vocabulary"):
        S.CorpusConfig(vocabulary="nope")
    with pytest.raises(FileExistsError):
        S.generate_corpus(root, replace(commands, utterances_per_speaker=1), progress=False)


def test_default_corpus_is_cached(tmp_path: Path, monkeypatch):
    small = S.CorpusConfig(num_speakers=1, utterances_per_speaker=2, test_speakers=1, test_utterances_per_speaker=1)
    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path / "envcache"))
    calls = []
    real = S._generate
    monkeypatch.setattr(S, "_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    p1 = S.default_corpus(small, progress=False)
    assert p1.parent == tmp_path / "envcache" / "corpora" and (p1 / "corpus.json").is_file()
    t = time.perf_counter()
    p2 = S.default_corpus(small, progress=False)
    assert p2 == p1 and len(calls) == 1 and time.perf_counter() - t < 1.0
    assert not list(p1.parent.glob(".tmp-*"))
    # explicit cache_dir wins over the env var; another config is another corpus
    p3 = S.default_corpus(replace(small, seed=3), cache_dir=tmp_path / "explicit", progress=False)
    assert p3.parent == tmp_path / "explicit" / "corpora" and p3.name != p1.name and len(calls) == 2


def test_default_corpus_interrupted_leaves_nothing(tmp_path: Path, monkeypatch):
    def boom(root, cfg, **kw):
        (root / "train").mkdir(parents=True)
        (root / "train" / "partial").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "_generate", boom)
    with pytest.raises(KeyboardInterrupt):
        S.default_corpus(S.CorpusConfig(num_speakers=1, utterances_per_speaker=1), cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "corpora").iterdir()) == []
    # leftovers of a dead process are removed by the next run
    stale = tmp_path / "corpora" / ".tmp-synth-digits-x-999999999-abcd"
    stale.mkdir()
    monkeypatch.setattr(S, "_generate", lambda root, cfg, **kw: (root.mkdir(), (root / "corpus.json").write_text("{}")))
    S.default_corpus(S.CorpusConfig(num_speakers=1, utterances_per_speaker=1), cache_dir=tmp_path, progress=False)
    assert not stale.exists()


def test_corpus_config_is_normalised_and_checked(tmp_path: Path):
    # equal settings written differently (int vs float, list vs tuple) are one corpus: one cache key
    written = S.CorpusConfig(noise_snr_db=40, word_alpha=1, splits=["train", "test"])
    assert written == S.CorpusConfig(word_alpha=1.0) and written.key("e") == S.CorpusConfig(word_alpha=1.0).key("e")
    assert isinstance(written.noise_snr_db, float) and written.splits == ("train", "test")
    with pytest.raises(ValueError, match=r"^`config` must be a CorpusConfig.*got \{'num_speakers': 1\} \(a dict\)\.$"):
        S.generate_corpus(tmp_path / "x", {"num_speakers": 1})
    with pytest.raises(ValueError, match=r"^`cache_dir` is an existing file"):
        S.default_corpus(cache_dir=Path(__file__))
    with pytest.raises(ValueError, match=r"^`backend` must be one of \('auto', 'ctypes', 'cli'\), got 'espeak'\.$"):
        S.generate_corpus(tmp_path / "x", backend="espeak", progress=False)
    assert not (tmp_path / "x").exists()  # nothing is written before the arguments are checked


# --------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------


def test_scan_reads_layout(corpus: Path):
    idx = scan_librispeech(corpus, "train")
    assert len(idx) == 20 and len(idx.speakers) == 4 and idx.speakers == sorted(idx.speakers, key=int)
    for u in idx:
        assert u.path.is_file() and u.path.name == f"{u.id}.flac" and u.split == "train"
        assert u.id.startswith(f"{u.speaker}-{u.chapter}-")
        line = next(x for x in (u.path.parent / f"{u.speaker}-{u.chapter}.trans.txt").read_text().splitlines()
                    if x.startswith(u.id + " "))  # fmt: skip
        assert line == f"{u.id} {u.transcript}" and u.text == u.transcript.lower()
    both = scan_librispeech(corpus, ["train", "test"])
    assert len(both) == 26 and [u.split for u in both] == ["train"] * 20 + ["test"] * 6
    assert len(both.speakers) == 6 and set(both.by_speaker()) == set(both.speakers)


def test_scan_accepts_librispeech_parent_dir(corpus: Path, tmp_path: Path):
    _copy_split(corpus, tmp_path / "LibriSpeech", "test")
    assert len(scan_librispeech(tmp_path, "test")) == 6


def test_scan_errors(corpus: Path, tmp_path: Path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        scan_librispeech(missing, "train")
    with pytest.raises(FileNotFoundError, match="dev-clean"):
        scan_librispeech(corpus, ["train", "dev-clean"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusFormatError, match="empty"):
        scan_librispeech(tmp_path, "empty")
    with pytest.raises(ValueError, match=r"^`on_error` must be one of \('warn', 'raise'\), got 'ignore'\.$"):
        scan_librispeech(corpus, "train", on_error="ignore")
    with pytest.raises(ValueError, match=r"^`splits` must be a split name or a non-empty list of split names, got \[\]"):
        scan_librispeech(corpus, [])
    with pytest.raises(ValueError, match=r"^`splits` lists a split twice: \['train', 'train'\]$"):
        scan_librispeech(corpus, ["train", "train"])
    with pytest.raises(ValueError, match=r"^`splits\[1\]` must be a non-empty string, got 3\.$"):
        scan_librispeech(corpus, ["train", 3])
    with pytest.raises(ValueError, match=r"^`root` must be a path \(str\), got 5\.$"):
        scan_librispeech(5, "train")
    with pytest.raises(ValueError, match=r"^`check_audio` must be a bool.*got 'yes' \(a str\)\.$"):
        scan_librispeech(corpus, "train", check_audio="yes")


def test_dataset_and_split_speakers_check_their_arguments(corpus: Path):
    with pytest.raises(ValueError, match=r"^`features` must be a FeatureConfig, got \{'n_mels': 40\} \(a dict\)\.$"):
        LibriSpeechDataset(corpus, "train", features={"n_mels": 40})
    with pytest.raises(ValueError, match=r"^`max_utterances_per_speaker` must be a positive integer or None, got 0\.$"):
        LibriSpeechDataset(corpus, "train", max_utterances_per_speaker=0)
    with pytest.raises(ValueError, match=r"^`index` must be a LibriSpeechIndex or None, got \[\] \(a list\)\.$"):
        LibriSpeechDataset(index=[])
    with pytest.raises(ValueError, match=r"^give `root` and `splits` \(or a prebuilt `index`\), got root=None"):
        LibriSpeechDataset(splits="train")
    with pytest.raises(ValueError, match=r"^`num_heldout` must be an integer in \[0, 2\], got 3\.$"):
        split_speakers(["1", "2"], 3)


def test_transcript_line_without_audio(corpus: Path, tmp_path: Path):
    root = _copy_split(corpus, tmp_path)
    victim = sorted(root.rglob("*.flac"))[3]
    victim.unlink()
    with pytest.warns(RuntimeWarning, match=re.escape(victim.stem)):
        idx = scan_librispeech(root, "train", on_error="warn")
    assert len(idx) == 19 and victim.stem not in {u.id for u in idx}
    with pytest.raises(CorpusFormatError, match=re.escape(victim.stem)):
        scan_librispeech(root, "train", on_error="raise")


def test_corrupt_audio_warn_vs_raise(corpus: Path, tmp_path: Path):
    root = _copy_split(corpus, tmp_path)
    victim = sorted(root.rglob("*.flac"))[0]
    victim.write_bytes(b"this is not a flac file" * 10)
    # at scan time (header check) ...
    with pytest.warns(RuntimeWarning, match=re.escape(str(victim))):
        assert len(scan_librispeech(root, "train", check_audio=True)) == 19
    with pytest.raises(AudioReadError, match=re.escape(str(victim))):
        scan_librispeech(root, "train", check_audio=True, on_error="raise")
    # ... or lazily in __getitem__
    ds = LibriSpeechDataset(root, "train", on_error="warn")
    i = next(k for k, u in enumerate(ds.utterances) if u.path == victim)
    with pytest.warns(RuntimeWarning, match=re.escape(str(victim))):
        assert ds[i] is None
    batch = collate_asr([ds[i + 1], None])
    assert batch["features"].shape[0] == 1 and collate_asr([None]) is None
    with pytest.raises(AudioReadError, match=re.escape(str(victim))):
        LibriSpeechDataset(root, "train", on_error="raise")[i]


# --------------------------------------------------------------------------------------
# dataset / collate
# --------------------------------------------------------------------------------------


def test_dataset_items_and_speakers(corpus: Path, monkeypatch):
    ds = LibriSpeechDataset(corpus, ["train", "test"])
    assert len(ds) == 26 and ds.speakers == sorted(set(ds.speaker_ids), key=int)

    def no_audio(*a, **k):
        raise AssertionError("partitioning must not read audio")

    monkeypatch.setattr(F, "load_audio", no_audio)
    monkeypatch.setattr(sf, "read", no_audio)
    by_spk = ds.indices_by_speaker()
    assert sum(len(v) for v in by_spk.values()) == 26
    assert all(ds.speaker_of(i) == s for s, idx in by_spk.items() for i in idx)
    train, held = split_speakers(ds.speakers, 2, seed=0)
    assert not set(train) & set(held) and len(held) == 2 and split_speakers(ds.speakers, 2, seed=0) == (train, held)
    monkeypatch.undo()

    sub = LibriSpeechDataset(corpus, "train", speakers=[ds.speakers[1]], max_utterances=3)
    assert len(sub) == 3 and sub.speakers == [ds.speakers[1]]
    item = sub[0]
    assert set(item) == {"features", "text", "speaker", "id"}
    assert item["features"].dtype == torch.float32 and item["features"].shape[1] == 80
    assert item["text"] == sub.utterances[0].transcript.lower() and item["speaker"] == ds.speakers[1]
    with pytest.raises(ValueError, match="999"):
        LibriSpeechDataset(corpus, "train", speakers=["999"])
    per = LibriSpeechDataset(corpus, "train", max_utterances_per_speaker=2)
    assert len(per) == 8 and all(len(v) == 2 for v in per.indices_by_speaker().values())


def test_collate_pads(corpus: Path):
    ds = LibriSpeechDataset(corpus, "train", max_utterances=4)
    items = [ds[i] for i in range(4)]
    b = collate_asr(items)
    lengths = [it["features"].shape[0] for it in items]
    assert b["features"].shape == (4, max(lengths), 80) and b["features"].dtype == torch.float32
    assert b["feature_lengths"].tolist() == lengths and b["feature_lengths"].dtype == torch.long
    for k, it in enumerate(items):
        assert torch.equal(b["features"][k, : lengths[k]], it["features"])
        assert (b["features"][k, lengths[k]:] == 0).all()
    assert b["texts"] == [it["text"] for it in items] and b["ids"] == [it["id"] for it in items]
    assert b["speakers"] == [it["speaker"] for it in items]


# --------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------


def test_log_mel_shape_and_normalisation():
    cfg = FeatureConfig()
    assert (cfg.win_length, cfg.hop_length, cfg.fft_size) == (400, 160, 512)
    g = torch.Generator().manual_seed(0)
    wav = torch.randn(16000 * 2, generator=g) * 0.1
    feats = log_mel(wav, 16000, cfg)
    assert feats.shape == (201, 80) == (cfg.num_frames(32000), cfg.n_mels)  # ~100 frames/s
    assert feats.mean(0).abs().max() < 1e-4 and (feats.std(0, unbiased=False) - 1).abs().max() < 1e-3
    # other sample rates are resampled first; stereo is mixed down
    f22 = log_mel(torch.randn(2, 22050, generator=g), 22050, cfg)
    assert f22.shape == (101, 80)
    raw = log_mel(wav, 16000, FeatureConfig(n_mels=40, normalize=False))
    norm = log_mel(wav, 16000, FeatureConfig(n_mels=40))
    assert raw.shape == norm.shape == (201, 40)
    expected = (raw - raw.mean(0)) / (raw.std(0, unbiased=False) + 1e-5)
    assert torch.allclose(expected, norm, atol=1e-4) and not torch.allclose(raw, norm, atol=1e-1)
    assert FeatureConfig().hash() == FeatureConfig().hash() != FeatureConfig(n_mels=40).hash()


def test_feature_config_checks_and_keeps_its_cache_key():
    # the key of the default features before the checks used the shared helpers: existing caches stay valid
    assert FeatureConfig().hash() == "b0dd08bc133ee5ad"
    assert FeatureConfig(n_mels=80, win_ms=25, normalize=True).hash() == FeatureConfig().hash()  # 25 == 25.0
    for kwargs, message in [
        (dict(n_mels=0), "`n_mels` must be a positive integer, got 0."),
        (dict(sample_rate=16000.0), "`sample_rate` must be a positive integer, got 16000.0."),
        (dict(win_ms=-25), "`win_ms` must be a finite number > 0, got -25."),
        (dict(hop_ms=0.01), "`win_ms` (25) and `hop_ms` (0.01) must each be at least one sample at `sample_rate` "
                            "16000 Hz."),
        (dict(n_fft=256), "`n_fft` (256) must be >= the window length (400 samples: `win_ms` 25 at 16000 Hz), or None."),
        (dict(f_max=9000), "need `f_min` (0) < `f_max` (9000.0) <= the Nyquist frequency (8000 Hz at `sample_rate` "
                           "16000); `f_max=None` = Nyquist."),
        (dict(f_min=8000), "need `f_min` (8000) < `f_max` (None) <= the Nyquist frequency (8000 Hz at `sample_rate` "
                           "16000); `f_max=None` = Nyquist."),
        (dict(log_offset=0), "`log_offset` must be a finite number > 0, got 0."),
        (dict(normalize="no"), "`normalize` must be a bool (True or False), got 'no' (a str)."),
    ]:
        with pytest.raises(ValueError) as info:
            FeatureConfig(**kwargs)
        assert str(info.value) == message, kwargs


def test_feature_cache_hits(corpus: Path, tmp_path: Path):
    root = _copy_split(corpus, tmp_path / "c")
    ds = LibriSpeechDataset(root, "train", cache_dir=tmp_path / "feats", max_utterances=3)
    first = [ds[i]["features"] for i in range(3)]
    assert (ds.cache.hits, ds.cache.misses) == (0, 3)
    second = [ds[i]["features"] for i in range(3)]
    assert (ds.cache.hits, ds.cache.misses) == (3, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # a fresh dataset (another process) hits the same on-disk entries
    ds2 = LibriSpeechDataset(root, "train", cache_dir=tmp_path / "feats", max_utterances=3)
    ds2[0]
    assert (ds2.cache.hits, ds2.cache.misses) == (1, 0)
    # a changed file (mtime/size) or another feature config is a miss
    p = ds2.utterances[0].path
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ds2[0]
    assert ds2.cache.misses == 1
    ds3 = LibriSpeechDataset(root, "train", cache_dir=tmp_path / "feats", max_utterances=1,
                             features=FeatureConfig(n_mels=40))  # fmt: skip
    assert ds3[0]["features"].shape[1] == 40 and ds3.cache.misses == 1
    assert not list((tmp_path / "feats").rglob(".tmp-*"))
    assert isinstance(FeatureCache(tmp_path / "feats").get(p), torch.Tensor)


def test_spec_augment():
    x = torch.randn(3, 100, 80) + 5.0
    lengths = torch.tensor([100, 60, 30])
    aug = SpecAugment(freq_masks=2, freq_width=10, time_masks=2, time_width=0.1)
    a = aug(x, lengths, generator=torch.Generator().manual_seed(1))
    b = aug(x, lengths, generator=torch.Generator().manual_seed(1))
    c = aug(x, lengths, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    masked = a == 0
    assert masked.any()
    # time masks stay inside the valid frames: padding rows only get frequency masks
    full_time_rows = masked.all(dim=-1)  # (B, T)
    assert not full_time_rows[1, 60:].any() and not full_time_rows[2, 30:].any()
    assert masked.float().mean() < 0.5
    aug.eval()
    assert aug(x, lengths) is x
    single = F.spec_augment(x[0], generator=torch.Generator().manual_seed(0), time_width=5)
    assert single.shape == (100, 80)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng program not installed")
def test_cli_fallback_backend(tmp_path: Path):
    one = S.CorpusConfig(num_speakers=1, utterances_per_speaker=2, test_speakers=0, splits=("train",))
    a = S.generate_corpus(tmp_path / "a", one, backend="cli", progress=False)
    b = S.generate_corpus(tmp_path / "b", one, backend="cli", progress=False)
    assert _hashes(a) == _hashes(b) and len(scan_librispeech(a, "train")) == 2
    assert S.load_corpus_info(a)["engine"]["backend"] == "cli"
    assert sf.info(str(next(a.rglob("*.flac")))).samplerate == 16000
