"""P6 process pool: ProcessPoolExecutor(2 workers) vs SequentialExecutor on a 2-core machine.

Compute-bound clients: 8 clients x 20 local steps of MLPClassifier(in_dim=128, hidden=512,
depth=3), batch 64, SGD; every round trains all 8 clients. The same federated fit
(FederatedLightningModule + Trainer(max_steps=R)) is run with

* ``pool``: ``ProcessPoolExecutor(num_workers=2, threads_per_worker=1)`` (the default start method)
  (what ``executor="process"`` gives on 2 cores: cores // workers = 1 thread each);
* ``seq-1t``: ``executor="sequential"`` with ``torch.set_num_threads(1)`` in the server process;
* ``seq-2t`` (with ``--seq2``): ``executor="sequential"`` with 2 intra-op threads (torch's
  default on 2 cores; pathologically slow while other processes load the machine).

Round time: perf_counter from ``on_fed_round_start`` to ``on_fed_round_end`` (a callback); the
first round of each fit is dropped (for the pool it also absorbs the workers' start-up: spawn,
imports, unpickling the task and data), the per-fit value is the median of the remaining
rounds. Worker start-up is reported separately: the executor's ``setup`` (pickling + starting
the processes: on_fit_start -> on_train_start of a callback) and the extra time of round 0 over
a steady round. The three variants alternate fit by fit; median over >= 5 fits each.

The goal ratio is pool / seq-1t (the stricter reference: on this loaded machine one thread is
faster than two for the sequential executor, see docs/benchmarks.md).

    python benchmarks/bench_process_pool.py
    python benchmarks/bench_process_pool.py --seq2 --reps 3 --rounds 3
    python benchmarks/bench_process_pool.py --quick

Start-up (``--startup``): the pool's start-up per fit, ``start_method="spawn"`` vs ``"forkserver"``
(the default: workers forked from a server that imported torch, Lightning and the client loop once;
the server is started when the executor is made, so its imports overlap with the Trainer's own
setup). Fresh processes of 3 fits each (the forkserver lives once per process: its first fit
pays its imports), the two methods alternating, 3 processes each:

* setup s: on_fit_start -> the first round's start (a callback): the executor's ``setup`` (pickling
  the task and data, starting the 2 workers in the background -- or, while the forkserver is still
  importing, leaving them to start once it is ready) and the few Lightning hooks between, for a
  process's first fit and for its later fits. Until a worker is ready the server trains the clients
  itself, so the first rounds of a first fit run at the sequential executor's pace;
* made -> ready s: from making the executor to the first round's start (includes the Trainer's setup);
* results: the fit's final weights, checked equal across the methods and to the sequential executor.

    python benchmarks/bench_process_pool.py --startup
"""

from __future__ import annotations

import time

from _common import alternate, base_parser, header, load, median, quiet_lightning, quiet_trainer, table, verdict

import lightning.pytorch as pl
import torch

from lightning_fedprune import FederatedDataModule, FederatedLightningModule, ProcessPoolExecutor
from lightning_fedprune.demos import GaussianMixtureDataset, MLPClassifier

GOAL = 0.6


def _cpu_seconds(pid: int | None = None) -> float:
    """utime + stime of a process (all its threads) from /proc/<pid>/stat."""
    if pid is None:
        return time.process_time()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


_TICKS = __import__("os").sysconf("SC_CLK_TCK")


class Clock(pl.Callback):
    """Round wall time, and the CPU time our client code got in the round (the server process for the
    sequential executor, the two workers for the pool): cpu / wall = cores actually obtained."""

    def __init__(self) -> None:
        self.rounds: list[float] = []
        self.cores: list[float] = []
        self.fit_start = self.train_start = 0.0
        self._t0 = 0.0
        self._c0 = 0.0
        self._pids: list[int | None] = [None]
        self.client_s: list[float] = []  # ClientResult.seconds: one client's run() where it ran
        self.server_cpu: list[float] = []
        self._s0 = 0.0
        self._round_clients: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:  # called before the module's on_fit_start (executor setup)
        self.fit_start = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_start = time.perf_counter()
        pids = getattr(pl_module.executor, "worker_pids", None)  # the pool's workers, for CPU accounting
        if pids:
            self._pids = [None, *pids]

    def _cpu(self) -> float:
        return sum(_cpu_seconds(pid) for pid in self._pids)

    def on_fed_round_start(self, trainer, pl_module, round, cohort) -> None:
        self._c0 = self._cpu()
        self._s0 = time.process_time()
        self._t0 = time.perf_counter()
        self._round_clients = []

    def on_fed_client_result(self, trainer, pl_module, result) -> None:
        self._round_clients.append(result.seconds)

    def on_fed_round_end(self, trainer, pl_module, summary) -> None:
        wall = time.perf_counter() - self._t0
        self.rounds.append(wall)
        self.cores.append((self._cpu() - self._c0) / wall)
        self.server_cpu.append(time.process_time() - self._s0)
        self.client_s.append(median(self._round_clients))


