"""Scaling with the number of simulated clients: memory and round time stay flat.

10 / 100 / 1,000 / 5,000 simulated clients (10,000 with --big), 10 clients per round, 32
samples per client. The training set is *lazy*: ``LazyGaussianDataset`` holds nothing per
sample (sample ``i`` is generated from a generator seeded with ``i`` when it is read), and the
clients' datasets are built only when a client is trained (FederatedDataModule keeps one int64
index array per client and makes ``Subset``/``DataLoader`` on demand). So what could grow with
the population is only the library's own per-client bookkeeping -- which is what this measures.

Task: MLPClassifier(32 -> 2 x 64 -> 10), 5 local steps of batch 16, SparsityRampCallback
(S = 0.5 unstructured, one shot at round 0). Each population runs in a fresh subprocess:

* RSS after setup: VmRSS (psutil if installed, else /proc/self/status) at ``on_train_start``
  (partitions built, executor set up, before any round);
* RSS after N rounds: VmRSS at the last ``on_fed_round_end``; the peak (VmHWM) too;
* round time: perf_counter on_fed_round_start -> on_fed_round_end, median over rounds 2..N.

    python benchmarks/bench_scaling.py            # 10, 100, 1000, 5000 clients x 30 rounds
    python benchmarks/bench_scaling.py --quick    # 10, 1000 clients x 5 rounds

Population scale (``--population``): 10 / 1,000 / 100,000 / 1,000,000 clients of 5 samples each,
partitioned by Dirichlet label skew (alpha 0.5) over an in-memory ``GaussianMixtureDataset`` (5
samples per client: 5M samples x 32 floats at 1M clients -- most of the memory), 100 clients per
round (all of them at 10), 20 rounds, the same task; each population in a fresh subprocess:

* setup s: from before the dataset is built to ``on_train_start`` (data, Dirichlet partition of
  every client, module, Trainer, executor);
* RSS after setup / peak; round ms (median of rounds 2..20); whole run s.

    python benchmarks/bench_scaling.py --population
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from _common import apply_threads, base_parser, header, load, median, mib, peak_rss_bytes, rss_bytes, table

import torch
from torch.utils.data import Dataset

SAMPLES_PER_CLIENT = 32


class LazyGaussianDataset(Dataset):
    """``num_samples`` points of ``num_classes`` Gaussian blobs; nothing is stored per sample."""

    def __init__(self, num_samples: int, dim: int = 32, num_classes: int = 10, seed: int = 0) -> None:
        self.n, self.dim, self.num_classes, self.seed = num_samples, dim, num_classes, seed
        self.centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 2.0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        y = int(torch.randint(0, self.num_classes, (1,), generator=g))
        return self.centers[y] + torch.randn(self.dim, generator=g), torch.tensor(y)


def child(num_clients: int, rounds: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import lightning.pytorch as pl

    from _common import quiet_lightning, quiet_trainer
    from lightning_fedprune import FederatedDataModule, FederatedLightningModule
    from lightning_fedprune.callbacks import SparsityRampCallback
    from lightning_fedprune.demos import MLPClassifier

    quiet_lightning()
    rss_start = rss_bytes()

    class Probe(pl.Callback):
        def __init__(self) -> None:
            self.rounds: list[float] = []
            self.rss_setup = self.rss_end = self.rss_r1 = 0
            self.setup_s = 0.0
            self._t0 = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            self.rss_setup = rss_bytes()

        def on_fed_round_start(self, trainer, pl_module, round, cohort) -> None:
            self._t0 = time.perf_counter()

        def on_fed_round_end(self, trainer, pl_module, summary) -> None:
            self.rounds.append(time.perf_counter() - self._t0)
            self.rss_end = rss_bytes()
            if len(self.rounds) == 1:
                self.rss_r1 = self.rss_end

    t0 = time.perf_counter()
    ds = LazyGaussianDataset(num_clients * SAMPLES_PER_CLIENT)
    dm = FederatedDataModule(ds, num_clients=num_clients, batch_size=16, seed=0)
    torch.manual_seed(0)
    fed = FederatedLightningModule(MLPClassifier(in_dim=32, hidden=64, depth=2), clients_per_round=10, local_steps=5)
    probe = Probe()
    ramp = SparsityRampCallback(target_sparsity=0.5, start_round=0, schedule="one_shot", pattern="unstructured")
    trainer = quiet_trainer(max_steps=rounds, callbacks=[ramp, probe])
    trainer.fit(fed, datamodule=dm)
    total = time.perf_counter() - t0
    assert len(probe.rounds) == rounds
    print(json.dumps({
        "clients": num_clients, "rss_start": rss_start, "rss_setup": probe.rss_setup, "rss_end": probe.rss_end, "rss_r1": probe.rss_r1,
        "peak": peak_rss_bytes(), "round_s": median(probe.rounds[1:]), "fit_s": total,
    }))


def population_child(num_clients: int, rounds: int) -> None:
    """One population-scale run (see the module docstring); prints one JSON line."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import lightning.pytorch as pl

    from _common import quiet_lightning, quiet_trainer
    from lightning_fedprune import FederatedDataModule, FederatedLightningModule
    from lightning_fedprune.demos import GaussianMixtureDataset, MLPClassifier

    quiet_lightning()
    rounds_s: list[float] = []
    marks: dict[str, float] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            marks["setup"] = time.perf_counter()
            marks["rss_setup"] = rss_bytes()

        def on_fed_round_start(self, trainer, pl_module, round, cohort) -> None:
            marks["t"] = time.perf_counter()

        def on_fed_round_end(self, trainer, pl_module, summary) -> None:
            rounds_s.append(time.perf_counter() - marks["t"])

    t0 = time.perf_counter()
    ds = GaussianMixtureDataset(num_clients * 5, dim=32, num_classes=10, seed=0)
    dm = FederatedDataModule(ds, partition="dirichlet", num_clients=num_clients, alpha=0.5, batch_size=5, seed=0)
    torch.manual_seed(0)
    k = min(100, len(dm.population))  # a Dirichlet draw can leave a client of a small population empty
    fed = FederatedLightningModule(MLPClassifier(in_dim=32, hidden=64, depth=2), clients_per_round=k, local_steps=1)
    trainer = quiet_trainer(max_steps=rounds, callbacks=[Probe()])
    trainer.fit(fed, datamodule=dm)
    total = time.perf_counter() - t0
    print(json.dumps({"clients": num_clients, "setup_s": marks["setup"] - t0, "rss_setup": marks["rss_setup"],
                      "peak": peak_rss_bytes(), "round_s": median(rounds_s[1:]), "fit_s": total,
                      "population": len(dm.population)}))


