"""Bad arguments fail early with a message that names the argument and shows the value.

Construction-time checks of every public constructor (one grid), the checks that need the
Trainer (setup: schedule contradictions, clients without a full batch), the runtime errors of the
data side (key functions, labels), a task that reads a compacted layer's weight, and the export.
"""

from __future__ import annotations

import doctest
import math
import warnings

import pytest
import torch
from helpers import GaussianMixtureDataset, MLPClassifier, quiet_trainer

from lightning_fedprune import FederatedDataModule, FederatedLightningModule, validation
from lightning_fedprune.asr.conformer_transducer import ConformerTransducer
from lightning_fedprune.asr.datamodule import ASRDataModule
from lightning_fedprune.asr.synthetic import CorpusConfig
from lightning_fedprune.callbacks import (
    AdaptiveLayerSparsity,
    FederatedProgressBar,
    FineTuneFreeze,
    MaskRefinementCallback,
    PruningImages,
    RunSummary,
    SparsityRampCallback,
)
from lightning_fedprune.pruning.patterns import STRUCTURED_PATTERNS

INF, NAN = math.inf, math.nan


def _task() -> MLPClassifier:
    return MLPClassifier(in_dim=8, hidden=16, num_classes=3, depth=1, lr=0.1)


def _ds(n: int = 60) -> GaussianMixtureDataset:
    return GaussianMixtureDataset(n, dim=8, num_classes=3, seed=0)


def fed(**kw):
    return FederatedLightningModule(_task(), **kw)


def dm(**kw):
    return FederatedDataModule(_ds(), **kw)


def asr_dm(**kw):
    # a root that does not exist: a check that is missing surfaces as FileNotFoundError (no corpus is built)
    return ASRDataModule(**{"root": "/nonexistent/librispeech", **kw})


def asr_task(**kw):
    return ConformerTransducer(**kw)


