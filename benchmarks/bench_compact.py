"""P4 compact vs masked-dense client: step time and training memory at S = 0.5, column pattern.

Model A (Linear-heavy): 4 x [Linear(1024, 4096), ReLU, Linear(4096, 1024)] (33.6M parameters),
batch 64, MSE to a random target, AdamW. Column pattern, S = 0.5 on all 8 Linear weights
(biases dense). Model B: the main job's Conformer-Transducer (the task of
``examples/asr/digits_fp.yaml``, 2.68M parameters), column S = 0.5 on its five pruning groups (ffn,
attention, conv, predictor, joiner) with their dependent masks, AdamW as the task configures it,
K = 10 local steps (the main job's) on batches shaped like the main job's: 10 utterances of 90-340
frames (80 mels) with transcripts of 3-7 spoken digits. Model C: the article's model
(``ConformerTransducer(preset="paper")``, 116M parameters), the same groups at S = 0.5, one client step
(3 local steps, the median of the last 2), batches of 4 utterances of 200 frames.

Measured two ways:

1. Through the real client path: ``ClientRunner(task, data, ClientConfig(local_steps=K,
   compact=True|False)).run(payload, plan)`` -- the same code the executors run, with the masks
   in the round payload. compact=True swaps the masked nn.Linear layers for CompactLinear
   (weights, grads and AdamW state physically half); compact=False trains the full layers and
   re-masks gradients and weights at every step (masked-dense). The data are K pre-built
   batches (equal for both). Step time: perf_counter at every ``on_train_batch_start`` of the
   task; the median of the intervals after the first 2 steps. Client time: the whole ``run()``
   (includes compaction, restoring full coordinates and encoding the upload).
2. The bare layer stack (model A only): an nn.Sequential trained in a hand loop, masked-dense
   (grad.mul_(mask) before and weight.mul_(mask) after AdamW.step) vs the same stack after
   ``compact_module`` (the CompactLinear forward/backward, no per-step masking).

Memory (client path and bare stack), three measures:
* "train tensors": sum of ``nbytes`` of the trained module's parameters + their ``.grad`` + all
  tensors in ``optimizer.state``, taken at the last local step (the goal's measure);
* "live tensors": all tensors alive in the process (``gc`` walk, each storage counted once) at
  the last local step, minus those alive before the ClientRunner was built -- this also counts
  the client's persistent full-size replica, which the compact client keeps while it trains;
* "peak RSS": in a fresh subprocess per mode, /proc/self/status VmHWM after the client run minus
  VmRSS just before it (VmHWM is reset via /proc/self/clear_refs first): everything, including
  activations, allocator slack and the upload encoding.

Step times: the modes alternate (dense, compact, compact, dense, ...); median of >= 5 reps.

    python benchmarks/bench_compact.py            # full
    python benchmarks/bench_compact.py --quick    # smaller stack, fewer reps, no subprocess RSS
    python benchmarks/bench_compact.py --only asr,paper --no-rss   # the Conformer models only
    python benchmarks/bench_compact.py --only paper --device cuda  # the article's model on a GPU
    python benchmarks/bench_compact.py --only profile              # where a step of model B goes, per op
"""

from __future__ import annotations

import copy
import gc
import json
import re
import subprocess
import sys
import time

from _common import (alternate, apply_threads, base_parser, header, load, median, mib, peak_rss_bytes, rss_bytes, table,
                     verdict)

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fedprune.federated.client import ClientRunner
from lightning_fedprune.federated.wire import encode_state
from lightning_fedprune.pruning.compact import compact_module
from lightning_fedprune.pruning.state import PruningState
from lightning_fedprune.federated.protocol import ClientConfig, ClientPlan, RoundPayload

GOAL_TIME, GOAL_MEM = 0.6, 0.55
GOAL_ASR_TIME, GOAL_ASR_MEM = 0.7, 0.6  # the Conformer-Transducer: round (or step) time, train-tensor memory
GROUPS = ("ffn", "attention", "conv", "predictor", "joiner")
DEVICE = "cpu"


