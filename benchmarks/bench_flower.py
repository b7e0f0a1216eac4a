"""Flower: the per-round time of identical work on three engines, side by side in one run.

Work per round: 10 clients x 20 local SGD steps of MLPClassifier(64 -> 3x256 -> 10), batch 32, every
client every round, FedAvg, no pruning, one torch intra-op thread everywhere:

* ``in-process``: the fedprune YAML below, ``fedprune fit`` (sequential executor) in this process;
* ``FlowerExecutor``: the same YAML through examples/flower (its ServerApp and ClientApp) on Flower's
  simulation engine (``flwr.simulation.run_simulation``, Ray backend, 10 SuperNodes, one ClientApp actor
  with every core, so clients train one after another as in-process);
* ``Flower FedAvg``: Flower's own ``FedAvg`` strategy (``flwr.server.strategy.FedAvg``, ``ServerApp(server_fn)``)
  with a plain ``NumPyClient`` that loads the parameters, runs the same 20 SGD steps in a plain torch loop
  on the same client data and returns its parameters, on the same simulation engine.

Round time: the wall time between the ends of consecutive rounds (a callback; for Flower's FedAvg, its
``aggregate_fit``); the first two rounds of a run are dropped (they absorb Ray's actor start and the
ClientApp's imports and build), a run's value is the median of the others. The three alternate run by
run (in-process, FlowerExecutor, FedAvg, FedAvg, FlowerExecutor, in-process, ...); the figures are
medians over the repetitions, and the ratios are printed.

    python benchmarks/bench_flower.py
    python benchmarks/bench_flower.py --quick
    python benchmarks/bench_flower.py --model small   # MLP 32-128-10: the per-client overhead goal

A fourth run, the plain loop (the same steps, nothing else), is the compute floor: each engine's whole
overhead per client is (its round - the plain round) / 10, paired by repetition (the engine's bookkeeping
inside the local steps included; ``bench_round_overhead.py`` separates the part outside them).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

from _common import ROOT, alternate, base_parser, header, median, quiet_lightning, table

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
import yaml

APP = ROOT / "examples" / "flower"
sys.path.insert(0, str(APP))
# Ray's worker processes import the ClientApps: they find this checkout and the app on PYTHONPATH
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(APP), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

CLIENTS, STEPS, BATCH = 10, 20, 32
#: --model: (in_dim, hidden, depth) of the MLP; "small" is the 32-128-10 MLP of the per-client overhead goal
MODELS = {"main": (64, 256, 3), "small": (32, 128, 1)}
TASK: dict = {}
DATA: dict = {}


def configure(model: str) -> None:
    """Set the task and data of ``model``; Ray's workers import this module and read the same choice from the
    environment (they inherit it from this process)."""
    os.environ["BENCH_FLOWER_MODEL"] = model
    in_dim, hidden, depth = MODELS[model]
    TASK.update(in_dim=in_dim, hidden=hidden, num_classes=10, depth=depth, lr=0.05)
    DATA.update(num_samples=CLIENTS * 320, dim=in_dim, num_classes=10, noise=2.0, seed=0)


configure(os.environ.get("BENCH_FLOWER_MODEL", "main"))


def write_config(folder: Path, rounds: int) -> Path:
    config = {
        "seed_everything": 0,
        "torch_threads": 1,
        "model": {"task": {"class_path": "lightning_fedprune.demos.MLPClassifier", "init_args": TASK},
                  "clients_per_round": CLIENTS, "local_steps": STEPS, "seed": 0},
        "data": {"class_path": "lightning_fedprune.FederatedDataModule", "init_args": {
            "train_dataset": {"class_path": "lightning_fedprune.demos.GaussianMixtureDataset", "init_args": DATA},
            "partition": "iid", "num_clients": CLIENTS, "batch_size": BATCH}},
        "trainer": {"max_steps": rounds, "logger": False, "enable_checkpointing": False, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0},
    }
    path = folder / "bench_flower.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class RoundEnds(pl.Callback):
    """When each round ended (perf_counter)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_fed_round_end(self, trainer, pl_module, summary) -> None:
        self.ends.append(time.perf_counter())