# (constructor, kwargs, regex the message must match): the message names the argument and shows the value
GRID = [
    # FederatedLightningModule
    (fed, dict(clients_per_round=True), r"`clients_per_round`.*True"),
    (fed, dict(clients_per_round=2.0), r"`clients_per_round`.*2\.0"),
    (fed, dict(local_steps="3"), r"`local_steps`.*'3'"),
    (fed, dict(local_epochs=0), r"`local_epochs`.*0"),
    (fed, dict(server_optimizer="SGD"), r"`server_optimizer`.*'SGD'"),
    (fed, dict(server_lr=INF), r"`server_lr`.*inf"),
    (fed, dict(server_lr=NAN), r"`server_lr`.*nan"),
    (fed, dict(server_lr="1"), r"`server_lr`.*'1'"),
    (fed, dict(server_momentum=5.0), r"`server_momentum`.*5\.0"),  # with the default 'sgd': still a typo
    (fed, dict(server_betas=(0.9,)), r"`server_betas`.*0\.9"),
    (fed, dict(server_betas=(0.9, INF)), r"`server_betas\[1\]`.*inf"),
    (fed, dict(server_eps=0.0), r"`server_eps`.*0\.0"),
    (fed, dict(server_eps=INF), r"`server_eps`.*inf"),
    (fed, dict(weighting="size"), r"`weighting`.*'size'"),
    (fed, dict(executor=3), r"`executor`.*3"),
    (fed, dict(num_workers=-3), r"`num_workers`.*-3"),
    (fed, dict(num_workers=True), r"`num_workers`.*True"),
    (fed, dict(start_method="thread"), r"`start_method`.*'thread'"),
    (fed, dict(client_gradient_clip_val="1.0"), r"`client_gradient_clip_val`.*'1\.0'"),
    (fed, dict(client_gradient_clip_val=INF), r"`client_gradient_clip_val`.*inf"),
    (fed, dict(client_gradient_clip_val=0), r"`client_gradient_clip_val`.*0"),
    (fed, dict(client_gradient_clip_algorithm="l3"), r"`client_gradient_clip_algorithm`.*'l3'"),
    (fed, dict(compact_clients="no"), r"`compact_clients`.*'no'"),
    (fed, dict(compact_clients=0), r"`compact_clients`.*0"),
    (fed, dict(seed=1.5), r"`seed`.*1\.5"),
    (fed, dict(seed=True), r"`seed`.*True"),
    # FederatedDataModule
    (dm, dict(partition="random"), r"`partition`.*'random'"),
    (dm, dict(num_clients=0), r"`num_clients`.*0"),
    (dm, dict(num_clients=2.5), r"`num_clients`.*2\.5"),
    (dm, dict(partition="dirichlet", alpha=INF), r"`alpha`.*inf"),
    (dm, dict(partition="dirichlet", alpha=0), r"`alpha`.*0"),
    (dm, dict(partition="dirichlet", alpha="0.5"), r"`alpha`.*'0\.5'"),
    (dm, dict(partition="by_key", partition_key=3), r"`partition_key`.*3"),
    (dm, dict(partition="dirichlet", label_key=3), r"`label_key`.*3"),
    (dm, dict(batch_size=0), r"`batch_size`.*0"),
    (dm, dict(batch_size=True), r"`batch_size`.*True"),
    (dm, dict(eval_batch_size=-1), r"`eval_batch_size`.*-1"),
    (dm, dict(min_client_samples=0), r"`min_client_samples`.*0"),
    (dm, dict(rounds_per_epoch=0), r"`rounds_per_epoch`.*0"),
    (dm, dict(collate_fn="stack"), r"`collate_fn`.*'stack'"),
    (dm, dict(shuffle="no"), r"`shuffle`.*'no'"),
    (dm, dict(drop_last=1), r"`drop_last`.*1"),
    (dm, dict(seed="0"), r"`seed`.*'0'"),
    (lambda **kw: FederatedDataModule(**kw), dict(train_dataset=None), r"`train_dataset`.*None"),
    (dm, dict(val_dataset="val.pt"), r"`val_dataset`.*'val\.pt'"),
    (dm, dict(test_dataset=5), r"`test_dataset`.*5"),
    # SparsityRampCallback
    (SparsityRampCallback, dict(target_sparsity=1.0), r"`target_sparsity`.*1\.0"),
    (SparsityRampCallback, dict(target_sparsity=NAN), r"`target_sparsity`.*nan"),
    (SparsityRampCallback, dict(start_round=-1), r"`start_round`.*-1"),
    (SparsityRampCallback, dict(end_round=2.0), r"`end_round`.*2\.0"),
    (SparsityRampCallback, dict(schedule="exp"), r"`schedule`.*'exp'"),
    (SparsityRampCallback, dict(schedule="cubic", end_round=5, power=INF), r"`power`.*inf"),
    (SparsityRampCallback, dict(num_steps=0), r"`num_steps`.*0"),
    (SparsityRampCallback, dict(every_n_rounds=0), r"`every_n_rounds`.*0"),
    (SparsityRampCallback, dict(pattern="diagonal"), r"`pattern`.*'diagonal'"),
    (SparsityRampCallback, dict(importance="random"), r"`importance`.*'random'"),
    (SparsityRampCallback, dict(parameters=123), r"`parameters`.*123"),
    (SparsityRampCallback, dict(parameters="("), r"`parameters`.*'\('"),
    (SparsityRampCallback, dict(exclude=["bias"]), r"`exclude`.*\['bias'\]"),
    (SparsityRampCallback, dict(momentum_beta=1.0), r"`momentum_beta`.*1\.0"),
    (SparsityRampCallback, dict(momentum_source="adam"), r"`momentum_source`.*'adam'"),
    # MaskRefinementCallback
    (MaskRefinementCallback, dict(every_n_rounds=0), r"`every_n_rounds`.*0"),
    (MaskRefinementCallback, dict(start_round=-2), r"`start_round`.*-2"),
    (MaskRefinementCallback, dict(until_round="10"), r"`until_round`.*'10'"),
    (MaskRefinementCallback, dict(start_round=5, until_round=4), r"`until_round` \(4\).*`start_round` \(5\)"),
    # AdaptiveLayerSparsity
    (AdaptiveLayerSparsity, dict(max_layer_sparsity=0.0), r"`max_layer_sparsity`.*0\.0"),
    (AdaptiveLayerSparsity, dict(max_layer_sparsity=1.5), r"`max_layer_sparsity`.*1\.5"),
    (AdaptiveLayerSparsity, dict(temperature=INF), r"`temperature`.*inf"),
    (AdaptiveLayerSparsity, dict(temperature=-1), r"`temperature`.*-1"),
    (AdaptiveLayerSparsity, dict(normalize="l2"), r"`normalize`.*'l2'"),
    # FineTuneFreeze
    (FineTuneFreeze, dict(start_round=-1), r"`start_round`.*-1"),
    (FineTuneFreeze, dict(start_round=5, make_permanent="yes"), r"`make_permanent`.*'yes'"),
    (FineTuneFreeze, dict(start_round=5, export_path=123), r"`export_path`.*123"),
    (FineTuneFreeze, dict(start_round=5, export_path="/nonexistent/dir/model.pt"), r"`export_path`'s folder does not exist"),
    # RunSummary
    (RunSummary, dict(path=1), r"`path`.*1"),
    (RunSummary, dict(print_summary="no"), r"`print_summary`.*'no'"),
    # PruningImages
    (PruningImages, dict(max_layers=-1), r"`max_layers`.*-1"),
    (PruningImages, dict(layers="["), r"`layers`.*'\['"),
    (PruningImages, dict(layers=5), r"`layers`.*5"),
    (PruningImages, dict(max_size=4), r"`max_size`.*4"),
    (PruningImages, dict(bar_chart="yes"), r"`bar_chart`.*'yes'"),
    (PruningImages, dict(dpi=5000), r"`dpi`.*5000"),
    # FederatedProgressBar
    (FederatedProgressBar, dict(refresh_rate=-1), r"`refresh_rate`.*-1"),
    (FederatedProgressBar, dict(process_position=1.5), r"`process_position`.*1\.5"),
    (FederatedProgressBar, dict(leave="no"), r"`leave`.*'no'"),
    (FederatedProgressBar, dict(client_refresh_interval=NAN), r"`client_refresh_interval`.*nan"),
    # ASRDataModule (checked before any corpus is generated or scanned)
    (asr_dm, dict(root=5), r"`root`.*5"),
    (asr_dm, dict(heldout_speakers=-1), r"`heldout_speakers`.*-1"),
    (asr_dm, dict(corpus={"num_speakers": 16}), r"`corpus`.*'num_speakers'"),
    # CorpusConfig (ASRDataModule's `corpus`; checked before any corpus is generated)
    (CorpusConfig, dict(vocabulary=3), r"`vocabulary`.*3"),
    (CorpusConfig, dict(num_speakers=0), r"`num_speakers`.*0"),
    (CorpusConfig, dict(utterances_per_speaker="50"), r"`utterances_per_speaker`.*'50'"),
    (CorpusConfig, dict(utterances_per_speaker=10000), r"`utterances_per_speaker`.*10000"),
    (CorpusConfig, dict(test_speakers=-1), r"`test_speakers`.*-1"),
    (CorpusConfig, dict(test_utterances_per_speaker=0), r"`test_utterances_per_speaker`.*0"),
    (CorpusConfig, dict(seed=0.5), r"`seed`.*0\.5"),
    (CorpusConfig, dict(seed=-1), r"`seed`.*-1"),
    (CorpusConfig, dict(splits=["train", "train"]), r"`splits`.*'train', 'train'"),
    (CorpusConfig, dict(splits=["train", "../test"]), r"`splits\[1\]`.*'\.\./test'"),
    (CorpusConfig, dict(min_words=0), r"`min_words`.*0"),
    (CorpusConfig, dict(min_words=5, max_words=3), r"`max_words` \(3\).*`min_words` \(5\)"),
    (CorpusConfig, dict(max_words=2), r"`max_words` \(2\).*`min_words` \(3\).*default range \(3, 7\)"),
    (CorpusConfig, dict(word_alpha=INF), r"`word_alpha`.*inf"),
    (CorpusConfig, dict(noise_snr_db=NAN), r"`noise_snr_db`.*nan"),
    (CorpusConfig, dict(sample_rate=0), r"`sample_rate`.*0"),
    (asr_dm, dict(cache_dir=3), r"`cache_dir`.*3"),
    (asr_dm, dict(max_utterances_per_speaker=0), r"`max_utterances_per_speaker`.*0"),
    (asr_dm, dict(max_eval_utterances_per_speaker=1.0), r"`max_eval_utterances_per_speaker`.*1\.0"),
    (asr_dm, dict(min_client_samples=0), r"`min_client_samples`.*0"),
    (asr_dm, dict(batch_size=0), r"`batch_size`.*0"),
    (asr_dm, dict(eval_batch_size="8"), r"`eval_batch_size`.*'8'"),
    (asr_dm, dict(num_workers=-1), r"`num_workers`.*-1"),
    (asr_dm, dict(n_mels=0), r"`n_mels`.*0"),
    (asr_dm, dict(feature_cache_dir=1), r"`feature_cache_dir`.*1"),
    (asr_dm, dict(on_error="ignore"), r"`on_error`.*'ignore'"),
    (asr_dm, dict(check_audio="yes"), r"`check_audio`.*'yes'"),
    (asr_dm, dict(rounds_per_epoch=0), r"`rounds_per_epoch`.*0"),
    (asr_dm, dict(seed=None), r"`seed`.*None"),
    (asr_dm, dict(train_splits=3), r"`train_splits`.*3"),
    (asr_dm, dict(val_splits=[1]), r"`val_splits\[0\]`.*1"),
    (asr_dm, dict(test_splits=["a", "a"]), r"`test_splits` lists a split twice"),
    # ConformerTransducer (checked before the model is built)
    (asr_task, dict(preset="huge"), r"`preset`.*'huge'"),
    (asr_task, dict(d_model=0), r"`d_model`.*0"),
    (asr_task, dict(num_layers=1.5), r"`num_layers`.*1\.5"),
    (asr_task, dict(num_heads=0), r"`num_heads`.*0"),
    (asr_task, dict(d_model=30, num_heads=4), r"`d_model` \(30\).*`num_heads` \(4\)"),
    (asr_task, dict(ffn_dim=-1), r"`ffn_dim`.*-1"),
    (asr_task, dict(conv_kernel_size=4), r"`conv_kernel_size`.*4"),
    (asr_task, dict(pred_dim=0), r"`pred_dim`.*0"),
    (asr_task, dict(pred_layers=0), r"`pred_layers`.*0"),
    (asr_task, dict(joint_dim=0), r"`joint_dim`.*0"),
    (asr_task, dict(dropout=1.0), r"`dropout`.*1\.0"),
    (asr_task, dict(n_mels=3), r"`n_mels`.*3"),
    (asr_task, dict(lr=INF), r"`lr`.*inf"),
    (asr_task, dict(lr=0), r"`lr`.*0"),
    (asr_task, dict(weight_decay=-0.1), r"`weight_decay`.*-0\.1"),
    (asr_task, dict(warmup_steps=-1), r"`warmup_steps`.*-1"),
    (asr_task, dict(loss="mse"), r"`loss`.*'mse'"),
    (asr_task, dict(decoder="viterbi"), r"`decoder`.*'viterbi'"),
    (asr_task, dict(loss="ctc", decoder="beam"), r"`decoder='beam'`.*`loss='rnnt'`"),
    (asr_task, dict(beam_size=0), r"`beam_size`.*0"),
    (asr_task, dict(max_symbols_per_frame=0), r"`max_symbols_per_frame`.*0"),
    (asr_task, dict(spec_augment="no"), r"`spec_augment`.*'no'"),
    (asr_task, dict(input_norm=1), r"`input_norm`.*1"),
    (asr_task, dict(use_group_norm="yes"), r"`use_group_norm`.*'yes'"),
    (asr_task, dict(subsampling_channels=0), r"`subsampling_channels`.*0"),
    (asr_task, dict(joint_chunk_size=0), r"`joint_chunk_size`.*0"),
    (asr_task, dict(log_examples=-1), r"`log_examples`.*-1"),
    (asr_task, dict(ctc_weight=INF), r"`ctc_weight`.*inf"),
    (asr_task, dict(ctc_weight=-1.0), r"`ctc_weight`.*-1\.0"),
]