def fit(variant: str, clients: int, steps: int, batch: int, rounds: int, dataset) -> Clock:
    torch.set_num_threads(2 if variant == "seq-2t" else 1)
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=128, hidden=512, depth=3, num_classes=10, lr=0.05)
    dm = FederatedDataModule(dataset, num_clients=clients, batch_size=batch, seed=0)
    executor = ProcessPoolExecutor(num_workers=2, threads_per_worker=1) if variant == "pool" \
        else "sequential"
    fed = FederatedLightningModule(task, clients_per_round=clients, local_steps=steps, executor=executor, seed=0)
    clock = Clock()
    quiet_trainer(max_steps=rounds, callbacks=[clock]).fit(fed, datamodule=dm)
    assert len(clock.rounds) == rounds
    return clock


def startup_child(method: str, fits: int = 3) -> None:
    """``fits`` fits in this fresh process; prints a JSON line (start-up times, a digest of the weights)."""
    import hashlib
    import json
    import warnings

    warnings.filterwarnings("ignore")
    quiet_lightning()
    torch.set_num_threads(1)
    out: dict = {"setup_s": [], "made_to_ready_s": [], "digest": None}
    for _ in range(fits):
        made = time.perf_counter()
        executor = "sequential" if method == "sequential" else ProcessPoolExecutor(num_workers=2, start_method=method,
                                                                                 threads_per_worker=1)
        dm = FederatedDataModule(GaussianMixtureDataset(512, dim=32, num_classes=10, seed=0), num_clients=8,
                                 batch_size=32)
        torch.manual_seed(0)
        fed = FederatedLightningModule(MLPClassifier(in_dim=32, hidden=64, num_classes=10), clients_per_round=8,
                                       local_steps=5, executor=executor, seed=0)
        marks = {}

        class Marks(pl.Callback):
            def on_fit_start(self, trainer, pl_module):
                marks["fit_start"] = time.perf_counter()

            def on_fed_round_start(self, trainer, pl_module, round, cohort):
                marks.setdefault("ready", time.perf_counter())  # the first round: after the module's on_train_start

        quiet_trainer(max_steps=3, callbacks=[Marks()]).fit(fed, datamodule=dm)
        out["setup_s"].append(marks["ready"] - marks["fit_start"])
        out["made_to_ready_s"].append(marks["ready"] - made)
        out["digest"] = hashlib.sha256(b"".join(t.numpy().tobytes() for t in fed.task.state_dict().values())).hexdigest()[:16]
    print(json.dumps(out))


def startup(args) -> None:
    import json
    import subprocess
    import sys

    header("P6 process pool start-up per fit: spawn vs forkserver (3 fits in each fresh process)", args)
    methods = ["spawn", "forkserver"]
    runs: dict[str, list[dict]] = {m: [] for m in [*methods, "sequential"]}
    for rep in range(args.reps or 3):
        for method in (methods if rep % 2 == 0 else methods[::-1]) + (["sequential"] if rep == 0 else []):
            out = subprocess.run([sys.executable, __file__, "--startup-child", method], capture_output=True, text=True,
                                 timeout=900)
            if out.returncode != 0:
                print(out.stderr[-3000:])
                raise SystemExit(out.returncode)
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[method][-1]
            print(f"   {method}: setup per fit {', '.join(f'{x:.3f}' for x in r['setup_s'])} s   [{load()}]")
    digests = {r["digest"] for rs in runs.values() for r in rs}
    rows = [[m, median([r["setup_s"][0] for r in runs[m]]), median([x for r in runs[m] for x in r["setup_s"][1:]]),
             median([r["made_to_ready_s"][0] for r in runs[m]])] for m in methods]
    print()
    print(table(rows, ["start method", "setup s, first fit of a process", "setup s, later fits",
                       "made -> ready s, first fit"]))
    print(f"   final weights: {'identical' if len(digests) == 1 else 'DIFFERENT'} across spawn, forkserver and the "
          f"sequential executor ({len(digests)} digest)   [{load()}]")
    verdict("P6 pool start-up per fit after the first (forkserver setup s)", rows[1][2], 1.5, unit=" s")
    verdict("P6 pool start-up of a process's first fit (forkserver setup s)", rows[1][1], 1.5, unit=" s")


