"""P1 round overhead: a federated round through the Trainer vs the same optimiser steps in a plain loop.

C clients x K local steps of a small MLP, run as a federated fit (FederatedLightningModule +
Trainer(max_steps=R), progress bar / logger / checkpointing / model summary off), against the
same C*K optimiser steps per round written as a plain PyTorch loop over the same data.

What the plain reference loop does per round, per client (and nothing else):
    loader = DataLoader(Subset(dataset, partition[c].tolist()), batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))   # exactly as the client builds it
    opt = torch.optim.SGD(model.parameters(), lr)                           # fresh client optimiser, as FedAvg
    for x, y in loader (K batches): opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
It does not copy weights in or out, does not average, does not log: it is the floor.
A second reference, "fedavg by hand", adds what a minimal hand-written FedAvg must do as well:
load the global weights into the model before each client, copy the trained weights out, and
average them into the new global weights after the round (reported for information).

Clock: time.perf_counter. Per round, ours = on_fed_round_start -> on_fed_round_end of a
callback (the whole training_step: hooks, payload encoding, clients, decoding, aggregation,
server step, logging); the reference = one round of its loop. The first round of each fit is
dropped (warm-up); the per-fit value is the median of the remaining rounds. Whole fit: ours =
building FederatedDataModule + FederatedLightningModule + Trainer and trainer.fit(); the
reference = its R rounds (the task model is built outside the clock on both sides).
Ours and the reference run alternately in one process; the figure is the median over reps.

    python benchmarks/bench_round_overhead.py            # full: 7 reps x 10 rounds, two model sizes, profile
    python benchmarks/bench_round_overhead.py --quick    # smoke
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

from _common import (alternate, apply_threads, base_parser, header, load, median, quiet_lightning, quiet_trainer,
                     table, verdict)

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.demos import GaussianMixtureDataset, MLPClassifier
from lightning_fedprune.federated.protocol import derive_seed
from lightning_fedprune.federated.data import sample_cohort

SIZES = {
    # name: (in_dim, hidden, depth) -- batch 32, 10 classes
    "mlp 64-3x256-10": (64, 256, 3),
    "mlp 32-2x64-10 (tiny)": (32, 64, 2),
    "mlp 64-3x1024-10 (larger)": (64, 1024, 3),
    "mlp 32-1x128-10 (per-client goal)": (32, 128, 1),
}
GOAL = 1.05
CLIENT_GOAL_MS = 0.5  # overhead per client outside the local steps, MLP 32-128-10
TINY_GOAL = 1.08


class RoundTimer(pl.Callback):
    def __init__(self) -> None:
        self.rounds: list[float] = []
        self._t0 = 0.0

    def on_fed_round_start(self, trainer, pl_module, round, cohort) -> None:
        self._t0 = time.perf_counter()

    def on_fed_round_end(self, trainer, pl_module, summary) -> None:
        self.rounds.append(time.perf_counter() - self._t0)


class Setup:
    def __init__(self, in_dim: int, hidden: int, depth: int, clients: int, steps: int, batch: int, rounds: int) -> None:
        self.in_dim, self.hidden, self.depth = in_dim, hidden, depth
        self.C, self.K, self.B, self.R = clients, steps, batch, rounds
        self.dataset = GaussianMixtureDataset(num_samples=clients * steps * batch, dim=in_dim, num_classes=10, seed=0)
        self.lr = 0.05
        self.seed = 0
        self.steps_s = 0.0  # the plain loop's time inside its local steps (the `for` over the loader), summed

    def task(self) -> MLPClassifier:
        torch.manual_seed(0)
        return MLPClassifier(in_dim=self.in_dim, hidden=self.hidden, depth=self.depth, num_classes=10, lr=self.lr)

    # ------------------------------------------------------------------ ours
    def run_ours(self, profile: cProfile.Profile | None = None) -> tuple[float, list[float]]:
        task = self.task()
        timer = RoundTimer()
        if profile is not None:
            profile.enable()
        t0 = time.perf_counter()
        dm = FederatedDataModule(self.dataset, num_clients=self.C, batch_size=self.B, seed=self.seed)
        fed = FederatedLightningModule(task, clients_per_round=self.C, local_steps=self.K, seed=self.seed)
        trainer = quiet_trainer(max_steps=self.R, callbacks=[timer])
        trainer.fit(fed, datamodule=dm)
        fit = time.perf_counter() - t0
        if profile is not None:
            profile.disable()
        assert len(timer.rounds) == self.R, timer.rounds
        return fit, timer.rounds

    # ------------------------------------------------------------------ references
    def _partitions(self):
        # the same partition the FederatedDataModule computes (not timed: the data module's is not either,
        # it is built lazily inside fit -- and costs well under a millisecond here)
        return FederatedDataModule(self.dataset, num_clients=self.C, batch_size=self.B, seed=self.seed).partitions

    def _loader(self, parts, cid: int, seed: int) -> DataLoader:
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(Subset(self.dataset, parts[cid].tolist()), batch_size=self.B, shuffle=True, generator=gen)

    def _client_steps(self, model, parts, cid: int, rnd: int) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=self.lr)
        loader = self._loader(parts, cid, derive_seed(self.seed, rnd, cid))
        steps = 0
        t0 = time.perf_counter()
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            steps += 1
            if steps >= self.K:
                break
        self.steps_s += time.perf_counter() - t0

    def run_plain(self) -> tuple[float, list[float]]:
        model = self.task()
        model.train()
        parts = self._partitions()
        population = torch.arange(self.C).numpy()
        rounds = []
        t0 = time.perf_counter()
        for rnd in range(self.R):
            r0 = time.perf_counter()
            cohort = sample_cohort(population, self.C, self.seed, rnd).tolist()
            for cid in cohort:
                self._client_steps(model, parts, cid, rnd)
            rounds.append(time.perf_counter() - r0)
        return time.perf_counter() - t0, rounds

    def run_fedavg_by_hand(self) -> tuple[float, list[float]]:
        model = self.task()
        model.train()
        parts = self._partitions()
        population = torch.arange(self.C).numpy()
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        sizes = [len(p) for p in parts]
        rounds = []
        t0 = time.perf_counter()
        for rnd in range(self.R):
            r0 = time.perf_counter()
            cohort = sample_cohort(population, self.C, self.seed, rnd).tolist()
            acc = {k: torch.zeros_like(v) for k, v in global_state.items()}
            total = float(sum(sizes[c] for c in cohort))
            for cid in cohort:
                model.load_state_dict(global_state)
                self._client_steps(model, parts, cid, rnd)
                w = sizes[cid] / total
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        acc[k].add_(v, alpha=w)
            global_state = acc
            rounds.append(time.perf_counter() - r0)
        return time.perf_counter() - t0, rounds


def measure(setup: Setup, reps: int) -> dict[str, dict[str, float]]:
    fit: dict[str, list[float]] = {"ours": [], "plain": [], "fedavg_by_hand": []}
    per_round: dict[str, list[float]] = {"ours": [], "plain": [], "fedavg_by_hand": []}
    runners = {"ours": setup.run_ours, "plain": setup.run_plain, "fedavg_by_hand": setup.run_fedavg_by_hand}

    def make(name):
        def fn() -> float:
            total, rounds = runners[name]()
            fit[name].append(total)
            steady = median(rounds[1:]) if len(rounds) > 1 else rounds[0]
            per_round[name].append(steady)
            return steady
        return fn

    # warm-up (imports, allocator, first Trainer): not counted
    setup.run_ours()
    setup.run_plain()
    alternate({name: make(name) for name in runners}, reps)
    return {name: {"round": median(per_round[name]), "fit": median(fit[name]),
                   "round_min": min(per_round[name]), "round_max": max(per_round[name])} for name in runners}


def profile_ours(setup: Setup, top: int) -> None:
    prof = cProfile.Profile()
    setup.run_ours(profile=prof)
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("tottime").print_stats(top)
    print(f"\n-- cProfile of one federated fit ({setup.R} rounds), top {top} by own time --")
    print(_trim(s.getvalue()))
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("cumulative").print_stats(r"lightning_fedprune|torch/optim|dataloader|fetch|collate|functional.py.*linear", top)
    print("-- same profile, by cumulative time (lightning_fedprune, optimiser, data loading) --")
    print(_trim(s.getvalue()))


LOOP = "    _loop (the K local steps)"
LOADER = "    client_loader (loader construction)"


def breakdown(setup: Setup, reps: int) -> float:
    """Where a round's time goes, without a profiler's distortion: wrap the engine's pieces with
    perf_counter accumulators (one instrumented fit per rep, median per piece, ms per round)."""
    import lightning_fedprune.federated.module as module_mod
    from lightning_fedprune.federated.channel import Channel
    from lightning_fedprune.federated.client import ClientLog, ClientRunner
    from lightning_fedprune.federated.data import ClientDataSource
    from lightning_fedprune.federated.executors import SequentialExecutor
    from lightning_fedprune.federated.failures import FailureGuard
    from lightning_fedprune.federated.strategies import FedAvg
    from lightning_fedprune.pruning.state import PruningState

    acc: dict[str, float] = {}
    targets = [
        (PruningState, "begin_round", "pruning.begin_round (the plan's masks)"),
        (FedAvg, "configure", "strategy.configure (what each client gets)"),
        (module_mod, "optim_state_of", "optim_state_of (the clients' schedule position)"),
        (Channel, "broadcast", "channel.broadcast (encode the global model)"),
        (SequentialExecutor, "run", "executor.run (all clients)"),
        (ClientRunner, "run", "  ClientRunner.run (per client, summed)"),
        (ClientRunner, "_train", "    _train (run minus _train = seeding + rng restore)"),
        (ClientRunner, "_read", "    _read (decode the broadcast, once per round)"),
        (ClientRunner, "_load", "    _load (copy global weights in)"),
        (ClientRunner, "_fresh_optimizers", "    _fresh_optimizers (optimiser reset)"),
        (ClientDataSource, "client_loader", LOADER),
        (ClientRunner, "_loop", LOOP),
        (ClientLog, "log", "      ClientLog.log (the task's self.log, per step)"),
        (ClientLog, "results", "    ClientLog.results (logged values reduced)"),
        (Channel, "upload", "    channel.upload (encode the upload)"),
        (Channel, "read_upload", "channel.read_upload (decode the uploads)"),
        (FedAvg, "aggregate", "strategy.aggregate (weighted average)"),
        (FailureGuard, "check", "failures.check"),
        (module_mod, "round_summary", "round_summary (bytes, cohort)"),
        (FedAvg, "apply", "strategy.apply (server step)"),
        (PruningState, "end_round", "pruning.end_round (statistics)"),
        (module_mod, "count_optimizer_step", "count_optimizer_step"),
        (module_mod, "log_round", "log_round (round metrics to Lightning)"),
    ]
    originals = []
    for obj, attr, label in targets:
        fn = getattr(obj, attr)
        originals.append((obj, attr, fn))

        def wrapped(*a, __fn=fn, __label=label, **k):
            t0 = time.perf_counter()
            try:
                return __fn(*a, **k)
            finally:
                acc[__label] = acc.get(__label, 0.0) + time.perf_counter() - t0

        setattr(obj, attr, wrapped)
    per: dict[str, list[float]] = {}
    rounds_ms: list[float] = []
    plain_ms: list[float] = []
    plain_steps_ms: list[float] = []
    outside_ms: list[float] = []
    try:
        for _ in range(reps):
            acc.clear()
            _, rounds = setup.run_ours()
            for label in [t[2] for t in targets]:
                per.setdefault(label, []).append(acc.get(label, 0.0) / setup.R * 1e3)
            rounds_ms.append(sum(rounds) / setup.R * 1e3)
            setup.steps_s = 0.0
            _, prounds = setup.run_plain()
            plain_ms.append(sum(prounds) / setup.R * 1e3)
            plain_steps_ms.append(setup.steps_s / setup.R * 1e3)
            # outside the local steps, per client: ours = the round minus its clients' local steps (_loop without
            # the loader's construction), plain = its round minus its steps (optimiser and loader construction)
            ours_steps = per[LOOP][-1] - per[LOADER][-1]
            outside_ms.append(((rounds_ms[-1] - ours_steps) - (plain_ms[-1] - plain_steps_ms[-1])) / setup.C)
    finally:
        for obj, attr, fn in originals:
            setattr(obj, attr, fn)
    print(f"\n-- MLP {setup.in_dim}-{setup.depth}x{setup.hidden}-10: time per round by engine piece (instrumented, mean over "
          f"{setup.R} rounds incl. the first, median of {reps} fits; per client: divide by {setup.C}) --")
    rows = [["whole round (on_fed_round_start -> on_fed_round_end)", median(rounds_ms)]]
    rows += [[label, median(v)] for label, v in per.items()]
    rows.append(["plain reference loop, one round (for comparison with _loop)", median(plain_ms)])
    rows.append(["  its local steps (the for loop over the loader)", median(plain_steps_ms)])
    print(table(rows, ["piece", "ms / round"]))
    print(f"OUTSIDE the local steps, per client, ours minus plain: {median(outside_ms):.3f} ms (repetitions "
          f"{', '.join(f'{x:.3f}' for x in outside_ms)}); local steps included: "
          f"{(median(rounds_ms) - median(plain_ms)) / setup.C:.3f} ms   [{load()}]")
    return median(outside_ms)


def _trim(text: str) -> str:
    lines = text.splitlines()
    out = []
    started = False
    for line in lines:
        if "ncalls" in line:
            started = True
        if started and line.strip():
            out.append(line.replace("/work/main/", "").replace(".venv/lib/python3.11/site-packages/", ""))
    return "\n".join(out)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    apply_threads(args)
    quiet_lightning()
    reps = args.reps or (2 if args.quick else 7)
    rounds = args.rounds or (3 if args.quick else 10)
    header("P1 round overhead: federated round via Trainer vs plain PyTorch loop", args)
    sizes = dict(list(SIZES.items())[:1]) if args.quick else SIZES
    rows = []
    main_ratio = None
    tiny_ratio = None
    client_ms = None
    for label, (in_dim, hidden, depth) in sizes.items():
        setup = Setup(in_dim, hidden, depth, args.clients, args.steps, args.batch, rounds)
        print(f"\n-- {label}: C={args.clients} clients x K={args.steps} steps, batch {args.batch}, {rounds} rounds per fit, "
              f"{reps} reps (alternating ours / plain / fedavg-by-hand)")
        res = measure(setup, reps)
        r_round = res["ours"]["round"] / res["plain"]["round"]
        r_fit = res["ours"]["fit"] / res["plain"]["fit"]
        r_hand = res["ours"]["round"] / res["fedavg_by_hand"]["round"]
        if main_ratio is None:
            main_ratio = r_round
        if "tiny" in label:
            tiny_ratio = r_round
        per_step_us = (res["ours"]["round"] - res["plain"]["round"]) / (args.clients * args.steps) * 1e6
        per_client_ms = (res["ours"]["round"] - res["plain"]["round"]) / args.clients * 1e3
        if "per-client" in label:
            client_ms = per_client_ms
        rows.append([label, res["ours"]["round"] * 1e3, res["plain"]["round"] * 1e3, res["fedavg_by_hand"]["round"] * 1e3,
                     r_round, r_hand, per_step_us, per_client_ms, res["ours"]["fit"], res["plain"]["fit"], r_fit, load()])
    print()
    print(table(rows, ["model", "ours ms/round", "plain ms/round", "by-hand ms/round", "ratio round (ours/plain)",
                       "ours/by-hand", "overhead us/step", "overhead ms/client", "ours fit s", "plain fit s",
                       "ratio whole fit", "load"]))
    verdict("P1 per-round ratio ours/plain (main size)", main_ratio, GOAL)
    if tiny_ratio is not None:
        verdict("P1 per-round ratio ours/plain (tiny MLP)", tiny_ratio, TINY_GOAL)
    if client_ms is not None:
        print(f"overhead per client, its local steps included (MLP 32-128-10): {client_ms:.3f} ms")
    if not args.no_profile:
        in_dim, hidden, depth = next(iter(sizes.values()))
        breakdown(Setup(in_dim, hidden, depth, args.clients, args.steps, args.batch, rounds), 2 if args.quick else 5)
        if not args.quick:  # the per-client goal's model: where its overhead goes, and the part outside the steps
            outside = breakdown(Setup(*SIZES["mlp 32-1x128-10 (per-client goal)"], args.clients, args.steps, args.batch,
                                      rounds), 5)
            verdict("overhead per client outside the local steps (MLP 32-128-10)", outside, CLIENT_GOAL_MS, unit=" ms")
        profile_ours(Setup(in_dim, hidden, depth, args.clients, args.steps, args.batch, rounds), 25 if not args.quick else 12)


if __name__ == "__main__":
    main()
