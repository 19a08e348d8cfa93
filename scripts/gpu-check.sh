#!/usr/bin/env bash
# On a machine with a CUDA GPU: a short train in fp32 and bf16 (tokens/s from metrics.jsonl), a resume,
# generation, one request to `rnnkit serve`, and the tests marked `cuda`. Prints one line per check.
# Needs a CUDA build of torch in .venv (the pinned CPU build sees no GPU: then it says so and stops).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python
if ! $py -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu-check: torch sees no CUDA GPU here ($($py -c 'import torch; print(torch.__version__)')); nothing to check" >&2
  exit 1
fi
$py -c 'import torch; print("gpu-check: device", torch.cuda.get_device_name(0), "torch", torch.__version__)'
work=$(mktemp -d)
trap 'kill ${server:-} 2>/dev/null || true; rm -rf "$work"' EXIT
$py - "$work/text.txt" <<'PY'
import sys
line = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of folly.\n"
open(sys.argv[1], "w", encoding="utf-8").write(line * 20000)
PY
rate() { $py -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if "tokens_per_s" in l]; print(f"{r[-1][\"tokens_per_s\"]:,.0f} tok/s (last progress line), loss {r[-1][\"loss\"]:.3f}")' "$1/metrics.jsonl"; }
for precision in fp32 bf16; do
  .venv/bin/rnnkit train --text "$work/text.txt" --device cuda --precision "$precision" --hidden 512 --layers 2 \
      --batch-size 64 --seq-len 100 --max-steps 300 --log-every 50 --eval-every 300 --quiet --out "$work/$precision"
  echo "gpu-check: train $precision: $(rate "$work/$precision")"
done
.venv/bin/rnnkit train --resume "$work/bf16" --max-steps 400 --quiet
echo "gpu-check: resume bf16 to step 400: ok"
.venv/bin/rnnkit generate --checkpoint "$work/bf16" --device cuda --prime "It was" --length 200 --seed 1 --temperature 0.5 \
    | head -c 300; echo
port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/rnnkit serve --checkpoint "$work/bf16" --host 127.0.0.1 --port "$port" --log-level warning &
server=$!
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$port/generate" -H 'Content-Type: application/json' \
     -d '{"prime": "It was", "length": 50, "seed": 1}' && echo
echo "gpu-check: one served request: ok"
$py -m pytest -q -m cuda tests
