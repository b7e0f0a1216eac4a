"""The engine on a CUDA device, against the same run on the CPU (``-m gpu``; skipped where CUDA is not available).

Where the maths is exact the results must be equal (the wire, the cohorts, Federated Dropout's sub-models, the
masks of the first recomputation, resume on the same device kind); where it is floating point on different
hardware, within a stated tolerance: float32 runs agree to ``rtol=1e-3, atol=1e-4`` after a few rounds (TF32 off),
mixed- and half-precision runs are checked for what precision cannot change (finite weights, the target
sparsity, no failed client) and for a loss close to the float32 CPU run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import GaussianMixtureDataset, MLPClassifier, quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_combinations import pairwise

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.baselines import FederatedDropout, PruneFL
from lightning_fedprune.callbacks import FineTuneFreeze, MaskRefinementCallback, SparsityRampCallback
from lightning_fedprune.federated.checkpoint import export_task_checkpoint
from lightning_fedprune.federated.client import ClientRunner
from lightning_fedprune.federated.executors import ProcessPoolExecutor
from lightning_fedprune.federated.wire import decode_state, encode_state
from lightning_fedprune.pruning.patterns import PATTERNS, compute_mask

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TARGET = 0.5
ROUNDS = 5
PARAMS = r"body\..*\.weight"


@pytest.fixture(autouse=True)
def _exact_float32():
    """Plain float32 matrix products on the GPU (no TF32), so float32 runs compare with the CPU's."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class Watch(Callback):
    def __init__(self) -> None:
        self.failed = 0
        self.losses: list[float] = []

    def on_fed_round_end(self, trainer, pl_module, summary):
        self.failed += summary.clients_failed
        self.losses.append(summary.train_loss)


def _fit(device: str, algorithm: str = "fedprune", pattern: str = "column", server_optimizer: str = "sgd",
         payload_bits=None, compact: bool = True, precision: str = "32-true", executor="sequential", rounds=ROUNDS,
         callbacks=(), **trainer_kwargs):
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=8, hidden=16, num_classes=4, lr=0.1, momentum=0.5)
    dm = FederatedDataModule(GaussianMixtureDataset(96, dim=8, num_classes=4), partition="iid", num_clients=6,
                             batch_size=8)
    if algorithm == "federated_dropout":
        server = {"strategy": FederatedDropout(rate=0.25, pattern=pattern, parameters=PARAMS,
                                               server_optimizer=server_optimizer)}
    else:
        server = {"server_optimizer": server_optimizer}
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=2, executor=executor, payload_bits=payload_bits,
                                   compact_clients=compact, seed=1, **server)
    if algorithm == "prunefl":
        pruning = [PruneFL(target_sparsity=TARGET, start_round=1, every_n_rounds=2, pattern=pattern, parameters=PARAMS)]
    else:
        pruning = [SparsityRampCallback(target_sparsity=TARGET, start_round=1, end_round=2, pattern=pattern,
                                        parameters=PARAMS),
                   MaskRefinementCallback(every_n_rounds=1, until_round=3), FineTuneFreeze(start_round=4)]
    watch = Watch()
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    trainer = quiet_trainer(max_steps=rounds, precision=precision, accelerator=accelerator, devices=1,
                            callbacks=[*pruning, watch, *callbacks], limit_val_batches=0, **trainer_kwargs)
    trainer.fit(fed, datamodule=dm)
    return fed, watch


def _state(fed) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu() for n, t in fed.task.state_dict().items()}


AXES = {
    "algorithm": ["fedprune", "federated_dropout", "prunefl"],
    "pattern": list(PATTERNS),
    "server_optimizer": ["sgd", "sgdm", "adam"],
    "payload_bits": [None, 8, 4],
    "compact": [True, False],
    "precision": ["32-true", "bf16-mixed", "16-mixed", "bf16-true"],
}
ROWS = pairwise(AXES, lambda values: True)


@pytest.mark.parametrize("row", ROWS, ids=["-".join(map(str, r.values())) for r in ROWS])
def test_the_engine_on_the_gpu_matches_the_cpu(row):
    gpu, watch = _fit("cuda:0", **row)
    assert watch.failed == 0
    assert all(torch.isfinite(v.float()).all() for v in _state(gpu).values())
    assert math.isclose(gpu.pruning.sparsity(), TARGET, abs_tol=1e-9)
    assert all(m.device.type == "cuda" for m in gpu.masks.values())
    cpu, cpu_watch = _fit("cpu", **{**row, "precision": "32-true"})
    if row["precision"] == "32-true" and row["payload_bits"] is None:
        for name, value in _state(cpu).items():
            torch.testing.assert_close(_state(gpu)[name].to(value.dtype), value, rtol=1e-3, atol=1e-4, msg=name)
    else:  # rounding (codes, half precision) moves the trajectory: the loss stays close to the float32 CPU run
        assert abs(watch.losses[-1] - cpu_watch.losses[-1]) <= 0.25 * abs(cpu_watch.losses[-1]) + 0.05


