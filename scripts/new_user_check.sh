#!/usr/bin/env bash
# "Tried as a new user would": the README's two commands and its quick start, copied verbatim into
# a file and run, without edits. Run by CI after the test suite (set SKIP_MAIN_JOB=1 to skip the
# ~10-minute main job).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# the quick start: the first ```python block of the README
python3 - "$ROOT/README.md" "$WORK/quickstart.py" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
blocks = re.findall(r"```python\n(.*?)```", text, re.S)
assert blocks, "README has no python block"
open(sys.argv[2], "w").write(blocks[0])
PY
source "$ROOT/scripts/env.sh"
echo "[new-user] README quick start ($WORK/quickstart.py)"
(cd "$WORK" && python quickstart.py)

if [ "${SKIP_MAIN_JOB:-0}" != "1" ]; then
  echo "[new-user] README main job: bash scripts/main_job.sh (log: $WORK/main_job.log)"
  start=$(date +%s)
  if ! bash "$ROOT/scripts/main_job.sh" > "$WORK/main_job.log" 2>&1; then
    tail -60 "$WORK/main_job.log"; exit 1
  fi
  echo "[new-user] main job took $(( $(date +%s) - start )) s"
  summary=$(ls -t "$ROOT"/runs/fedprune/version_*/summary.json | head -1)
  cat "$summary"
  # the quality target: held-out-speaker WER of the pruned model <= 0.10 at 30 % sparsity
  python - "$summary" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
wer = s["metrics"]["val/wer"]
assert wer <= 0.10, f"main job WER {wer} > 0.10"
assert abs(s["sparsity"] - 0.30) < 0.01, s["sparsity"]
print(f"[new-user] main job: val/wer {wer:.4f}, sparsity {s['sparsity']:.3f}, {s['bytes_saved_percent']:.1f}% bytes saved")
PY
fi
echo "[new-user] OK"
