#!/usr/bin/env bash
# The one prepared check for a lent GPU machine: ONE call (its limit is about 7 minutes), every figure
# the CPU cannot give, written to $OUT part by part as it goes, so a part that hangs or a call cut
# short still returns everything before it.
#
#   bash benchmarks/gpu_check.sh                         # on the GPU machine, from the repository root
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh    # the rehearsal: every part at toy size on the CPU
#
# Parts (each under its own `timeout`; the limits add up to less than 420 s):
#   preflight   versions, torch.compile of a tiny function (a missing compiler shows here, not in
#               minute five), the bf16 matmul peak
#   data        a small JPEG dataset made by tools.synthetic
#   pretrain    `supmae pretrain` (ViT-B/16 d1b, torchvision pipeline, bf16, torch.compile, evaluation) for
#               2 epochs with --train.sync_debug warn (torch reports every host sync in the steady steps)
#               and TORCH_LOGS=recompiles,graph_breaks; then --resume auto for the third epoch
#   step        `supmae bench step` at ViT-B/16 d1b: img/s and MFU of every factor against the measured peak
#   doctor      `supmae doctor` on the device (batch probe, the node verdict from the measured step)
#   table1      `supmae bench table1` with the rows that fit the time (the others are named as left out)
#   dali        only when DALI imports (see benchmarks/gpu_carry.sh): nvJPEG decode + RandomResizedCrop
#               on the GPU, plain and with RandAugment
# The machine has torch, timm and torchvision only (no FFCV, no DALI, no network, maybe no
# matplotlib): nothing here needs more, and nothing is installed.
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
OUT_DIR="${OUT:-runs/gpu_check}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
failures=0
total_limit=0

if [ "$DEVICE" = cuda ]; then
    # ViT-B/16 d1b at sizes that fit one call. The loader has 16 cores; the step is what is measured.
    DATA_ARGS=(--train-per-class 48 --val-per-class 8 --size 256 --num-classes 10)
    PRETRAIN=(--recipe supmae_vit_b16_400ep --data.batch_size 96 --data.num_workers 12 --train.log_every 2
              --train.sync_debug warn --optim.warmup_epochs 1)
    STEP=(--model supmae_vit_base_patch16 --batch-size 128 --iters 6 --warmup 2 --rounds 2)
    # The doctor's CUDA paths (the batch probe, the node verdict from the measured step) are what is
    # checked here; its step runs uncompiled because `bench step` above already times the compiled one.
    DOCTOR=(--recipe supmae_vit_b16_400ep --pipelines torchvision --workers 1,2 --seconds 1 --batch-limit 1024
            --data.batch_size 128 --train.compile off)
    # SupMAE (the reference) and the fine-tuning step, in bf16 uncompiled: compiling them, or timing the
    # other four rows, does not fit the call.
    TABLE1=(--model-scale base --batch-size 128 --iters 5 --warmup 2 --methods supmae --gpus 8 --compile off)
    TABLE1_LEFT_OUT="mocov3, mae, deit, mae_scratch, and compilation (they do not fit the call)"
    PREFLIGHT_BACKEND=inductor
    DALI_BATCH=64
    LIMITS=(preflight=20 data=15 pretrain=110 resume=55 step=115 doctor=45 table1=35 dali=15)
else
    DATA_ARGS=(--train-per-class 8 --val-per-class 2 --size 48 --num-classes 4)
    PRETRAIN=(--recipe tiny_cpu --data.batch_size 8 --data.num_workers 1 --train.log_every 2
              --model.kwargs '{"depth": 1}' --train.cpu_threads 1)
    STEP=(--model supmae_vit_tiny_patch4 --depth 1 --batch-size 4 --iters 2 --warmup 1 --rounds 1 --no-compile
          --threads 1)
    DOCTOR=(--recipe tiny_cpu --pipelines torchvision --workers 1,2 --seconds 0.3 --gpu h100 --gpus-per-node 8
            --cores-per-node 96 --data.batch_size 8 --model.kwargs '{"depth": 1}')
    TABLE1=(--model-scale tiny --depth 1 --batch-size 4 --iters 1 --warmup 0 --methods supmae --gpus 8 --threads 1)
    TABLE1_LEFT_OUT="mocov3, mae, deit, mae_scratch (left out in the rehearsal as on the GPU)"
    # Inductor's CPU path compiles C++ (a minute on a busy 2-core machine); the rehearsal checks the
    # script, not this machine's compiler.
    PREFLIGHT_BACKEND=aot_eager
    DALI_BATCH=8
    LIMITS=(preflight=90 data=30 pretrain=90 resume=60 step=60 doctor=90 table1=60 dali=30)
