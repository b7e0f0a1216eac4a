#!/usr/bin/env bash
# The main job on the embedded default data (sets up .venv on first use).
source "$(dirname "$0")/env.sh"
exec fedprune fit --config examples/asr/digits_fp.yaml "$@"
