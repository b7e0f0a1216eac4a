#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine (about 5 minutes on one GPU): the `gpu` tests (the engine on
# the GPU against the CPU), the GPU benchmarks (the article's model, many small clients) and the main job on
# the GPU; prints one table at the end. Writes its logs and numbers under $OUT (default: runs/gpu_check).
#
#   bash scripts/gpu_check.sh                 # on a CUDA machine, from the repository root
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh   # the same steps on the CPU, tiny (checks the script)
#
# Python: the interpreter on PATH must have torch (with CUDA), lightning, torchaudio, torchmetrics, tensorboard
# and matplotlib; missing packages of this project (jsonargparse, jiwer, soundfile, espeakng-loader, ...) are
# taken from wheels in .whl/ when that folder exists (scripts/gpu_wheels.sh downloads them, for a machine that
# cannot reach a package registry). The project runs from this checkout (PYTHONPATH), nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export FLWR_TELEMETRY_ENABLED=0 PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fedprune-site .whl/*.whl \
    || { echo "[gpu-check] could not install the wheels in .whl/"; exit 1; }
  export PYTHONPATH="/tmp/fedprune-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$ROOT:$ROOT/benchmarks:${PYTHONPATH:-}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
if [ "$DRY" = "1" ]; then
  DEVICE=cpu; QUICK=--quick; ACCEL=cpu; MAIN_STEPS=4
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "[gpu-check] no CUDA device: run it on a GPU machine (or GPU_CHECK_DRY_RUN=1 to check the script)"; exit 1; }
  DEVICE=cuda:0; QUICK=; ACCEL=gpu; MAIN_STEPS=40
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
fi
"$PY" -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| lightning', lightning.__version__)" \
  | tee -a "$OUT/device.txt"

status=0
step() {  # step NAME COMMAND...: run it, log it, time it, remember a failure
  local name="$1"; shift
  local t0=$(date +%s)
  echo "[gpu-check] $name: $*"
  if "$@" > "$OUT/$name.log" 2>&1; then result=ok; else result=FAILED; status=1; fi
  echo "$name $result $(( $(date +%s) - t0 ))" >> "$OUT/steps.txt"
  tail -25 "$OUT/$name.log"
}
: > "$OUT/steps.txt"
step gpu_tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -x
step gpu_bench "$PY" benchmarks/bench_gpu.py --device "$DEVICE" $QUICK --json "$OUT/bench_gpu.json"
step main_job "$PY" -m lightning_fedprune fit --config examples/asr/digits_fp.yaml --quiet true \
  --trainer.accelerator "$ACCEL" --trainer.devices 1 --trainer.max_steps "$MAIN_STEPS" \
  --trainer.default_root_dir "$OUT" --trainer.logger.init_args.save_dir "$OUT/runs"

"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("\n== GPU check ==")
print((out / "device.txt").read_text().strip())
for line in (out / "steps.txt").read_text().split("\n"):
    if line.strip():
        name, result, seconds = line.split()
        print(f"  {name:<10} {result:<7} {int(seconds):>5} s")
bench = out / "bench_gpu.json"
if bench.exists():
    b = json.loads(bench.read_text())
    p = b["paper"]
    print(f"  article's model, 8 clients x 10 steps: masked-dense {p['masked_dense_s']:.2f} s / {p['masked_dense_peak_gib']:.1f} GiB, "
          f"compact {p['compact_s']:.2f} s / {p['compact_peak_gib']:.1f} GiB, plain loop {p['plain_loop_s']:.2f} s")
    print("  many small clients (clients/s): " + ", ".join(f"{k} {v:.1f}" for k, v in b["small_clients_per_s"].items()))
summaries = sorted(out.glob("runs/**/summary.json"), key=lambda p: p.stat().st_mtime)
if summaries:
    s = json.loads(summaries[-1].read_text())
    print(f"  main job: val/wer {s['metrics'].get('val/wer', float('nan')):.4f}, sparsity {s['sparsity']:.3f}, "
          f"fit {s.get('seconds', float('nan')):.1f} s")
PY
exit $status
