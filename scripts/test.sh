#!/usr/bin/env bash
# Runs the whole test suite (sets up .venv on first use).
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@"
