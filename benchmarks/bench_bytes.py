"""P3 bytes per round: broadcast + upload bytes of a real pruned round vs plain FedAvg (dense).

A Linear-heavy task where nearly every parameter is prunable: MLPClassifier(in_dim=512,
hidden=512, depth=4, num_classes=16) -- 4 x Linear(512, 512) + Linear(512, 16): 1,058,832
parameters of which 1,056,768 (99.81 %) are weights (the biases stay dense). A real fit of one
round (2 clients x 1 local step) with SparsityRampCallback(target_sparsity=S, one shot at round
0, pattern=...), so the masks are set before the round's payload is built. The figures are the
``RoundSummary`` of that round, read by a callback:

* bytes_down = the encoded broadcast's ``nbytes`` x clients (kept values + index: a bitmask or
  int32 indices for structured patterns, a 1-bit-per-entry bitmask for unstructured);
* bytes_up   = the sum of the clients' encoded uploads (kept values only: the server knows the
  mask);
* dense_bytes = 2 x (dense float32 state bytes) x clients: what plain FedAvg sends down + up.

Bytes are counted from the numpy arrays that would go on the wire (wire.py); metadata (names,
shapes, a JSON spec) is not counted on either side. The ``comm/ratio`` the module logs is
checked to agree. Deterministic: no repetitions needed (sizes do not depend on timing).

The main job's model (``--asr``, also part of the default run): the Conformer-Transducer of
``examples/asr/digits_fp.yaml`` (2.68M parameters), its five pruning groups (ffn, attention, conv,
predictor, joiner) at column S = 0.3 with their dependent masks, the same real one-round fit (2 clients x
1 local step, batches of random features with digit transcripts), float32 values and ``payload_bits`` 8
and 4; plus the share of the parameters the masks cover and the bytes per group (the run summary's
breakdown, :func:`lightning_fedprune.observers.breakdown.pruning_breakdown`).

    python benchmarks/bench_bytes.py            # S=0.5 table (5 patterns) + curve over S + the main job's model
    python benchmarks/bench_bytes.py --quick
    python benchmarks/bench_bytes.py --only-asr # the main job's model only
"""

from __future__ import annotations

import warnings

from _common import apply_threads, base_parser, header, load, quiet_lightning, quiet_trainer, table, verdict

import lightning.pytorch as pl

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.callbacks import SparsityRampCallback
from lightning_fedprune.demos import GaussianMixtureDataset, MLPClassifier

GOALS = {"column": 0.52, "row": 0.52, "unstructured": 0.56}
GOAL_ASR, GOAL_ASR_INT8, GOAL_SHARE = 0.75, 0.20, 0.80  # main job's model at S = 0.3: float32, int8; pruned set
GROUPS = ["ffn", "attention", "conv", "predictor", "joiner"]
IN_DIM, HIDDEN, DEPTH, CLASSES = 512, 512, 4, 16


class BytesRecorder(pl.Callback):
    def __init__(self) -> None:
        self.summaries = []

    def on_fed_round_end(self, trainer, pl_module, summary) -> None:
        self.summaries.append(summary)


def one_round(pattern: str, sparsity: float, clients: int = 2, bits: int | None = None) -> dict[str, float]:
    task = MLPClassifier(in_dim=IN_DIM, hidden=HIDDEN, depth=DEPTH, num_classes=CLASSES, lr=0.01)
    ds = GaussianMixtureDataset(num_samples=64 * clients, dim=IN_DIM, num_classes=CLASSES, seed=0)
    dm = FederatedDataModule(ds, num_clients=clients, batch_size=32, seed=0)
    fed = FederatedLightningModule(task, clients_per_round=clients, local_steps=1, seed=0, payload_bits=bits)
    rec = BytesRecorder()
    ramp = SparsityRampCallback(target_sparsity=sparsity, start_round=0, schedule="one_shot", pattern=pattern,
                                importance="weight_l2")
    trainer = quiet_trainer(max_steps=1, callbacks=[ramp, rec])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(fed, datamodule=dm)
    (s,) = rec.summaries
    assert s.clients_ok == clients and s.clients_failed == 0
    ratio = (s.bytes_down + s.bytes_up) / s.dense_bytes
    logged = float(trainer.callback_metrics["comm/ratio"])
    assert abs(logged - ratio) < 1e-4, (logged, ratio)
    n_params = sum(p.numel() for p in task.parameters())
    n_pruned = sum(int((~m).sum()) for m in fed.masks.values())
    return {
        "down": s.bytes_down / clients, "up": s.bytes_up / clients, "dense_one_way": s.dense_bytes / (2 * clients),
        "ratio": ratio, "down_ratio": s.bytes_down / (s.dense_bytes / 2), "up_ratio": s.bytes_up / (s.dense_bytes / 2),
        "actual_sparsity_all_params": n_pruned / n_params, "logged_ratio": logged,
    }