fi

limit_of() {  # limit_of NAME: the part's limit in seconds
    local kv
    for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && { echo "${kv#*=}"; return; }; done
    echo 60
}

part() {  # part NAME CMD...: run CMD under NAME's limit, its output to the console and $OUT/NAME.log
    local name="$1" limit
    shift
    limit=$(limit_of "$name")
    total_limit=$((total_limit + limit))
    echo
    echo "=== ${name} (limit ${limit} s) ==="
    local start=$SECONDS rc=0
    timeout -k 5 "$limit" "$@" > >(tee "$OUT_DIR/$name.log") 2>&1 || rc=$?
    sleep 0.2  # let tee flush before the verdict line
    local verdict
    if [ "$rc" -eq 0 ]; then
        verdict="ok in $((SECONDS - start)) s"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="TIMED OUT after ${limit} s"
        failures=$((failures + 1))
    else
        verdict="FAILED (exit ${rc}) after $((SECONDS - start)) s"
        failures=$((failures + 1))
    fi
    echo "=== ${name}: ${verdict} ==="
    echo "${name}: ${verdict}" >> "$SUMMARY"
}

part preflight "$PY" -u - "$DEVICE" "$OUT_DIR/preflight.json" "$PREFLIGHT_BACKEND" <<'EOF'
import json, platform, sys, time
t0 = time.perf_counter()
import torch
device, out, backend = sys.argv[1], sys.argv[2], sys.argv[3]
facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
import importlib.metadata as md
import importlib.util
# Versions from the installed metadata, without importing (ffcv and DALI take many seconds to import).
dists = {d.metadata["Name"].lower(): d.version for d in md.distributions() if d.metadata["Name"]}
for mod, names in (("timm", ["timm"]), ("torchvision", ["torchvision"]), ("numpy", ["numpy"]),
                   ("matplotlib", ["matplotlib"]), ("ffcv", ["ffcv"]),
                   ("nvidia.dali", sorted(n for n in dists if n.startswith("nvidia-dali")))):
    try:
        present = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        present = False
    facts[mod] = next((dists[n] for n in names if n in dists), "present") if present else None
if device == "cuda":
    p = torch.cuda.get_device_properties(0)
    facts["gpu"] = {"name": p.name, "memory_gib": p.total_memory / 2**30, "sms": p.multi_processor_count,
                    "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count()}
print(json.dumps(facts, indent=1))
# A missing compiler (Triton on the GPU) shows here, in seconds.
f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1, backend=backend)
x = torch.randn(64, 64, device=device)
t = time.perf_counter()
torch.testing.assert_close(f(x), torch.nn.functional.gelu(x) * 2 + 1)
facts["compile_seconds"] = time.perf_counter() - t
facts["compile_backend"] = backend
print(f"torch.compile ({backend}) of a tiny function: ok in {facts['compile_seconds']:.1f} s")
from supmae.train.metrics import measure_matmul_peak
dtype = torch.bfloat16 if device == "cuda" else torch.float32
facts["matmul_peak_tflops"] = measure_matmul_peak(torch.device(device), dtype, seconds=2.0) / 1e12
facts["matmul_peak_dtype"] = str(dtype)
print(f"{dtype} matmul peak: {facts['matmul_peak_tflops']:.4g} TFLOP/s")
facts["seconds"] = time.perf_counter() - t0
with open(out, "w") as fh:
    json.dump(facts, fh, indent=1)
EOF

DATA="$WORK/data"
part data "$PY" -u -m tools.synthetic "$DATA" "${DATA_ARGS[@]}"