def per_round(ends: list[float], skip: int = 2) -> float:
    gaps = np.diff(ends)[skip - 1:]
    return float(np.median(gaps))


def simulate(server_app, client_app) -> None:
    """Flower's simulation engine with 10 SuperNodes; Ray is shut down after it, so the next run starts a fresh
    cluster (a second cluster in one process otherwise finds the first's actors holding every core)."""
    import ray
    from flwr.simulation import run_simulation

    try:
        run_simulation(server_app, client_app, num_supernodes=CLIENTS, backend_config=backend())
    finally:
        if ray.is_initialized():
            ray.shutdown()


def backend() -> dict:
    cores = os.cpu_count() or 1
    return {"client_resources": {"num_cpus": cores, "num_gpus": 0.0},
            "init_args": {"num_cpus": cores, "logging_level": "ERROR", "log_to_driver": False}}


# ------------------------------------------------------------------ the three engines
def run_in_process(config: Path) -> float:
    from lightning_fedprune.cli import build_cli

    cli = build_cli(["--config", str(config), "--quiet=true"], run=False)
    clock = RoundEnds()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return per_round(clock.ends)


def run_flower_executor(config: Path) -> float:
    from flwr.serverapp import ServerApp

    from fedprune_flower.client_app import app as client_app
    from fedprune_flower.task import server_cli

    clock = RoundEnds()
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        cli = server_cli(grid, {"config": str(config), "quiet": True})
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    simulate(server, client_app)
    if len(clock.ends) < 3:
        raise RuntimeError("the FlowerExecutor run did not finish its rounds (see the log above)")
    return per_round(clock.ends)


def make_mlp() -> torch.nn.Module:
    from lightning_fedprune.demos import MLPClassifier

    return MLPClassifier(**TASK)


def client_data():
    from lightning_fedprune import FederatedDataModule
    from lightning_fedprune.demos import GaussianMixtureDataset

    return FederatedDataModule(GaussianMixtureDataset(**DATA), partition="iid", num_clients=CLIENTS,
                               batch_size=BATCH).client_data()