# ----------------------------------------------------------------------------- probes
def tensor_bytes(ts) -> int:
    seen = set()
    total = 0
    for t in ts:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def train_tensor_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(module.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"params": tensor_bytes(params), "grads": tensor_bytes(p.grad for p in params), "optim": tensor_bytes(state)}


def live_storages() -> dict[int, int]:
    import warnings

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    st = obj.untyped_storage()
                    out[st.data_ptr()] = st.nbytes()
            except Exception:
                pass
    return out


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Probe:
    """Step clock + memory probe, called from the task's batch hooks."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.memory: bool = False
        self.train: dict[str, int] = {}
        self.live_at_end: dict[int, int] = {}
        self.last_step = -1

    def step_times(self, skip: int = 2) -> list[float]:
        s = self.starts
        skip = max(0, min(skip, len(s) - 3))
        return [b - a for a, b in zip(s[skip:], s[skip + 1:])]


class ProbedTask(pl.LightningModule):
    """Mixin behaviour: clock every batch start; at the last step, take the memory measures."""

    probe: Probe | None = None

    def on_train_batch_start(self, batch, batch_idx):
        if self.probe is not None:
            if DEVICE != "cpu":
                torch.cuda.synchronize()
            self.probe.starts.append(time.perf_counter())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        pr = self.probe
        if pr is not None and pr.memory and batch_idx == pr.last_step:
            opt = self.optimizers()
            opt = getattr(opt, "optimizer", opt)
            pr.train = train_tensor_bytes(self, opt)
            pr.live_at_end = live_storages()


class FFNStack(ProbedTask):
    def __init__(self, d: int = 1024, ff: int = 4096, blocks: int = 4, lr: float = 1e-3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [nn.Linear(d, ff), nn.ReLU(), nn.Linear(ff, d)]
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main_job_task_args() -> dict:
    """The task arguments of the main job (examples/asr/digits_fp.yaml)."""
    import yaml

    from _common import ROOT

    cfg = yaml.safe_load((ROOT / "examples" / "asr" / "digits_fp.yaml").read_text())
    return dict(cfg["model"]["task"]["init_args"])


def make_asr_task(kind: str = "asr"):
    from lightning_fedprune.asr.conformer_transducer import ConformerTransducer

    class ProbedConformer(ConformerTransducer, ProbedTask):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.probe is not None and DEVICE != "cpu":
                torch.cuda.synchronize()
            super().on_train_batch_end(outputs, batch, batch_idx)

    return ProbedConformer(**main_job_task_args()) if kind == "asr" else ProbedConformer(preset="paper")


class FixedBatches:
    """ClientData serving the same K pre-built batches to every client."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def client_size(self, client_id: int) -> int:
        return 64

    def client_loader(self, client_id: int, seed: int):
        return list(self.batches)


def ffn_batches(k: int, batch: int, d: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, d, generator=g), torch.randn(batch, d, generator=g)) for _ in range(k)]


def asr_batches(k: int, batch: int = 10, frames: tuple[int, int] = (90, 340)) -> list:
    """Batches shaped like the main job's: ``batch`` utterances of ``frames`` (80 mels), 3-7 spoken digits."""
    g = torch.Generator().manual_seed(0)
    digits = "zero one two three four five six seven eight nine".split()
    out = []
    for _ in range(k):
        texts = [" ".join(digits[int(i)] for i in torch.randint(0, 10, (int(torch.randint(3, 8, (1,), generator=g)),),
                                                                  generator=g)) for _ in range(batch)]
        lengths = torch.randint(frames[0], frames[1] + 1, (batch,), generator=g)
        out.append({"features": torch.randn(batch, int(lengths.max()), 80, generator=g).to(DEVICE),
                    "feature_lengths": lengths.to(DEVICE), "texts": texts})
    return out


