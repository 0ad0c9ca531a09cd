#!/usr/bin/env bash
# GPU figures for issue #6: bench/infer.py on CUDA with bf16, plus GPU utilisation sampled by
# nvidia-smi while it runs; for issue #22, the model zoo's wholeBody_ct_segmentation high-res
# bundle (random weights) on a full 512x512x300 CT (bench/zoo.py; needs ../shared/bundles). Installs nothing: it uses the project's environment as it is
# (PYTHON, default .venv/bin/python, with a CUDA build of torch). Finishes in well under
# 5 minutes on one modern GPU. Record the printed figures in bench/RESULTS.md with the device.
#
#     bash bench/gpu.sh [extra bench/infer.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"bench/gpu.sh: torch {torch.__version__} sees no CUDA device")
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name(0))
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
log="$(mktemp)"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 >"$log" &
smi=$!
trap 'kill $smi 2>/dev/null || true; rm -f "$log"' EXIT
timeout 280 "$PY" bench/infer.py --device cuda --amp bf16 --volumes "${VOLUMES:-16}" \
    --batch-size "${BATCH:-256}" "$@"
kill $smi 2>/dev/null || true
wait $smi 2>/dev/null || true
awk -F', ' 'NF==2 {n++; u+=$1; if ($1>m) m=$1; if ($2>mem) mem=$2}
    END {if (n) printf "GPU utilisation while running: mean %.0f%%, max %d%% over %d samples; peak memory %d MiB\n", u/n, m, n, mem}' "$log"
if [ -d ../shared/bundles/model-zoo/wholeBody_ct_segmentation ]; then
  timeout 240 "$PY" bench/zoo.py wholeBody_ct_segmentation --device cuda --shape 300 512 512 \
      --spacing 1.0 0.8 0.8 || echo "bench/gpu.sh: the wholeBody run failed (exit $?)"
else
  echo "bench/gpu.sh: ../shared/bundles/model-zoo absent: the wholeBody run is skipped"
fi