def local_steps(model: torch.nn.Module, data, cid: int, seed: int) -> None:
    """STEPS plain SGD steps of client ``cid`` (a fresh optimiser; the loader restarts, reseeded, when it runs out)."""
    opt = torch.optim.SGD(model.parameters(), lr=TASK["lr"])
    steps = 0
    while steps < STEPS:
        for x, y in data.client_loader(cid, seed=seed + steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == STEPS:
                break


_READY: dict[str, object] = {}  # the model and the data of a PlainClient process, made once (as Flower's examples cache data)


def plain_client(cid: int):
    """Flower's usual client: set the parameters, a plain torch loop, return the parameters (a NumPyClient)."""
    from flwr.client import NumPyClient

    torch.set_num_threads(1)
    if not _READY:
        _READY.update(model=make_mlp(), data=client_data())
    model, data = _READY["model"], _READY["data"]

    class PlainClient(NumPyClient):
        def fit(self, parameters, config):
            state = OrderedDict((k, torch.from_numpy(np.copy(v))) for k, v in zip(model.state_dict(), parameters))
            model.load_state_dict(state)
            local_steps(model, data, cid, seed=0)
            return [t.detach().cpu().numpy() for t in model.state_dict().values()], data.client_size(cid), {}

    return PlainClient()


def run_plain_loop(rounds: int) -> float:
    """The compute alone: the same clients' 20 SGD steps in a plain torch loop, one model, nothing copied,
    averaged or logged (the floor every engine's round time is compared with)."""
    torch.set_num_threads(1)
    model, data = make_mlp(), client_data()
    model.train()
    ends = []
    for rnd in range(rounds):
        for cid in range(CLIENTS):
            local_steps(model, data, cid, seed=rnd * CLIENTS + cid)
        ends.append(time.perf_counter())
    return per_round(ends)


def run_flower_fedavg(rounds: int) -> float:
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg

    ends: list[float] = []

    class TimedFedAvg(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            if failures or len(results) != CLIENTS:
                raise RuntimeError(f"round {server_round}: {len(results)} results, {len(failures)} failures")
            out = super().aggregate_fit(server_round, results, failures)
            ends.append(time.perf_counter())
            return out

    initial = ndarrays_to_parameters([t.detach().numpy() for t in make_mlp().state_dict().values()])

    def server_fn(context):
        strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=CLIENTS,
                               min_available_clients=CLIENTS, initial_parameters=initial)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    def client_fn(context):
        return plain_client(int(context.node_config["partition-id"])).to_client()

    simulate(ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn))
    if len(ends) < 3:
        raise RuntimeError("the Flower FedAvg run did not finish its rounds with every client (see the log above)")
    return per_round(ends)


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds per run (the first two are dropped)")
    parser.add_argument("--reps", type=int, default=3, help="runs of each engine (alternating)")
    parser.add_argument("--model", choices=sorted(MODELS), default="main",
                        help="main: MLP 64-3x256-10; small: MLP 32-1x128-10 (the per-client overhead goal's)")
    args = parser.parse_args()
    configure(args.model)
    if args.quick:
        args.rounds, args.reps = 4, 1
    torch.set_num_threads(1)
    quiet_lightning()
    header(f"Flower: per-round time of 10 clients x 20 steps of MLP {TASK['in_dim']}-{TASK['depth']}x{TASK['hidden']}-10, "
           "in-process vs FlowerExecutor vs Flower FedAvg (and the plain loop)", args)
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), args.rounds)
        times = alternate({"in-process": lambda: run_in_process(config),
                           "FlowerExecutor": lambda: run_flower_executor(config),
                           "Flower FedAvg": lambda: run_flower_fedavg(args.rounds),
                           "plain loop": lambda: run_plain_loop(args.rounds)}, args.reps)
    ours, flower, fedavg, plain = (times[k] for k in ("in-process", "FlowerExecutor", "Flower FedAvg", "plain loop"))
    print(table([["in-process (sequential)", median(ours), min(ours), max(ours)],
                 ["FlowerExecutor, Flower simulation", median(flower), min(flower), max(flower)],
                 ["Flower FedAvg + NumPyClient, Flower simulation", median(fedavg), min(fedavg), max(fedavg)],
                 ["plain torch loop, same steps (compute only)", median(plain), min(plain), max(plain)]],
                ["engine", "s / round (median)", "min", "max"]))
    # ratios within a repetition (its three runs ran minutes apart at most), then their median: a load that
    # changes between repetitions moves both sides of a pair alike
    for name, a, b in [("FlowerExecutor / in-process", flower, ours),
                       ("Flower FedAvg + NumPyClient / in-process", fedavg, ours),
                       ("FlowerExecutor / Flower FedAvg + NumPyClient", flower, fedavg)]:
        pairs = [x / y for x, y in zip(a, b)]
        print(f"RATIO {name}: {median(pairs):.3f} (median of the repetitions' ratios "
              f"{', '.join(f'{r:.2f}' for r in pairs)}; ratio of the medians {median(a) / median(b):.3f})")
    # the whole overhead per client: (engine round - plain round) / clients, paired by repetition
    over = {name: [(x - y) / CLIENTS * 1e3 for x, y in zip(t, plain)]
            for name, t in [("in-process", ours), ("FlowerExecutor", flower), ("Flower FedAvg + NumPyClient", fedavg)]}
    for name, values in over.items():
        print(f"OVERHEAD per client over the plain loop (round minus the same steps' compute), {name}: {median(values):.3f} ms "
              f"(repetitions {', '.join(f'{v:.3f}' for v in values)})")
    ratio = [f / o for f, o in zip(over["Flower FedAvg + NumPyClient"], over["in-process"]) if o > 0]
    if ratio:
        print(f"RATIO Flower FedAvg's per-client overhead / in-process's: {median(ratio):.1f}x "
              f"(goal >= 40x; repetitions {', '.join(f'{r:.1f}' for r in ratio)})")


if __name__ == "__main__":
    main()