def group_masks(task: nn.Module, sparsity: float = 0.5) -> tuple[dict, dict]:
    """Column masks of the task's pruning groups at ``sparsity``, with their dependent masks."""
    from lightning_fedprune.pruning.plan import PruningPlan, Ramp, Selection
    from lightning_fedprune.pruning.structure import structure_of

    state = PruningState()
    selection = Selection("column", "weight_l2", groups=GROUPS, structure=structure_of(task))
    state.apply_plan(PruningPlan(Ramp(sparsity), selection), [(n, tuple(p.shape)) for n, p in task.named_parameters()])
    state.recompute(dict(task.named_parameters()), sparsity, round=0)
    return dict(state.masks), dict(state.patterns)


def column_masks(task: nn.Module, regex: str, sparsity: float = 0.5) -> tuple[dict, dict]:
    params = dict(task.named_parameters())
    targets = [n for n in params if re.fullmatch(regex, n)]
    state = PruningState()
    state.configure(targets, "column", "weight_l2")
    state.recompute(params, sparsity, round=0)
    return dict(state.masks), dict(state.patterns)


def make_payload(task: nn.Module, masks: dict, patterns: dict) -> RoundPayload:
    state = {n: p.detach() for n, p in task.named_parameters()}
    state.update((n, b.detach()) for n, b in task.named_buffers())
    return RoundPayload(round=0, encoded=encode_state(state, masks, patterns))


# ----------------------------------------------------------------------------- the client path
def build(model: str, k: int, quick: bool):
    torch.manual_seed(0)
    if model == "ffn":
        d, ff, blocks = (512, 2048, 2) if quick else (1024, 4096, 4)
        task = FFNStack(d, ff, blocks)
        batches = ffn_batches(k, 64, d)
        regex = r"net\.\d+\.weight"
        masks, patterns = column_masks(task, regex)
    else:
        task = make_asr_task(model).to(DEVICE)
        batches = asr_batches(k) if model == "asr" else asr_batches(k, batch=4, frames=(200, 200))
        masks, patterns = group_masks(task)
    payload = make_payload(task, masks, patterns)
    return task, FixedBatches(batches), payload


def client_run(runner: ClientRunner, payload: RoundPayload, k: int, memory: bool = False,
               skip: int = 2) -> tuple[float, float, Probe]:
    probe = Probe()
    probe.memory = memory
    probe.last_step = k - 1
    runner.replica.probe = probe
    t0 = time.perf_counter()
    result = runner.run(payload, ClientPlan(0, 0, 1234))
    if DEVICE != "cpu":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    runner.replica.probe = None
    assert result.ok, result.error
    return median(probe.step_times(skip)), total, probe


def client_path(model: str, k: int, reps: int, quick: bool, skip: int = 2) -> dict:
    task, data, payload = build(model, k, quick)
    gc.collect()
    before = live_storages()
    runners = {mode: ClientRunner(task, data, ClientConfig(local_steps=k, compact=(mode == "compact")))
               for mode in ("dense", "compact")}
    # memory pass: one client per mode, each measured against the storages alive before the runners
    mem = {}
    for mode, runner in runners.items():
        gc.collect()
        _, _, probe = client_run(runner, payload, k, memory=True)
        live = sum(v for ptr, v in probe.live_at_end.items() if ptr not in before)
        # the other runner's replica is alive too but is not this client's: subtract it
        other = runners["compact" if mode == "dense" else "dense"].replica
        live -= tensor_bytes(list(other.parameters()) + [p.grad for p in other.parameters()])
        mem[mode] = {**probe.train, "train_total": sum(probe.train.values()), "live": live}
        for p in runner.replica.parameters():  # do not let one mode's leftover grads count for the next
            p.grad = None
    totals: dict[str, list[float]] = {"dense": [], "compact": []}

    def make(mode):
        def fn() -> float:
            step, total, _ = client_run(runners[mode], payload, k, skip=skip)
            totals[mode].append(total)
            return step

        return fn

    make("dense")()
    make("compact")()
    totals = {"dense": [], "compact": []}
    steps = alternate({"dense": make("dense"), "compact": make("compact")}, reps)
    return {"step": {m: median(v) for m, v in steps.items()}, "total": {m: median(v) for m, v in totals.items()},
            "mem": mem, "n_params": sum(p.numel() for p in task.parameters())}