# Two epochs of three, then --resume auto for the last: the checkpoint round trip on the device. The
# steady steps run under sync-debug "warn" (CUDA) and with recompiles and graph breaks logged.
RUN="$WORK/pretrain"
COMMON=(--data.path "$DATA" --data.pipeline torchvision --output-dir "$RUN" --train.epochs 3
        --train.device "$DEVICE" --train.progress false "${PRETRAIN[@]}")
TORCH_LOGS=recompiles,graph_breaks part pretrain "$PY" -u -m supmae.cli pretrain "${COMMON[@]}" \
    --train.epochs_per_run 2
TORCH_LOGS=recompiles,graph_breaks part resume "$PY" -u -m supmae.cli pretrain "${COMMON[@]}" --resume auto
cp -f "$RUN"/log.jsonl "$RUN"/config.json "$OUT_DIR"/ 2>/dev/null || true
{
    # The evidence, counted: torch's sync-debug warnings and the recompile / graph-break log lines.
    syncs=$(cat "$OUT_DIR/pretrain.log" "$OUT_DIR/resume.log" 2>/dev/null | grep -c "synchronizing CUDA operation")
    recompiles=$(cat "$OUT_DIR/pretrain.log" "$OUT_DIR/resume.log" 2>/dev/null | grep -ci "recompil")
    breaks=$(cat "$OUT_DIR/pretrain.log" "$OUT_DIR/resume.log" 2>/dev/null | grep -ci "graph break")
    epochs=$(wc -l < "$RUN/log.jsonl" 2>/dev/null || echo 0)
    echo "trainer: ${epochs} epochs logged; host syncs reported in steady steps: ${syncs}" \
        "(sync-debug $([ "$DEVICE" = cuda ] && echo warn || echo 'off: CUDA only')); recompile lines: ${recompiles};" \
        "graph-break lines: ${breaks}"
} | tee -a "$SUMMARY"

part step "$PY" -u -m supmae.cli bench step --device "$DEVICE" "${STEP[@]}" --out "$OUT_DIR/step"

part doctor "$PY" -u -m supmae.cli doctor --data "$DATA" --device "$DEVICE" --out "$OUT_DIR/doctor" "${DOCTOR[@]}"

echo "table1: left out ${TABLE1_LEFT_OUT}" | tee -a "$SUMMARY"
part table1 "$PY" -u -m supmae.cli bench table1 --device "$DEVICE" "${TABLE1[@]}" --out "$OUT_DIR/table1"

if "$PY" -c "import nvidia.dali" 2>/dev/null; then
    part dali "$PY" -u - "$DATA" "$DEVICE" "$WORK/converted" "$OUT_DIR/dali.json" "$DALI_BATCH" <<'EOF'
import json, sys, time
import torch
from pipelines import build_pipeline
from tools.convert import convert
data, device, conv, out, batch = sys.argv[1:6]
convert(data, conv, formats=("wds",), max_res=256, workers=4, progress=False)
res = {}
for name, ra in (("plain", None), ("randaugment", "rand-m9-mstd0.5-inc1")):
    pipe = build_pipeline("dali", conv, batch_size=int(batch), img_size=224, device=device, num_workers=4, train=True,
                          randaugment=ra)
    it = iter(pipe)
    next(it)  # the first batch builds the graph and fills the reader
    n, t0 = 0, time.perf_counter()
    for images, labels in it:
        n += images.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    res[name] = {"images_per_sec": n / max(time.perf_counter() - t0, 1e-9), "device": str(images.device),
                 "shape": list(images.shape)}
    print(f"dali {name}: {res[name]}")
json.dump(res, open(out, "w"), indent=1)
EOF
else
    echo "dali: skipped (DALI is not installed here; benchmarks/gpu_carry.sh carries it)" | tee -a "$SUMMARY"
fi

echo
echo "gpu_check on ${DEVICE}: ${failures} part(s) failed; sum of the parts' limits ${total_limit} s; results in ${OUT_DIR}" \
    | tee -a "$SUMMARY"
exit "$failures"
