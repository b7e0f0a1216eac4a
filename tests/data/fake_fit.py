"""A stand-in for `fedprune fit` in tests/test_ablation.py: reads a cell's config and writes the files the
harness reads (summary.json, record.json; a warm-start cell also its checkpoint) from its `fake` block, in
milliseconds, without torch.

fake: {wer: 0.1, spread: 0.01, noise: 0.0, fail: false, sleep: 0, sparsity: 0.5, record: "old"}: the WER of
seed k is wer + spread * (k - 1) + noise * z, z a standard normal drawn from (seed, wer, spread) -- so seeds
0, 1, 2 without noise have standard deviation `spread`, and two configurations with the same `spread` differ
by a constant. `record: "old"` writes the record fields of earlier versions only (no per-round log), `"new"`
the full record. A cell with `ckpt_path` fails unless that checkpoint exists (a warm start must run first)."""

import json
import random
import sys
import time
from pathlib import Path

import yaml


def main() -> None:
    cfg = yaml.safe_load(Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
    fake = cfg.get("fake", {})
    print("fake fit of", cfg["seed_everything"], fake, flush=True)
    time.sleep(float(fake.get("sleep", 0)))
    if fake.get("fail") or (fake.get("fail_warm") and any(
            c["class_path"].endswith("WarmStartCheckpoint") for c in cfg["trainer"]["callbacks"])):
        sys.exit("fake failure")
    if cfg.get("ckpt_path") and not Path(cfg["ckpt_path"]).is_file():
        sys.exit(f"no checkpoint {cfg['ckpt_path']}")
    args = {c["class_path"].rpartition(".")[2]: c["init_args"] for c in cfg["trainer"]["callbacks"]}
    seed = cfg["seed_everything"]
    wer, spread = float(fake.get("wer", 0.1)), float(fake.get("spread", 0.01))
    z = random.Random(f"{seed}-{wer}-{spread}").gauss(0, 1)
    value = wer + spread * (seed - 1) + float(fake.get("noise", 0.0)) * z
    sparsity = fake.get("sparsity", 0.5)
    warm = args.get("WarmStartCheckpoint")
    rounds = warm["round"] if warm else 30
    first = 10 if cfg.get("ckpt_path") else 0
    Path(args["RunSummary"]["path"]).write_text(json.dumps(
        {"rounds": rounds, "seconds": 1.0, "metrics": {"val/wer": value}, "sparsity": sparsity}))
    record = {
        "rounds": rounds, "total_params": 600000, "prunable_params": 300000, "client_params_final": 450000,
        "client_params_mean": 500000, "bytes_per_client_round_mean": 4.0e6 * (1 - sparsity / 2),
        "bytes_per_client_round_final": 3.0e6, "dense_bytes_per_client_round": 4.8e6, "compact": True}
    if fake.get("record", "old") == "new":
        record.update(
            eval_utterances=960, eval_words=2890, eval_speakers=12,
            layer_sparsity={"a.weight": sparsity + fake.get("layer_spread", 0.0), "b.weight": sparsity},
            validations=[{"round": rounds, "metrics": {"val/wer": value}}],
            rounds_log=[{"round": r, "bytes_down": 2_000_000, "bytes_up": 1_000_000, "dense_bytes": 4_800_000,
                         "clients": 2, "client_params": 450000, "train_loss": 1.0 / (r + 1), "sparsity": sparsity,
                         "phase": "REFINE" if 15 <= r < 20 else "DENSE", "flips": 40 if 15 <= r < 20 else 0,
                         "restored": 20 if 15 <= r < 20 else 0, "pruned": 20 if 15 <= r < 20 else 0}
                        for r in range(first, rounds)],
            weights_sha256="0" * 64)
    Path(args["CellRecord"]["path"]).write_text(json.dumps(record))
    if warm:
        Path(warm["path"]).write_text("fake checkpoint")


if __name__ == "__main__":
    main()