def _id(case) -> str:
    ctor, kwargs, _ = case
    name = getattr(ctor, "__name__", "ctor")
    return f"{name}-" + "-".join(f"{k}={v!r}" for k, v in kwargs.items())


@pytest.mark.parametrize("ctor, kwargs, match", GRID, ids=[_id(c) for c in GRID])
def test_bad_argument_fails_at_construction_naming_it(ctor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ctor(**kwargs)


def test_good_arguments_are_accepted_and_normalised(tmp_path):
    f = fed(server_optimizer="adam", server_lr=2, client_gradient_clip_val=1, compact_clients=False, num_workers=1,
            server_betas=[0.8, 0.9])
    assert f.strategy.server_lr == 2.0 and f.client_settings.gradient_clip_val == 1.0 and f.client_settings.compact is False
    assert f.strategy.server_betas == (0.8, 0.9)
    d = dm(partition="dirichlet", alpha=1, shuffle=False, drop_last=True)
    assert d.alpha == 1.0 and d.shuffle is False and d.drop_last is True
    cb = FineTuneFreeze(start_round=3, export_path=str(tmp_path / "model.pt"))
    assert str(cb.export_path).endswith("model.pt")
    ramp = SparsityRampCallback(parameters=r".*\.weight", exclude=r"head\..*")
    assert ramp.parameters == r".*\.weight" and ramp.exclude == r"head\..*"  # YAML-expressible strings kept


def test_export_path_that_is_a_directory_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"`export_path` is an existing directory"):
        FineTuneFreeze(start_round=2, export_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"`path` is an existing directory"):
        RunSummary(path=str(tmp_path))