def population(args) -> None:
    header("Population scale: Dirichlet clients of 5 samples, 100 per round, 20 rounds", args)
    rows = []
    for n in (10, 1000, 100_000, 1_000_000):
        out = subprocess.run([sys.executable, __file__, "--population-child", str(n), "20"], capture_output=True,
                             text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            raise SystemExit(out.returncode)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"   clients={n:,}: setup {r['setup_s']:.1f} s, RSS {mib(r['rss_setup']):.0f} MiB, "
              f"round {r['round_s'] * 1e3:.1f} ms   [{load()}]")
        rows.append([f"{n:,}", f"{r['population']:,}", r["setup_s"], mib(r["rss_setup"]), mib(r["peak"]),
                     r["round_s"] * 1e3, r["fit_s"]])
    print()
    print(table(rows, ["clients", "sampled population (>= 1 sample)", "setup s", "RSS after setup MiB", "peak RSS MiB",
                       "round ms (median)", "whole run s"]))
    print(f"   [{load()}]")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--population-child":
        population_child(int(sys.argv[2]), int(sys.argv[3]))
        return
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--big", action="store_true", help="also 10,000 clients")
    p.add_argument("--population", action="store_true", help="10 / 1,000 / 100,000 / 1,000,000 Dirichlet clients")
    args = p.parse_args()
    if args.population:
        population(args)
        return
    rounds = args.rounds or (5 if args.quick else 30)
    reps = args.reps or (1 if args.quick else 3)
    apply_threads(args)  # the children always use 1 thread
    pops = [10, 1000] if args.quick else [10, 100, 1000, 5000] + ([10000] if args.big else [])
    header("Scaling: simulated clients, 10 per round, lazily built client datasets", args)
    results: dict[int, list[dict]] = {n: [] for n in pops}
    for rep in range(reps):  # populations interleaved, rep by rep (each run is a fresh subprocess)
        for n in (pops if rep % 2 == 0 else pops[::-1]):
            out = subprocess.run([sys.executable, __file__, "--child", str(n), str(rounds)], capture_output=True,
                                 text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:])
                raise SystemExit(out.returncode)
            results[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[n][-1]
            print(f"   rep {rep + 1}/{reps} clients={n}: setup RSS {mib(r['rss_setup']):.1f} MiB, after {rounds} rounds "
                  f"{mib(r['rss_end']):.1f} MiB, round {r['round_s'] * 1e3:.1f} ms   [{load()}]")
    rows = []
    for n in pops:
        rs = results[n]
        m = {k: median([r[k] for r in rs]) for k in ("rss_start", "rss_setup", "rss_r1", "rss_end", "peak", "round_s",
                                                            "fit_s")}
        rows.append([f"{n:,}", mib(m["rss_start"]), mib(m["rss_setup"]), mib(m["rss_r1"]), mib(m["rss_end"]),
                     mib(m["rss_end"] - m["rss_r1"]), mib(m["peak"]), m["round_s"] * 1e3, m["fit_s"]])
    print()
    print(table(rows, ["clients", "RSS after imports MiB", "RSS after setup MiB", "RSS after round 1 MiB",
                       f"RSS after {rounds} rounds MiB", f"growth rounds 1->{rounds} MiB", "peak RSS MiB",
                       "round ms (median)", "whole fit s (after imports)"]))
    base = rows[0]
    last = rows[-1]
    print(f"from {pops[0]:,} to {pops[-1]:,} clients: RSS after setup {last[2] - base[2]:+.1f} MiB, "
          f"after {rounds} rounds {last[4] - base[4]:+.1f} MiB, round time x{last[7] / base[7]:.2f}   [{load()}]")


if __name__ == "__main__":
    main()