class RandomSpeech:
    """Random features (80 mels, 90-340 frames) with transcripts of 3-7 spoken digits; 4 items per speaker."""

    def __init__(self, n: int = 8, seed: int = 0) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        digits = "zero one two three four five six seven eight nine".split()
        self.items = []
        for i in range(n):
            words = int(torch.randint(3, 8, (1,), generator=g))
            text = " ".join(digits[int(j)] for j in torch.randint(0, 10, (words,), generator=g))
            frames = int(torch.randint(90, 341, (1,), generator=g))
            self.items.append({"features": torch.randn(frames, 80, generator=g), "text": text, "speaker": str(i // 4),
                               "id": str(i)})
        self.partition_keys = [it["speaker"] for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def asr_round(sparsity: float, bits: int | None = None, groups: list[str] | None = GROUPS,
              parameters: str | None = None) -> tuple[dict[str, float], object]:
    """One real round of the main job's model (2 clients x 1 local step), pruned one shot at round 0."""
    import yaml

    from _common import ROOT
    from lightning_fedprune.asr.conformer_transducer import ConformerTransducer
    from lightning_fedprune.asr.librispeech import collate_asr

    args = yaml.safe_load((ROOT / "examples" / "asr" / "digits_fp.yaml").read_text())["model"]["task"]["init_args"]
    task = ConformerTransducer(**args)
    dm = FederatedDataModule(RandomSpeech(), partition="by_key", batch_size=4, collate_fn=collate_asr, seed=0)
    fed = FederatedLightningModule(task, clients_per_round=2, local_steps=1, seed=0, payload_bits=bits)
    rec = BytesRecorder()
    ramp = SparsityRampCallback(target_sparsity=sparsity, start_round=0, schedule="one_shot", pattern="column",
                                importance="weight_l2", groups=groups, parameters=parameters)
    trainer = quiet_trainer(max_steps=1, callbacks=[ramp, rec], limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(fed, datamodule=dm)
    (s,) = rec.summaries
    assert s.clients_ok == 2 and s.clients_failed == 0
    ratio = (s.bytes_down + s.bytes_up) / s.dense_bytes
    assert abs(float(trainer.callback_metrics["comm/ratio"]) - ratio) < 1e-4
    sizes = {n: p.numel() for n, p in task.named_parameters()}
    total = sum(sizes.values())
    state = fed.pruning
    return {"down": s.bytes_down / 2, "up": s.bytes_up / 2, "dense_one_way": s.dense_bytes / 4, "ratio": ratio,
            "targets": sum(sizes[n] for n in state.targets) / total,
            "dependents": sum(sizes[n] for n in state.dependents) / total,
            "removed": sum(int((~m).sum()) for m in state.masks.values()) / total}, fed


def asr_section() -> None:
    from lightning_fedprune.observers.breakdown import format_breakdown, pruning_breakdown

    print("\n-- the main job's model (digits_fp.yaml, 2.68M params), column S = 0.3 on its five groups + dependent "
          "masks, per client per round --")
    rows = []
    ratios = {}
    feds = {}
    for bits in (None, 8, 4):
        r, fed = asr_round(0.3, bits)
        ratios[bits], feds[bits] = r["ratio"], fed
        rows.append([f"groups {', '.join(GROUPS)}", "float32" if bits is None else f"int{bits}", f"{r['down']:,.0f}",
                     f"{r['up']:,.0f}", r["ratio"], r["targets"] + r["dependents"], r["removed"]])
    old = r"encoder\.conformer\.conformer_layers\.\d+\.(ffn[12]\.sequential\.[14]|self_attn\.out_proj)\.weight"
    r, _ = asr_round(0.3, None, groups=None, parameters=old)
    rows.append(["former selection: FFN Linears + out_proj (regex)", "float32", f"{r['down']:,.0f}", f"{r['up']:,.0f}",
                 r["ratio"], r["targets"] + r["dependents"], r["removed"]])
    print(table(rows, ["selection", "values", "down", "up", "(down+up)/(2 dense)", "masked share of params",
                       "removed share of params"]))
    r0, _ = asr_round(0.3, None)
    print(f"   pruned set: {r0['targets']:.1%} of the parameters selected by the groups + {r0['dependents']:.1%} that "
          f"follow them (dependent masks) = {r0['targets'] + r0['dependents']:.1%}")
    for bits in (None, 8):
        summary = pruning_breakdown(feds[bits])
        print(f"\n   bytes by group, {'float32' if bits is None else 'int8'} values (the run summary's breakdown):")
        print("\n".join("  " + line for line in format_breakdown(summary)))
    verdict("P3 main-job model: pruned set (masked share of the parameters)", r0["targets"] + r0["dependents"],
            GOAL_SHARE, unit="", lower_is_better=False)
    verdict("P3 main-job model: bytes column S=0.3 (down+up)/dense, float32", ratios[None], GOAL_ASR)
    verdict("P3 main-job model: bytes column S=0.3 (down+up)/dense, int8", ratios[8], GOAL_ASR_INT8)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--only-asr", action="store_true", help="the main job's model only")
    args = p.parse_args()
    apply_threads(args)
    quiet_lightning()
    header("P3 bytes per round (real encoded payloads of a real round)", args)
    if args.only_asr:
        asr_section()
        print(f"   [{load()}]")
        return
    task = MLPClassifier(in_dim=IN_DIM, hidden=HIDDEN, depth=DEPTH, num_classes=CLASSES)
    total = sum(p.numel() for p in task.parameters())
    prunable = sum(p.numel() for p in task.parameters() if p.dim() >= 2)
    print(f"   model: MLPClassifier({IN_DIM}, {DEPTH}x{HIDDEN}, {CLASSES} classes): {total:,} params, "
          f"{prunable:,} prunable ({prunable / total:.2%}); float32")
    patterns = ["column", "row", "unstructured"] if args.quick else ["column", "row", "unstructured", "half_row", "half_column"]
    rows = []
    at_half = {}
    for pattern in patterns:
        r = one_round(pattern, 0.5)
        at_half[pattern] = r["ratio"]
        rows.append([pattern, f"{r['dense_one_way']:,.0f}", f"{r['down']:,.0f}", f"{r['up']:,.0f}", r["down_ratio"],
                     r["up_ratio"], r["ratio"], r["actual_sparsity_all_params"], str(GOALS.get(pattern, "-"))])
    print("\n-- S = 0.5, per client per round (bytes) --")
    print(table(rows, ["pattern", "dense one way", "down", "up", "down/dense", "up/dense", "(down+up)/(2 dense)",
                       "pruned share of all params", "goal"]))
    for pattern, goal in GOALS.items():
        verdict(f"P3 bytes {pattern} S=0.5 (down+up)/dense", at_half[pattern], goal)

    print("\n-- quantised payloads (payload_bits), S = 0.5, side by side with float32 values --")
    rows = []
    quantised = {}
    for pattern in ["column", "row"] if args.quick else ["column", "row", "unstructured", "half_column"]:
        for bits in (None, 8, 4):
            r = one_round(pattern, 0.5, bits=bits)
            quantised[(pattern, bits)] = r["ratio"]
            rows.append([pattern, "float32" if bits is None else f"int{bits}", f"{r['down']:,.0f}", f"{r['up']:,.0f}",
                         r["ratio"], r["ratio"] / quantised[(pattern, None)]])
    print(table(rows, ["pattern", "values", "down", "up", "(down+up)/(2 dense)", "vs float32 values"]))
    verdict("P3 bytes column S=0.5 int8 (down+up)/dense", quantised[("column", 8)], 0.15)

    levels = [0.0, 0.5, 0.9] if args.quick else [0.0, 0.1, 0.3, 0.5, 0.7, 0.9]
    curve_patterns = ["column", "row", "unstructured"]
    rows = []
    for s in levels:
        row = [s]
        for pattern in curve_patterns:
            row.append(one_round(pattern, s)["ratio"])
        row.append(1 - s)
        rows.append(row)
    print("\n-- curve: (down+up) / dense over the target sparsity S --")
    print(table(rows, ["S"] + curve_patterns + ["1 - S (values only)"]))
    asr_section()
    print(f"   [{load()}]")


if __name__ == "__main__":
    main()