# ----------------------------------------------------------------------------- bare stack
def bare_stack(k: int, reps: int, quick: bool) -> dict:
    d, ff, blocks = (512, 2048, 2) if quick else (1024, 4096, 4)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(d, ff), nn.ReLU(), nn.Linear(ff, d)]
    dense = nn.Sequential(*layers)
    names = [n for n, _ in dense.named_parameters() if n.endswith("weight")]
    state = PruningState()
    state.configure(names, "column", "weight_l2")
    state.recompute(dict(dense.named_parameters()), 0.5, round=0)
    masks, patterns = dict(state.masks), dict(state.patterns)
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    compact = copy.deepcopy(dense)
    compact_module(compact, masks, patterns)
    pairs = [(p, masks[n]) for n, p in dense.named_parameters() if n in masks]
    opt_d = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(compact.parameters(), lr=1e-3)
    batches = ffn_batches(k, 64, d)

    def run_dense() -> float:
        times = []
        for x, y in batches:
            t0 = time.perf_counter()
            opt_d.zero_grad()
            F.mse_loss(dense(x), y).backward()
            for p, m in pairs:
                p.grad.mul_(m)
            opt_d.step()
            with torch.no_grad():
                for p, m in pairs:
                    p.mul_(m)
            times.append(time.perf_counter() - t0)
        return median(times[1:])

    def run_compact() -> float:
        times = []
        for x, y in batches:
            t0 = time.perf_counter()
            opt_c.zero_grad()
            F.mse_loss(compact(x), y).backward()
            opt_c.step()
            times.append(time.perf_counter() - t0)
        return median(times[1:])

    run_dense()
    run_compact()
    steps = alternate({"dense": run_dense, "compact": run_compact}, reps)
    mem = {"dense": train_tensor_bytes(dense, opt_d), "compact": train_tensor_bytes(compact, opt_c)}
    for m in mem.values():
        m["train_total"] = sum(m.values())
    return {"step": {m: median(v) for m, v in steps.items()}, "mem": mem}


# ----------------------------------------------------------------------------- subprocess RSS
def child(model: str, mode: str, k: int, threads: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)
    task, data, payload = build(model, k, quick=False)
    runner = ClientRunner(task, data, ClientConfig(local_steps=k, compact=(mode == "compact")))
    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    runner.run(payload, ClientPlan(0, 0, 1234))
    print(json.dumps({"base": base, "peak": peak_rss_bytes()}))


