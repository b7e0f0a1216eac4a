"""GPU benchmarks: the article's model for one round on one GPU, and many small clients sharing it.

1. **The article's model** (``ConformerTransducer(preset="paper")``, 116.1 M parameters) on synthetic
   LibriSpeech-length audio (random 80-bin log-mel features of 15 s utterances, 1,500 frames; 180-character
   transcripts): one federated round of 8 clients x 10 local steps, batch 8, through the Trainer
   (FederatedLightningModule, sequential executor on the GPU). Seconds per round and peak GPU memory
   (``torch.cuda.max_memory_allocated``) for masked-dense vs compact clients at column sparsity 0.5 (pruned
   from round 0, one shot), and the same 80 local steps in a plain PyTorch loop (a fresh AdamW per client, no
   copy in or out, no aggregation): the round's overhead. The first round of every fit is a warm-up; the second
   is measured.
2. **Many small clients**: the main job's model (examples/asr/digits_fp.yaml's task) on small synthetic clients
   (8 utterances of 2 s each, 2 local steps): clients per second with the sequential executor and with 1, 2 and
   4 process-pool workers sharing the GPU.

    python benchmarks/bench_gpu.py                       # on a CUDA machine (scripts/gpu_check.sh runs it)
    python benchmarks/bench_gpu.py --quick --device cpu  # the same code, tiny, on the CPU (a dry run)

Prints one table per part and writes the numbers as JSON (``--json``).
"""

from __future__ import annotations

import json
import time

from _common import base_parser, header, load, median, quiet_lightning, quiet_trainer, table, verdict

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset

from lightning_fedprune import FederatedDataModule, FederatedLightningModule, ProcessPoolExecutor
from lightning_fedprune.asr.conformer_transducer import ConformerTransducer
from lightning_fedprune.asr.librispeech import collate_asr
from lightning_fedprune.callbacks import SparsityRampCallback

FFN = r"encoder\.conformer\.conformer_layers\.\d+\.(ffn[12]\.sequential\.[14]|self_attn\.out_proj)\.weight"
#: the main job's task (examples/asr/digits_fp.yaml)
MAIN_TASK = dict(preset="tiny", d_model=96, num_layers=3, num_heads=4, ffn_dim=384, pred_dim=128, joint_dim=128,
                 ctc_weight=0.3, lr=2e-3)


class SyntheticSpeech(Dataset):
    """Random log-mel features and transcripts of fixed length (deterministic): the shapes of real speech."""

    def __init__(self, n: int, frames: int, chars: int, n_mels: int = 80, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.features = torch.randn(n, frames, n_mels, generator=g)
        letters = "abcdefghijklmnopqrstuvwxyz '"
        idx = torch.randint(0, len(letters), (n, chars), generator=g)
        self.texts = ["".join(letters[i] for i in row).strip() or "a" for row in idx.tolist()]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.features[i], "text": self.texts[i], "speaker": str(i % 8), "id": str(i)}


class RoundTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.peak: list[int] = []

    def on_fed_round_start(self, trainer, pl_module, round, cohort) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._t0 = time.perf_counter()

    def on_fed_round_end(self, trainer, pl_module, summary) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak.append(torch.cuda.max_memory_allocated())
        self.seconds.append(time.perf_counter() - self._t0)


def _accelerator(device: str) -> dict:
    return {"accelerator": "gpu" if device.startswith("cuda") else "cpu", "devices": 1}


def paper_round(device: str, compact: bool, quick: bool) -> tuple[float, float]:
    """(seconds, peak GiB) of the second round of a fit of the article's model."""
    clients, steps, batch = (2, 2, 2) if quick else (8, 10, 8)
    frames, chars = (200, 20) if quick else (1500, 180)
    task = ConformerTransducer(**(MAIN_TASK if quick else dict(preset="paper", ctc_weight=0.3)))
    data = SyntheticSpeech(clients * batch, frames, chars)
    dm = FederatedDataModule(data, partition="iid", num_clients=clients, batch_size=batch, collate_fn=collate_asr,
                             shuffle=False)
    fed = FederatedLightningModule(task, clients_per_round=clients, local_steps=steps, compact_clients=compact)
    ramp = SparsityRampCallback(target_sparsity=0.5, start_round=0, schedule="one_shot", pattern="column",
                                parameters=FFN)
    timer = RoundTimer()
    quiet_trainer(max_steps=2, callbacks=[ramp, timer], limit_val_batches=0, **_accelerator(device)).fit(fed, datamodule=dm)
    return timer.seconds[-1], (timer.peak[-1] / 2**30 if timer.peak else float("nan"))