def main() -> None:
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "--startup-child":
        startup_child(sys.argv[2])
        return
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq2", action="store_true",
                   help="also run the sequential executor with 2 intra-op threads (very slow on a loaded machine)")
    p.add_argument("--startup", action="store_true", help="measure the start-up per fit, spawn vs forkserver")
    args = p.parse_args()
    if args.startup:
        startup(args)
        return
    quiet_lightning()
    reps = args.reps or (2 if args.quick else 5)
    rounds = args.rounds or (3 if args.quick else 6)
    torch.set_num_threads(1)  # each variant sets its own server-process thread count again in fit()
    header("P6 process pool (2 workers) vs sequential executor", args)
    dataset = GaussianMixtureDataset(num_samples=args.clients * args.steps * args.batch, dim=128, num_classes=10, seed=0)
    variants = ["pool", "seq-1t"] + (["seq-2t"] if args.seq2 else [])
    steady: dict[str, list[float]] = {v: [] for v in variants}
    cores: dict[str, list[float]] = {v: [] for v in variants}
    client_s: dict[str, list[float]] = {v: [] for v in variants}
    server_cpu: dict[str, list[float]] = {v: [] for v in variants}
    startup_setup: list[float] = []
    startup_extra: list[float] = []

    def make(variant):
        def fn() -> float:
            clock = fit(variant, args.clients, args.steps, args.batch, rounds, dataset)
            s = median(clock.rounds[1:])
            cores[variant].append(median(clock.cores[1:]))
            client_s[variant].append(median(clock.client_s[1:]))
            server_cpu[variant].append(median(clock.server_cpu[1:]))
            if variant == "pool":
                startup_setup.append(clock.train_start - clock.fit_start)
                startup_extra.append(clock.rounds[0] - s)
            steady[variant].append(s)
            return s
        return fn

    fit("seq-1t", args.clients, args.steps, args.batch, 2, dataset)  # warm-up
    print(f"   {args.clients} clients x {args.steps} steps, batch {args.batch}, {rounds} rounds per fit, {reps} fits each")
    alternate({v: make(v) for v in variants}, reps)
    med = {v: median(steady[v]) for v in variants}
    ref2 = med.get("seq-2t")
    rows = [[v, med[v], min(steady[v]), max(steady[v]), med[v] / med["seq-1t"], med[v] / ref2 if ref2 else "-",
             median(cores[v]), med[v] * median(cores[v]), median(server_cpu[v]), median(client_s[v]) * 1e3]
            for v in variants]
    print()
    print(table(rows, ["executor", "round s (median)", "min", "max", "/ seq-1t", "/ seq-2t",
                       "cores obtained (cpu s / wall s)", "cpu s per round (all)", "server-process cpu s per round",
                       "one client's run() ms (where it ran)"]))
    print(f"pool start-up: executor.setup (pickle task+data, start 2 workers) {median(startup_setup):.3f} s; "
          f"round 0 took {median(startup_extra):.3f} s longer than a steady round (workers importing torch/lightning "
          f"and unpickling) -> start-up ~{median(startup_setup) + median(startup_extra):.2f} s once per fit   [{load()}]")
    verdict("P6 round time pool / sequential (1 thread)", med["pool"] / med["seq-1t"], GOAL)
    if ref2:
        verdict("P6 round time pool / sequential (2 threads, torch default)", med["pool"] / ref2, GOAL)


if __name__ == "__main__":
    main()
