"""The ASR job: ASRDataModule (one client per speaker) and the smoke config end to end through the CLI."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("soundfile")
pytest.importorskip("torchaudio")
pytest.importorskip("espeakng_loader")

import torch  # noqa: E402
import yaml  # noqa: E402

from lightning_fedprune.asr import features as F  # noqa: E402
from lightning_fedprune.asr import synthetic as S  # noqa: E402
from lightning_fedprune.asr.datamodule import ASRDataModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "examples" / "asr" / "smoke.yaml"
MAIN = REPO / "examples" / "asr" / "digits_fp.yaml"
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
CORPUS = S.CorpusConfig(num_speakers=4, utterances_per_speaker=3, test_speakers=2, test_utterances_per_speaker=2,
                        min_words=1, max_words=2)
TINY = dict(corpus=CORPUS, n_mels=20)




@pytest.fixture(scope="session")
def asr_cache(tmp_path_factory) -> Path:
    """One corpus/feature cache for the whole session (``FEDPRUNE_CACHE``): generated once."""
    cache = tmp_path_factory.mktemp("fedprune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDPRUNE_CACHE", str(cache))
        yield cache


def _no_generation(*args, **kwargs):
    raise AssertionError("the cached corpus should have been reused, not regenerated")


# ----------------------------------------------------------------------------- data module
def test_partition_by_speaker(asr_cache):
    dm = ASRDataModule(**TINY, batch_size=2)
    ds = dm.train_dataset
    assert dm.corpus_root.is_relative_to(asr_cache)
    assert dm.partition == "by_key"
    # one client per training speaker, keyed by speaker id
    assert dm.num_clients == CORPUS.num_speakers == len(ds.speakers)
    assert dm.speakers == sorted(ds.speakers) == [str(k) for k in dm.client_keys]
    for cid, idx in enumerate(dm.partitions):
        assert {ds.speaker_of(int(i)) for i in idx} == {dm.speakers[cid]}
        assert len(idx) == CORPUS.utterances_per_speaker
    assert dm.client_sizes == [CORPUS.utterances_per_speaker] * CORPUS.num_speakers
    # held-out speakers: validation/test speakers are not clients
    assert len(dm.val_speakers) == CORPUS.test_speakers
    assert set(dm.val_speakers).isdisjoint(dm.speakers)
    assert set(dm.test_speakers).isdisjoint(dm.speakers)
    # a client batch: padded features of one speaker
    batch = next(iter(dm.client_loader(1, seed=0)))
    assert batch["features"].shape[0] == 2 and batch["features"].shape[2] == TINY["n_mels"]
    assert set(batch["speakers"]) == {dm.speakers[1]}
    val = next(iter(dm.val_dataloader()))
    assert set(val["speakers"]) <= set(dm.val_speakers)


def test_building_reads_no_audio_and_cached_corpus_is_reused(asr_cache, monkeypatch):
    ASRDataModule(**TINY)  # make sure the corpus exists

    def no_audio(path):
        raise AssertionError(f"audio {path} read while building the data module")

    monkeypatch.setattr(F, "load_audio", no_audio)
    monkeypatch.setattr(S, "_generate", _no_generation)
    dm = ASRDataModule(**TINY)  # cached corpus, indexing only
    assert dm.num_clients == CORPUS.num_speakers and len(dm.population) == CORPUS.num_speakers
    monkeypatch.undo()
    # features are computed lazily and cached on disk: a second data module reads the cache
    dm.train_dataset[0]
    dm2 = ASRDataModule(**TINY)
    assert dm2.feature_cache_dir == dm.feature_cache_dir
    dm2.train_dataset[0]
    assert dm2.train_dataset.cache.hits == 1 and dm2.train_dataset.cache.misses == 0


def test_explicit_root_heldout_speakers_and_caps(asr_cache, tmp_path):
    corpus = ASRDataModule(**TINY).corpus_root
    # a user's LibriSpeech root (here the generated one, copied in the LibriSpeech/ sub-folder layout)
    root = tmp_path / "data"
    shutil.copytree(corpus / "train", root / "LibriSpeech" / "train-clean-x")
    dm = ASRDataModule(root=str(root), train_splits=["train-clean-x"], val_splits=[], test_splits=None,
                       heldout_speakers=1, max_utterances_per_speaker=2, n_mels=20,
                       corpus=S.CorpusConfig(num_speakers=999))  # ignored: `root` is given
    assert dm.num_clients == CORPUS.num_speakers - 1
    assert len(dm.val_speakers) == 1 and set(dm.val_speakers).isdisjoint(dm.speakers)
    assert dm.heldout_speaker_ids == dm.val_speakers
    assert dm.client_sizes == [2] * (CORPUS.num_speakers - 1)
    assert dm.test_dataset is None and dm.test_dataloader() == []


def test_clear_errors(asr_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`root`.*does not exist"):
        ASRDataModule(root=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"`train_splits`.*train-clean-100.*not found"):
        ASRDataModule(root=str(tmp_path / "empty"), train_splits=["train-clean-100"])
    with pytest.raises(ValueError, match="generated corpus"):
        ASRDataModule(**TINY, train_splits=["train-clean-100"])
    with pytest.raises(ValueError, match="held-out"):
        ASRDataModule(**TINY, val_splits=["train"])
    with pytest.raises(ValueError, match=r"`corpus\.test_speakers` must be >= 1.*'test'"):
        ASRDataModule(corpus=replace(CORPUS, test_speakers=0), n_mels=20)
    with pytest.raises(ValueError, match=r"`corpus` must be a CorpusConfig.*\{'num_speakers': 4\} \(a dict\)"):
        ASRDataModule(corpus={"num_speakers": 4})
    with pytest.raises(ValueError, match="heldout_speakers"):
        ASRDataModule(**TINY, heldout_speakers=CORPUS.num_speakers)


def test_task_skips_empty_batches():
    """collate_asr returns None when every item of a batch was unreadable: the task skips it."""
    from lightning_fedprune.asr.conformer_transducer import ConformerTransducer

    task = ConformerTransducer(d_model=16, num_layers=1, num_heads=2, ffn_dim=16, conv_kernel_size=3, pred_dim=8,
                               joint_dim=8, n_mels=20, subsampling_channels=4)
    assert task.training_step(None, 0) is None
    assert task.validation_step(None, 0) is None and task.test_step(None, 0) is None
    assert task.predict_step(None, 0) == []


def test_auxiliary_ctc_loss():
    """ctc_weight adds an auxiliary CTC head to the RNN-T task; decoding stays RNN-T."""
    from lightning_fedprune.asr.conformer_transducer import ConformerTransducer

    small = dict(d_model=16, num_layers=1, num_heads=2, ffn_dim=16, conv_kernel_size=3, pred_dim=8, joint_dim=8,
                 n_mels=20, subsampling_channels=4, dropout=0.0)
    torch.manual_seed(0)
    plain = ConformerTransducer(**small)
    torch.manual_seed(0)
    aux = ConformerTransducer(**small, ctc_weight=0.3)
    assert not hasattr(plain, "ctc_head") and aux.ctc_head.out_features == aux.tokenizer.vocab_size
    batch = {"features": torch.randn(2, 60, 20), "feature_lengths": torch.tensor([60, 45]), "texts": ["one two", "six"]}
    l_plain, l_aux = plain.training_step(batch), aux.training_step(batch)
    assert torch.isfinite(l_aux) and l_aux > l_plain  # same weights up to the extra head: CTC adds a positive term
    l_aux.backward()
    assert aux.ctc_head.weight.grad is not None and aux.joiner.out.weight.grad is not None
    aux.eval()
    assert aux.transcribe(batch["features"], batch["feature_lengths"]) == \
        [aux.tokenizer.decode(h) for h in aux.decode_encoder(*aux(batch["features"], batch["feature_lengths"]))]
    with pytest.raises(ValueError, match="ctc_weight"):
        ConformerTransducer(**small, ctc_weight=-1.0)


# ----------------------------------------------------------------------------- the job, through the CLI
def test_smoke_config_end_to_end(asr_cache, tmp_path):
    from lightning_fedprune.cli import build_cli

    cli = build_cli(["fit", "--config", str(SMOKE), "--trainer.logger=false", "--quiet=true",
                     f"--trainer.default_root_dir={tmp_path}"])
    fed, trainer, dm = cli.model, cli.trainer, cli.datamodule
    assert trainer.global_step == 3
    assert isinstance(dm, ASRDataModule) and dm.num_clients == 4
    wer = trainer.callback_metrics["val/wer"]
    assert math.isfinite(float(wer)) and float(wer) >= 0
    # masks: the configured groups, column pattern at 30 %, the layers they feed pruned with them, for good
    from lightning_fedprune.pruning.patterns import groups_from_mask
    from lightning_fedprune.pruning.structure import structure_of

    state, masks = fed.pruning, fed.masks
    structure = structure_of(fed.task)
    assert set(state.targets) == {n for _, names in structure.groups for n in names}
    assert state.target_patterns == {n: "column" for n in state.targets}
    assert all(s == 0.3 for s in state.layer_sparsity.values())
    assert set(masks) - set(state.targets) == set(state.dependents) and state.dependents
    params = dict(fed.task.named_parameters())
    for name, m in masks.items():
        groups_from_mask(m, state.patterns[name], name)  # every mask is whole groups of the pattern it travels with
        assert (params[name][~m] == 0).all()
    assert abs(state.sparsity() - 0.3) < 0.02  # the targets' own masks: the plan's 30 %
    assert 0.3 < state.masked_sparsity() < 0.4  # with the rows and columns that follow them
    assert state.phase == 3


def test_main_config_instantiates_and_prunes_what_it_says(asr_cache, tmp_path):
    """digits_fp.yaml: every class instantiates from the YAML; structure checks without training."""


    from lightning_fedprune.callbacks import FineTuneFreeze, MaskRefinementCallback, SparsityRampCallback
    from lightning_fedprune.cli import build_cli

    cfg = yaml.safe_load(MAIN.read_text())
    assert cfg["model"]["task"]["init_args"]["n_mels"] == cfg["data"]["init_args"]["n_mels"]
    cli = build_cli(["--config", str(MAIN), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"],
                    run=False)
    trainer, fed, dm = cli.trainer, cli.model, cli.datamodule
    assert trainer.max_steps % trainer.val_check_interval == 0  # the final pruned model is validated
    ramp = next(c for c in trainer.callbacks if isinstance(c, SparsityRampCallback))
    refine = next(c for c in trainer.callbacks if isinstance(c, MaskRefinementCallback))
    freeze = next(c for c in trainer.callbacks if isinstance(c, FineTuneFreeze))
    assert (ramp.pattern, ramp.target_sparsity, ramp.importance) == ("column", 0.3, "weight_l2")
    assert ramp.end_round < refine.until_round < freeze.start_round < trainer.max_steps
    assert fed.task.hparams.loss == "rnnt" and fed.task.hparams.decoder == "greedy"
    from lightning_fedprune.pruning.structure import structure_of

    assert ramp.groups == ("ffn", "attention", "conv", "predictor", "joiner")
    selection = replace(ramp.plan_parts()["selection"], structure=structure_of(fed.task))
    names = selection.resolve([(n, tuple(p.shape)) for n, p in fed.task.named_parameters()])
    # per layer: 2 FFN output Linears, q/k/out projections, 2 pointwise convolutions; the LSTM; the joiner's output
    assert len(names) == 7 * fed.task.config["num_layers"] + 2
    assert not any(n.startswith(("encoder.subsampling", "ctc_head", "predictor.embedding")) for n in names)
    # clients are the 16 synthetic speakers, validation the 4 held-out ones
    assert dm.num_clients == 16 and len(dm.val_speakers) == 4 and set(dm.val_speakers).isdisjoint(dm.speakers)
    assert fed.clients_per_round <= dm.num_clients


# CorpusConfig.key (with a made-up engine id) of each shipped config's corpus as generated before the settings
# became one CorpusConfig (main at de4850a: flat ASRDataModule arguments): the same key = the same audio and
# transcripts, and the corpora already in users' caches are reused
SHIPPED_CORPUS_KEYS = {"smoke.yaml": "3da6c567c38929cb", "digits_fp.yaml": "8b17bdbb6a54f342",
                       "commands_fp.yaml": "e3ed739cabd70522"}


@pytest.mark.parametrize("name", sorted(SHIPPED_CORPUS_KEYS))
def test_shipped_configs_keep_their_corpus(name, monkeypatch):
    """YAML -> LightningCLI -> ASRDataModule(corpus=...) -> default_corpus: the corpus is the one it always was."""
    from lightning_fedprune.asr import datamodule as D
    from lightning_fedprune.cli import build_cli

    requested = []

    def record(config, **kwargs):
        requested.append(config)
        raise RuntimeError("corpus recorded, not generated")

    monkeypatch.setattr(D, "default_corpus", record)
    with pytest.raises(ValueError, match="corpus recorded"):  # jsonargparse wraps the error
        build_cli(["--config", str(MAIN.parent / name), "--trainer.logger=false"], run=False)
    assert len(requested) == 1 and isinstance(requested[0], S.CorpusConfig)
    assert requested[0].key("test-engine") == SHIPPED_CORPUS_KEYS[name]


@pytest.mark.parametrize("name", ["digits_fp.yaml", "commands_fp.yaml", "smoke.yaml"])
def test_example_configs_parse(name, capsys):
    """Every ASR example parses with the CLI (nothing is instantiated by --print_config)."""
    from lightning_fedprune.cli import build_cli

    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(MAIN.parent / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"] == "lightning_fedprune.asr.datamodule.ASRDataModule"
    assert printed["model"]["task"]["init_args"]["n_mels"] == printed["data"]["init_args"]["n_mels"]
    assert printed["trainer"]["max_steps"] % printed["trainer"]["val_check_interval"] == 0
