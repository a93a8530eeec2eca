#!/usr/bin/env bash
# The one prepared script for a GPU session (about 15 minutes of device time in all): prints every
# GPU figure of the harness at once, in well under 10 minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Needs only torch, timm and torchvision (no FFCV, no DALI, no matplotlib) and installs nothing.
# Each part runs under its own `timeout`, so one failing or slow part still lets the others print.
# Results are written under $OUT (the device tool's return folder) when set, else runs/gpu_check.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
failures=0

part() {  # part NAME SECONDS CMD...: run CMD with a time limit; report, never abort the script
    local name="$1" limit="$2"
    shift 2
    echo
    echo "=== ${name} (limit ${limit} s) ==="
    local start=$SECONDS rc=0
    timeout -k 10 "$limit" "$@" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "=== ${name}: ok in $((SECONDS - start)) s ==="
    else
        [ "$rc" -eq 124 ] && echo "=== ${name}: TIMED OUT after ${limit} s ===" \
            || echo "=== ${name}: FAILED (exit ${rc}) after $((SECONDS - start)) s ==="
        failures=$((failures + 1))
    fi
}

part "environment" 60 "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version())
for mod in ("timm", "torchvision", "numpy", "matplotlib", "ffcv", "nvidia.dali"):
    try:
        m = __import__(mod, fromlist=["_"])
        print(f"{mod}: {getattr(m, '__version__', 'present')}")
    except ImportError:
        print(f"{mod}: not installed")
print("cuda available:", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, cc {p.major}.{p.minor}")
EOF
command -v nvidia-smi >/dev/null && part "nvidia-smi" 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv

# SupMAE ViT-B/16 step at batch 256: ours (SDPA, torch.compile, bf16, fused AdamW, no host sync)
# against the paper-faithful step (eager attention, fp16 + GradScaler, .item() + sync every step),
# with MFU against this GPU's bf16 matmul peak measured in the same run.
part "bench step (ViT-B/16, batch 256)" 210 "$PY" -m supmae.cli bench step --device cuda \
    --model supmae_vit_base_patch16 --batch-size 256 --iters 20 --warmup 5 --out "$OUT_DIR/step"

# Table 1 at ViT-B/16 with synthetic data, per-GPU batch 256, projected to 8 GPUs.
part "bench table1 (ViT-B/16, synthetic, 8 GPUs)" 240 "$PY" -m supmae.cli bench table1 --device cuda \
    --model-scale base --gpus 8 --batch-size 256 --iters 10 --warmup 3 --out "$OUT_DIR/table1"

# The GPU-marked tests of the harness, when pytest is present (it is not needed for the figures).
if "$PY" -c "import pytest" 2>/dev/null; then
    part "pytest -m gpu (bench)" 90 "$PY" -m pytest -q -m gpu tests/test_bench.py -p no:cacheprovider
fi

echo
echo "gpu_check: ${failures} part(s) failed; results in ${OUT_DIR}"
exit "$failures"