def rss_peaks(model: str, k: int, reps: int, threads: int) -> dict[str, float]:
    out: dict[str, list[float]] = {"dense": [], "compact": []}
    for rep in range(reps):
        for mode in (("dense", "compact") if rep % 2 == 0 else ("compact", "dense")):
            cmd = [sys.executable, __file__, "--child", model, mode, str(k), str(threads or 0)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            d = json.loads(res.stdout.strip().splitlines()[-1])
            out[mode].append(d["peak"] - d["base"])
    return {m: median(v) for m, v in out.items()}


# ----------------------------------------------------------------------------- main
def report_client(label: str, res: dict, rss: dict | None) -> tuple[float, float]:
    st, tot, mem = res["step"], res["total"], res["mem"]
    r_step = st["compact"] / st["dense"]
    r_total = tot["compact"] / tot["dense"]
    r_train = mem["compact"]["train_total"] / mem["dense"]["train_total"]
    r_live = mem["compact"]["live"] / mem["dense"]["live"]
    rows = [
        ["step time (median) ms", st["dense"] * 1e3, st["compact"] * 1e3, r_step],
        ["whole client run() s (K steps + compaction + upload encoding)", tot["dense"], tot["compact"], r_total],
        ["params MiB", mib(mem["dense"]["params"]), mib(mem["compact"]["params"]),
         mem["compact"]["params"] / mem["dense"]["params"]],
        ["grads MiB", mib(mem["dense"]["grads"]), mib(mem["compact"]["grads"]),
         mem["compact"]["grads"] / max(1, mem["dense"]["grads"])],
        ["AdamW state MiB", mib(mem["dense"]["optim"]), mib(mem["compact"]["optim"]),
         mem["compact"]["optim"] / max(1, mem["dense"]["optim"])],
        ["train tensors (params+grads+optim) MiB", mib(mem["dense"]["train_total"]), mib(mem["compact"]["train_total"]),
         r_train],
        ["live tensors incl. the client's full replica MiB", mib(mem["dense"]["live"]), mib(mem["compact"]["live"]), r_live],
    ]
    if rss:
        rows.append(["peak RSS over the client run (subprocess) MiB", mib(rss["dense"]), mib(rss["compact"]),
                     rss["compact"] / rss["dense"]])
    print(f"\n-- {label} ({res['n_params'] / 1e6:.2f}M params), client path (ClientRunner) [{load()}] --")
    print(table(rows, ["measure", "masked-dense", "compact", "compact / dense"]))
    return r_step, r_train


def main() -> None:
    global DEVICE
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, model, mode, k, threads = sys.argv
        child(model, mode, int(k), int(threads))
        return
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="local steps per client run (FFN stack)")
    p.add_argument("--only", default="ffn,asr,paper",
                   help="comma-separated: ffn (model A), asr (B), paper (C), profile (B's step by op)")
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--device", default="cpu", help="where models B and C train (cpu, cuda)")
    args = p.parse_args()
    apply_threads(args)
    DEVICE = args.device
    import warnings

    warnings.filterwarnings("ignore", message=".*Trying to infer the `batch_size`.*")
    only = set(args.only.split(","))
    reps = args.reps or (2 if args.quick else 5)
    k = args.steps or (4 if args.quick else 12)
    header("P4 compact vs masked-dense client (column, S=0.5, AdamW)", args)

    if "ffn" in only:
        res = client_path("ffn", k, reps, args.quick)
        rss = None if (args.quick or args.no_rss) else rss_peaks("ffn", k, 3, args.threads)
        label = "FFN stack 2 x [512->2048->512]" if args.quick else "FFN stack 4 x [1024->4096->1024], batch 64"
        r_step, r_mem = report_client(label, res, rss)

        bare = bare_stack(k, reps, args.quick)
        bs, bm = bare["step"], bare["mem"]
        print(f"\n-- same stack, bare layers in a hand loop (no ClientRunner) [{load()}] --")
        print(table([
            ["step time (median) ms", bs["dense"] * 1e3, bs["compact"] * 1e3, bs["compact"] / bs["dense"]],
            ["train tensors (params+grads+optim) MiB", mib(bm["dense"]["train_total"]), mib(bm["compact"]["train_total"]),
             bm["compact"]["train_total"] / bm["dense"]["train_total"]],
        ], ["measure", "masked-dense", "compact", "compact / dense"]))

        verdict("P4 client step time compact/dense (FFN stack, client path)", r_step, GOAL_TIME)
        verdict("P4 train-tensor memory compact/dense (FFN stack, client path)", r_mem, GOAL_MEM)
        verdict("P4 bare stack step time compact/dense", bs["compact"] / bs["dense"], GOAL_TIME)

    if "asr" in only:
        kk = 4 if args.quick else 10
        res = client_path("asr", kk, reps, args.quick)
        rss = None if (args.quick or args.no_rss or DEVICE != "cpu") else rss_peaks("asr", kk, 3, args.threads)
        print_layers("asr")
        report_client("the main job's Conformer-Transducer (digits_fp.yaml), five groups column S=0.5, K=10 steps, "
                      "B=10 x 90-340 frames", res, rss)
        mem = res["mem"]
        verdict("P4 main-job model: client round time compact/dense (whole run(), K=10)",
                res["total"]["compact"] / res["total"]["dense"], GOAL_ASR_TIME)
        verdict("P4 main-job model: train-tensor memory compact/dense",
                mem["compact"]["train_total"] / mem["dense"]["train_total"], GOAL_ASR_MEM)

    if "profile" in only:
        profile_steps()

    if "paper" in only:
        res = client_path("paper", 3, max(2, reps - 2) if not args.quick else 1, args.quick, skip=1)
        print_layers("paper")
        report_client(f"the article's model (preset='paper') on {DEVICE}, five groups column S=0.5, one client step "
                      "(median of steps 2-3), B=4 x 200 frames", res, None)
        mem = res["mem"]
        verdict(f"P4 paper model ({DEVICE}): client step time compact/dense", res["step"]["compact"] / res["step"]["dense"],
                GOAL_ASR_TIME)
        verdict(f"P4 paper model ({DEVICE}): train-tensor memory compact/dense",
                mem["compact"]["train_total"] / mem["dense"]["train_total"], GOAL_ASR_MEM)