def test_validation_docstring_examples():
    result = doctest.testmod(validation, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ the data side at partition time
class _Rows(torch.utils.data.Dataset):
    """Dict samples with a speaker field; sample 7 has no speaker."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict:
        sample = {"x": torch.full((8,), float(i)), "y": i % 3}
        if i != 7:
            sample["spk"] = i % 4
        return sample


def test_key_function_that_raises_names_partition_key_and_the_sample():
    def speaker(sample):
        return sample["spk"]

    d = FederatedDataModule(_Rows(), partition="by_key", partition_key=speaker)
    with pytest.raises(ValueError, match=r"`partition_key` .*speaker.* failed on training sample 7: KeyError"):
        _ = d.partitions
    d = FederatedDataModule(_Rows(), partition="by_key", partition_key="spk")
    with pytest.raises(ValueError, match=r"`partition_key='spk'` failed on training sample 7.*not found"):
        _ = d.partitions


def test_label_key_errors_name_label_key():
    d = FederatedDataModule(_Rows(), partition="dirichlet", num_clients=2, label_key="nolabel")
    with pytest.raises(ValueError, match=r"`label_key='nolabel'` failed on training sample 0") as info:
        _ = d.partitions
    assert "partition_key" not in str(info.value)
    d = FederatedDataModule(_Rows(), partition="dirichlet", num_clients=2, label_key=lambda s: "cat")
    with pytest.raises(ValueError, match=r"`label_key`.*sample 0.*'cat'"):
        _ = d.partitions


def test_dirichlet_with_infinite_alpha_fails_naming_alpha_not_later():
    # before: accepted, then numpy failed inside the partition without naming `alpha`
    with pytest.raises(ValueError, match=r"`alpha`"):
        FederatedDataModule(_ds(), partition="dirichlet", alpha=INF)


# ------------------------------------------------------------------ checks that need the Trainer (setup)
def _fit(callbacks, max_steps=3, datamodule=None, **fed_kw):
    f = fed(clients_per_round=2, local_steps=1, **fed_kw)
    trainer = quiet_trainer(max_steps=max_steps, callbacks=callbacks)
    trainer.fit(f, datamodule=datamodule or dm(num_clients=4, batch_size=8))
    return f


def test_exclude_that_removes_every_match_is_named():
    with pytest.raises(ValueError, match=r"`exclude='\.\*'` removes every parameter that the default"):
        _fit([SparsityRampCallback(exclude=".*")])
    with pytest.raises(ValueError, match=r"`exclude='body.*'` removes every parameter that `parameters='body.*'`"):
        _fit([SparsityRampCallback(parameters=r"body\..*", exclude=r"body\.0\..*")])
    with pytest.raises(ValueError, match=r"`parameters='nothing'` matches no parameter"):
        _fit([SparsityRampCallback(parameters="nothing")])


def test_refinement_starting_after_the_freeze_is_rejected_at_setup():
    callbacks = [SparsityRampCallback(start_round=0, end_round=2), MaskRefinementCallback(start_round=6),
                 FineTuneFreeze(start_round=5)]
    with pytest.raises(ValueError, match=r"MaskRefinementCallback `start_round` \(6\).*FineTuneFreeze `start_round` \(5\)"):
        _fit(callbacks)


def test_refinement_until_round_past_the_freeze_is_rejected_at_setup():
    callbacks = [SparsityRampCallback(start_round=0, end_round=2), MaskRefinementCallback(until_round=8),
                 FineTuneFreeze(start_round=5)]
    with pytest.raises(ValueError, match=r"MaskRefinementCallback `until_round` \(8\).*FineTuneFreeze `start_round` \(5\)"):
        _fit(callbacks)


def test_refinement_that_would_never_run_is_rejected_at_setup():
    # default start = the round after the ramp (3) = the freeze round: no refinement round is left
    callbacks = [SparsityRampCallback(start_round=0, end_round=2), MaskRefinementCallback(), FineTuneFreeze(start_round=3)]
    with pytest.raises(ValueError, match=r"MaskRefinementCallback would never run.*round 3.*FineTuneFreeze `start_round` \(3\)"):
        _fit(callbacks)


def test_consistent_schedule_is_accepted():
    callbacks = [SparsityRampCallback(start_round=0, end_round=1, target_sparsity=0.5),
                 MaskRefinementCallback(every_n_rounds=1, until_round=3), FineTuneFreeze(start_round=4)]
    f = _fit(callbacks, max_steps=5)
    assert f.pruning.frozen and f.pruning.permanent


def test_every_client_smaller_than_a_batch_with_drop_last_fails_at_setup():
    d = dm(num_clients=6, batch_size=16, drop_last=True)  # 10 samples per client
    with pytest.raises(ValueError, match=r"`batch_size=16`.*`drop_last=True`.*all 6 clients") as info:
        _fit([], datamodule=d)
    assert "full batch" in str(info.value)
    with pytest.raises(ValueError, match=r"`batch_size=16`"):  # not only on the first access
        _ = d.population
    with pytest.raises(ValueError, match=r"`batch_size=16`"):  # with local_epochs too (was: non-finite loss nan)
        f = FederatedLightningModule(_task(), clients_per_round=2, local_epochs=1)
        quiet_trainer(max_steps=1).fit(f, datamodule=dm(num_clients=6, batch_size=16, drop_last=True))


def test_some_clients_smaller_than_a_batch_with_drop_last_are_left_out_with_a_warning():
    keys = [0] * 30 + [1] * 5 + [2] * 20 + [3] * 3 + [4] * 2  # clients 1, 3, 4 have no full batch of 8
    ds = _ds(60)
    ds.partition_keys = keys
    d = FederatedDataModule(ds, partition="by_key", batch_size=8, drop_last=True)
    with pytest.warns(UserWarning, match=r"3 of 5 clients have fewer than `batch_size=8` samples.*drop_last=True.*1 \(5\), 3 \(3\), 4 \(2\)"):
        population = d.population.tolist()
    assert population == [0, 2] and d.small_clients == [1, 3, 4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = _fit([], max_steps=2, datamodule=d)
    assert not [w for w in caught if "failed" in str(w.message)]  # nobody without a batch is sampled
    assert f.last_summary.clients_failed == 0 and f.last_summary.clients_ok == 2
    # without drop_last the same clients train (their last batch is partial)
    assert FederatedDataModule(ds, partition="by_key", batch_size=8).population.tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------ a task that reads a pruned layer's weight
class L2Task(MLPClassifier):
    """An L2 penalty on the head's weight read inside ``training_step`` (the head gets compacted)."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 1e-2 * self.head.weight.square().sum()


@pytest.mark.parametrize("pattern", STRUCTURED_PATTERNS)
def test_task_reading_a_compacted_weight_trains_like_masked_dense(pattern):
    """Before: every client failed once compaction started ('CompactLinear' object has no attribute 'weight')."""
    finals = {}
    for compact in (True, False):
        torch.manual_seed(0)
        task = L2Task(in_dim=8, hidden=16, num_classes=4, depth=1, lr=0.1)
        f = FederatedLightningModule(task, clients_per_round=2, local_steps=2, compact_clients=compact)
        ramp = SparsityRampCallback(target_sparsity=0.5, pattern=pattern, parameters=r"head\.weight")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_steps=3, callbacks=[ramp]).fit(f, datamodule=dm(num_clients=4, batch_size=8))
        assert not [w for w in caught if "failed" in str(w.message)], [str(w.message) for w in caught]
        assert f.last_summary.clients_ok == 2
        finals[compact] = {n: p.detach().clone() for n, p in f.task.state_dict().items()}
    for name, value in finals[False].items():
        torch.testing.assert_close(finals[True][name], value, atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------ export
def test_fine_tune_export_writes_the_pruned_model(tmp_path):
    path = tmp_path / "pruned.pt"
    callbacks = [SparsityRampCallback(target_sparsity=0.5, pattern="row", parameters=r"body\.0\.weight"),
                 FineTuneFreeze(start_round=1, export_path=str(path))]
    f = _fit(callbacks, max_steps=2)
    out = torch.load(path, weights_only=False)
    mask = f.masks["body.0.weight"]
    assert out["patterns"] == {"body.0.weight": "row"} and torch.equal(out["masks"]["body.0.weight"], mask)
    weight = out["state_dict"]["body.0.weight"]
    assert torch.equal(weight, f.task.body[0].weight.detach()) and not weight[~mask].any()
    (block,) = out["compact"]["body.0.weight"]["blocks"]
    assert torch.equal(block["kept"], mask.any(1).nonzero().flatten()) and torch.equal(block["values"], weight[block["kept"]])


def test_export_pruned_names_bad_inputs():
    from lightning_fedprune.pruning.export import export_pruned

    task = _task()
    good = torch.ones(16, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"`task`.*'model\.pt'"):
        export_pruned("model.pt", {}, {})
    with pytest.raises(ValueError, match=r"`masks` has an entry for 'body\.9\.weight'"):
        export_pruned(task, {"body.9.weight": good}, {})
    with pytest.raises(ValueError, match=r"`masks\['body\.0\.weight'\]` must be a bool tensor of shape \(16, 8\)"):
        export_pruned(task, {"body.0.weight": good.float()}, {})
    with pytest.raises(ValueError, match=r"`patterns\['body\.0\.weight'\]`.*'rows'"):
        export_pruned(task, {"body.0.weight": good}, {"body.0.weight": "rows"})


# ------------------------------------------------------------------ ASRDataModule: check_audio is applied
def test_asr_check_audio_reads_headers_at_construction(tmp_path):
    sf = pytest.importorskip("soundfile")
    pytest.importorskip("torchaudio")
    from lightning_fedprune.asr.librispeech import AudioReadError

    chapter = tmp_path / "train" / "11" / "1"
    chapter.mkdir(parents=True)
    lines = []
    for u in range(2):
        utt = f"11-1-{u:04d}"
        sf.write(chapter / f"{utt}.flac", torch.zeros(1600).numpy(), 16000)
        lines.append(f"{utt} ZERO")
    (chapter / "11-1.trans.txt").write_text("\n".join(lines) + "\n")
    (chapter / "11-1-0001.flac").write_bytes(b"not audio" * 20)
    kw = dict(root=str(tmp_path), train_splits=["train"], val_splits=[], test_splits=[], on_error="raise",
              feature_cache_dir="none")
    assert len(ASRDataModule(**kw).train_dataset) == 2  # headers are not read by default
    with pytest.raises(AudioReadError, match="11-1-0001"):  # before: `check_audio` was accepted and ignored
        ASRDataModule(**kw, check_audio=True)