def test_the_wire_is_the_same_bytes_from_the_gpu_and_decodes_onto_it():
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(16, 12, generator=g), "b": torch.randn(16, generator=g)}
    masks = {"w": compute_mask(state["w"], "column", 0.5)}
    patterns = {"w": "column"}
    for bits in (None, 8):
        on_cpu = encode_state(state, masks, patterns, bits=bits, quantized=["w"])
        on_gpu = encode_state({n: t.cuda() for n, t in state.items()}, {"w": masks["w"].cuda()}, patterns, bits=bits,
                              quantized=["w"])
        assert on_cpu.to_bytes() == on_gpu.to_bytes()
        decoded = decode_state(on_gpu, like={n: t.cuda() for n, t in state.items()})
        assert all(t.device.type == "cuda" for t in decoded.values())
        assert all(torch.equal(decoded[n].cpu(), t) for n, t in decode_state(on_cpu).items())


def test_federated_dropout_gives_the_same_sub_models_on_the_gpu():
    gpu, _ = _fit("cuda:0", algorithm="federated_dropout", rounds=2)
    cpu, _ = _fit("cpu", algorithm="federated_dropout", rounds=2)
    for name, value in _state(cpu).items():
        torch.testing.assert_close(_state(gpu)[name], value, rtol=1e-3, atol=1e-4, msg=name)


class DropoutTask(MLPClassifier):
    """Dropout in training: each client's draw must come from its own seed, on the GPU too."""

    def forward(self, x):
        return self.head(F.dropout(self.body(x), 0.5, self.training))


def test_clients_seed_the_cuda_generator_per_client():
    torch.manual_seed(0)
    task = DropoutTask(in_dim=8, hidden=16, num_classes=4).cuda()
    dm = FederatedDataModule(GaussianMixtureDataset(64, dim=8, num_classes=4), num_clients=4, batch_size=16)
    dm.setup("fit")
    from lightning_fedprune.federated.client_config import ClientSettings, TrainerClientSettings, client_config_for

    trainer = quiet_trainer(max_steps=1, accelerator="gpu", devices=1)
    config = client_config_for(ClientSettings(local_steps=1), TrainerClientSettings(), trainer, dm, device="cuda:0")
    runner = ClientRunner(task, dm.client_data(), config)
    from lightning_fedprune.federated.channel import Channel
    from lightning_fedprune.federated.protocol import ClientPlan, RoundPayload

    payload = RoundPayload(0, Channel().broadcast({n: t.detach() for n, t in task.state_dict().items()}, {}, {}))
    a = runner.run(payload, ClientPlan(0, 0, seed=11))
    b = runner.run(payload, ClientPlan(0, 0, seed=11))
    c = runner.run(payload, ClientPlan(0, 0, seed=12))
    assert a.ok and b.ok and c.ok
    assert a.loss == b.loss and a.loss != c.loss


def test_no_host_synchronisation_in_a_local_step():
    """The local steps of a client never wait for the device: losses are accumulated there and read once."""
    import lightning_fedprune.federated.client as client_mod

    real = client_mod.ClientRunner._loop

    def strict(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    client_mod.ClientRunner._loop = strict
    try:
        _, watch = _fit("cuda:0", compact=True, rounds=3)
    finally:
        client_mod.ClientRunner._loop = real
    assert watch.failed == 0


def test_checkpoints_move_between_gpu_and_cpu_and_resume_exactly_on_the_same_kind(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    whole, _ = _fit("cuda:0", rounds=ROUNDS)
    _fit("cuda:0", rounds=3, callbacks=[ckpt], enable_checkpointing=True)
    path = tmp_path / "step=3.ckpt"
    # GPU -> GPU: bit-identical continuation
    fed, _ = _resume(path, "cuda:0")
    for name, value in _state(whole).items():
        assert torch.equal(_state(fed)[name], value), name
    # GPU -> CPU: the same run within float tolerance
    cpu, _ = _resume(path, "cpu")
    for name, value in _state(whole).items():
        torch.testing.assert_close(_state(cpu)[name], value, rtol=1e-3, atol=1e-4, msg=name)
    # export of a GPU checkpoint loads on the CPU
    out = export_task_checkpoint(path, tmp_path / "task.ckpt")
    plain = MLPClassifier.load_from_checkpoint(out, map_location="cpu")
    assert all(p.device.type == "cpu" for p in plain.parameters())
    loaded = FederatedLightningModule.load_from_checkpoint(path)
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def _resume(path, device):
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=8, hidden=16, num_classes=4, lr=0.1, momentum=0.5)
    dm = FederatedDataModule(GaussianMixtureDataset(96, dim=8, num_classes=4), partition="iid", num_clients=6,
                             batch_size=8)
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=2, seed=1)
    pruning = [SparsityRampCallback(target_sparsity=TARGET, start_round=1, end_round=2, pattern="column",
                                    parameters=PARAMS),
               MaskRefinementCallback(every_n_rounds=1, until_round=3), FineTuneFreeze(start_round=4)]
    watch = Watch()
    trainer = quiet_trainer(max_steps=ROUNDS, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                            callbacks=[*pruning, watch], limit_val_batches=0)
    trainer.fit(fed, datamodule=dm, ckpt_path=path)
    return fed, watch


def test_process_pool_workers_share_the_gpu_and_match_the_sequential_run():
    seq, _ = _fit("cuda:0")
    pool, watch = _fit("cuda:0", executor=ProcessPoolExecutor(num_workers=2, devices=["cuda:0", "cuda:0"]))
    assert watch.failed == 0
    for name, value in _state(seq).items():
        torch.testing.assert_close(_state(pool)[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_process_pool_puts_one_worker_on_each_gpu():
    pool, watch = _fit("cuda:0", executor=ProcessPoolExecutor(num_workers=2, devices=["cuda:0", "cuda:1"]))
    assert watch.failed == 0