def paper_plain(device: str, quick: bool) -> float:
    """The same local steps as one round, in a plain loop: seconds."""
    clients, steps, batch = (2, 2, 2) if quick else (8, 10, 8)
    frames, chars = (200, 20) if quick else (1500, 180)
    task = ConformerTransducer(**(MAIN_TASK if quick else dict(preset="paper", ctc_weight=0.3))).to(device)
    task.train()
    data = SyntheticSpeech(clients * batch, frames, chars)
    batches = [collate_asr([data[i] for i in range(c * batch, (c + 1) * batch)]) for c in range(clients)]
    for _ in range(2):  # the first pass is a warm-up, as the fit's first round
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            opt = torch.optim.AdamW(task.parameters(), lr=1e-3)
            for _ in range(steps):
                moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
                opt.zero_grad()
                task.training_step(moved, 0).backward()
                opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds


def small_clients(device: str, workers: int | None, quick: bool) -> float:
    """Clients per second of the main job's model on many small clients (None: the sequential executor)."""
    clients, rounds = (4, 2) if quick else (32, 3)
    data = SyntheticSpeech(clients * 8, 200, 20)
    dm = FederatedDataModule(data, partition="iid", num_clients=clients, batch_size=4, collate_fn=collate_asr,
                             shuffle=False)
    executor = "sequential" if workers is None else ProcessPoolExecutor(num_workers=workers,
                                                                        devices=[device] * workers)
    fed = FederatedLightningModule(ConformerTransducer(**MAIN_TASK), clients_per_round=clients, local_steps=2,
                                   executor=executor)
    timer = RoundTimer()
    quiet_trainer(max_steps=rounds, callbacks=[timer], limit_val_batches=0, **_accelerator(device)).fit(fed, datamodule=dm)
    return clients / median(timer.seconds[1:])


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], threads=None)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--json", default=None, help="write the numbers to this file")
    args = p.parse_args()
    quiet_lightning()
    torch.backends.cuda.matmul.allow_tf32 = True  # what a user's GPU run does by default on Hopper
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU (dry run)"
    header(f"GPU benchmarks on {name}", args)
    out: dict = {"device": name, "quick": args.quick}

    dense_s, dense_gib = paper_round(args.device, compact=False, quick=args.quick)
    compact_s, compact_gib = paper_round(args.device, compact=True, quick=args.quick)
    plain_s = paper_plain(args.device, quick=args.quick)
    out["paper"] = {"masked_dense_s": dense_s, "masked_dense_peak_gib": dense_gib, "compact_s": compact_s,
                    "compact_peak_gib": compact_gib, "plain_loop_s": plain_s}
    print(table([["masked-dense clients", dense_s, dense_gib], ["compact clients (column 0.5)", compact_s, compact_gib],
                 ["plain PyTorch loop, same local steps (dense)", plain_s, float("nan")]],
                ["the article's model, one round of 8 clients x 10 steps", "seconds", "peak GiB"]))
    verdict("compact / masked-dense time", compact_s / dense_s, 0.75)
    verdict("compact / masked-dense peak memory", compact_gib / dense_gib if dense_gib == dense_gib else float("nan"), 0.65)
    verdict("our round (masked-dense) / plain loop", dense_s / plain_s, 1.10)

    rates = {"sequential": small_clients(args.device, None, args.quick)}
    for w in (1, 2, 4):
        rates[f"{w} pool worker(s)"] = small_clients(args.device, w, args.quick)
    out["small_clients_per_s"] = rates
    print(table([[k, v, v / rates["sequential"]] for k, v in rates.items()],
                ["main job's model, many small clients", "clients / s", "vs sequential"]))
    verdict("4 pool workers / sequential (clients per second)", rates["4 pool worker(s)"] / rates["sequential"], 2.5,
            lower_is_better=False)
    out["load"] = load()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