def profile_steps(steps: int = 5) -> None:
    """``torch.profiler`` self CPU time per op and step of model B's masked-dense and compact steps (bare loop)."""
    from torch.profiler import ProfilerActivity, profile

    from lightning_fedprune.pruning.compact import MaskedDense

    torch.manual_seed(0)
    task = make_asr_task("asr")
    masks, patterns = group_masks(task)
    batches = asr_batches(steps + 1)
    dense, compact = copy.deepcopy(task).train(), copy.deepcopy(task).train()
    masked = MaskedDense.from_module(dense, masks)
    masked.apply_()
    compact_module(compact, masks, patterns)
    per_op: dict[str, dict[str, float]] = {}
    for mode, model in (("dense", dense), ("compact", compact)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(batch):
            opt.zero_grad()
            model.training_step(batch, 0).backward()
            if model is dense:
                masked.mask_grads_()
            opt.step()
            if model is dense:
                masked.apply_()

        step(batches[0])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[1:]:
                step(batch)
        per_op[mode] = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    ops = sorted(set(per_op["dense"]) | set(per_op["compact"]),
                 key=lambda k: -max(per_op["dense"].get(k, 0.0), per_op["compact"].get(k, 0.0)))
    rows = [[op, per_op["dense"].get(op, 0.0), per_op["compact"].get(op, 0.0)] for op in ops[:16]]
    rows.append(["all ops", sum(per_op["dense"].values()), sum(per_op["compact"].values())])
    print(f"\n-- model B, self CPU ms per step by op (torch.profiler, {steps} steps each, bare loop) [{load()}] --")
    print(table(rows, ["op", "masked-dense", "compact"]))


def print_layers(model: str) -> None:
    """How the clients train each pruned module of the model: compact layer kinds, masked-dense ones."""
    from collections import Counter

    from lightning_fedprune.pruning.compact import plan_compaction

    torch.manual_seed(0)
    task = make_asr_task(model)
    masks, patterns = group_masks(task)
    decisions, _ = plan_compaction(task, masks, patterns)
    total = sum(p.numel() for p in task.parameters())
    masked = sum(dict(task.named_parameters())[n].numel() for n in masks)
    kinds = Counter(d.kind for d in decisions if d.mode == "compact")
    dense = [d for d in decisions if d.mode != "compact"]
    print(f"\n   {model}: masked tensors hold {masked / total:.1%} of the parameters; client layers: "
          f"{dict(sorted(kinds.items()))} compact, {len(dense)} masked-dense"
          + "".join(f"\n     masked-dense {d.module}: {d.reason}" for d in dense))


if __name__ == "__main__":
    main()
