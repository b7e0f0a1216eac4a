"""A stand-in for `fedprune fit` in tests/test_ablation.py: reads a cell's config and writes the files the
harness reads (summary.json, record.json) from its `fake` block, in milliseconds, without torch.

fake: {wer: 0.1, spread: 0.01, fail: false, sleep: 0, sparsity: 0.5}: the WER of seed k is
wer + spread * (k - 1) (so seeds 0, 1, 2 have standard deviation `spread`)."""

import json
import sys
import time
from pathlib import Path

import yaml


def main() -> None:
    cfg = yaml.safe_load(Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
    fake = cfg.get("fake", {})
    print("fake fit of", cfg["seed_everything"], fake, flush=True)
    time.sleep(float(fake.get("sleep", 0)))
    if fake.get("fail"):
        sys.exit("fake failure")
    paths = {c["class_path"].rpartition(".")[2]: c["init_args"]["path"] for c in cfg["trainer"]["callbacks"]}
    wer = float(fake.get("wer", 0.1)) + float(fake.get("spread", 0.01)) * (cfg["seed_everything"] - 1)
    Path(paths["RunSummary"]).write_text(json.dumps({"rounds": 30, "seconds": 1.0, "metrics": {"val/wer": wer},
                                                     "sparsity": fake.get("sparsity", 0.5)}))
    Path(paths["CellRecord"]).write_text(json.dumps({
        "rounds": 30, "total_params": 600000, "prunable_params": 300000, "client_params_final": 450000,
        "client_params_mean": 500000, "bytes_per_client_round_mean": 4.0e6 * (1 - fake.get("sparsity", 0.5) / 2),
        "bytes_per_client_round_final": 3.0e6, "dense_bytes_per_client_round": 4.8e6, "compact": True}))


if __name__ == "__main__":
    main()
