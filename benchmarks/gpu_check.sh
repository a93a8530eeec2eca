#!/usr/bin/env bash
# The acceptance run of a GPU node: ONE call that measures the product where only a GPU can, most
# valuable part first, every result kept as it goes.
#
# The call to make (from the repository root of a checkout, on the GPU machine):
#     command:   bash benchmarks/gpu_check.sh
#     carry:     [".ffcv_carry"]   (made here by `bash benchmarks/ffcv_carry.sh pack`; its size is printed
#                                   there and written in benchmarks/RESULTS.md; without it the trainer
#                                   runs on the torchvision pipeline)
#     timeout_s: 480              (the script stops itself at GPU_CHECK_BUDGET = 410 s, grace included)
# The rehearsal, here, on the CPU: the same commands with the substitutions listed below, nothing else:
#     GPU_CHECK_DEVICE=cpu OUT=/tmp/gc bash benchmarks/gpu_check.sh
# GPU_CHECK_DRY_RUN=1 prints each part's command instead of running it (tests compare the two devices' lists).
#
# What comes back is at most 3 files in $OUT, both rewritten after every part, so a call cut short
# still returns every finished part: summary.txt (one line per part: ok / FAILED / TIMED OUT / skipped,
# its seconds and its headline figure) and results.tar.gz (each part's log and files: preflight.json,
# step/, the trainer's log.jsonl, steps.jsonl, starts.jsonl and config.json, doctor/, table1/, nvjpeg.json).
#
# Parts, in the order of their value:
#   preflight  versions, the CUDA context, a first torch.compile, the bf16 matmul peak (written as it goes)
#   ffcv       (in the background from the start) the carried FFCV and crop decoder built for this Python
#   step       `supmae bench step` at the recipe's per-GPU batch: the trainer's step (compiled, bf16, fused
#              AdamW, device-resident batch) first, then the paper-faithful step and the factors between
#              that cost no compilation; windows of at least MIN_SECONDS, compile time reported apart
#   data       the generated JPEG dataset
#   convert    `supmae convert` of it to a .beton, when FFCV imports
#   pretrain   `supmae pretrain --recipe supmae_vit_b16_400ep` on the product's ffcv pipeline (torchvision
#   resume     when FFCV is missing): 2 epochs, then --resume auto for the third; sync debug and
#              PYTHONWARNINGS=always on the steady steps, recompiles and graph breaks logged
#   doctor     `supmae doctor` fed the compiled step measured by the step part
#   table1     Table 1's SupMAE row (and the fine-tuning step it needs)
#   nvjpeg     torchvision.io.decode_jpeg on the device over the dataset's JPEGs: GPU-side decode capacity
#   dali       only where DALI imports (benchmarks/gpu_carry.sh carries it over several calls)
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
OUT_DIR="${OUT:-runs/gpu_check}"
BUDGET="${GPU_CHECK_BUDGET:-410}"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
export PYTHONUNBUFFERED=1

# ---- The commands' arguments, as the GPU runs them.
RECIPE=supmae_vit_b16_400ep
BATCH=256                  # the recipe's per-GPU batch
# Accumulation 2 at batch 256 on one GPU: the recipe's 4096 would take 16 micro-batches (4,096 images) per
# step; 512 keeps accumulation in the step while an epoch of 8 micro-batches stays a few seconds.
EFFECTIVE_BATCH=512
TRAIN_PER_CLASS=205        # x 10 classes: 2,050 images, 8 batches of 256 = 4 optimiser steps an epoch
VAL_PER_CLASS=26           # 260 images: one evaluation batch and a padded one
IMAGE_SIDE=256             # the stored side, as a conversion at --max-res 256 keeps it
CROP=224
MODEL_KW='{}'              # the recipe's ViT-B/16 with a 1-block decoder
STEP_MODEL=(--model supmae_vit_base_patch16 --depth 12 --model-kwargs "$MODEL_KW")
TABLE1_MODEL=(--model-scale base --depth 12)
WORKERS=14                 # of the machine's 16 cores: the trainer and the main process keep two
STEP_ITERS=(--warmup 3 --iters 8 --rounds 2 --min-seconds 2)
TABLE1_ITERS=(--iters 5 --warmup 2)
SYNC_DEBUG=warn
NODE=()                    # the doctor judges this machine's node, from the step measured here
LIMITS=(preflight=30 ffcv=150 step=130 data=25 convert=20 pretrain=90 resume=60 doctor=45 table1=45 nvjpeg=25 dali=20)

# ---- The rehearsal's substitutions, all of them: device, model width/depth, image count and size, iteration
# counts, worker count, time limits and budget. Nothing else differs between the two runs.
if [ "$DEVICE" != cuda ]; then
    SYNC_DEBUG=off         # it watches CUDA host syncs
    NODE=(--gpu h100 --gpus-per-node 8 --cores-per-node 96)  # no GPU here to judge: the data sheet's
    MODEL_KW='{"embed_dim": 64, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2,
               "cls_hidden_dim": 64}'
    STEP_MODEL=(--model supmae_vit_tiny_patch4 --depth 1 --model-kwargs "$MODEL_KW")
    TABLE1_MODEL=(--model-scale tiny --depth 1)
    IMAGE_SIDE=40
    TRAIN_PER_CLASS=103    # 1,030 images: 4 batches of 256 = 2 optimiser steps an epoch
    CROP=32
    WORKERS=2
    # One timed iteration per row after its first: bf16 autocast alone takes ~13 s an iteration on this CPU.
    STEP_ITERS=(--warmup 0 --iters 1 --rounds 1 --min-seconds 0.05)
    TABLE1_ITERS=(--iters 1 --warmup 0)
    # Time: about 3 minutes on a quiet 2-core machine, twice that beside another test process.
    BUDGET="${GPU_CHECK_BUDGET:-600}"
    LIMITS=(preflight=90 ffcv=150 step=150 data=60 convert=60 pretrain=150 resume=120 doctor=120 table1=90
            nvjpeg=45 dali=45)
fi

mkdir -p "$OUT_DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
RES="$WORK/results"
mkdir -p "$RES"
SUMMARY="$RES/summary.txt"
: > "$SUMMARY"
BG_PIDS=()
cleanup() {
    local p
    for p in "${BG_PIDS[@]}"; do kill -- -"$p" 2>/dev/null || kill "$p" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
failures=0
T0=$SECONDS

publish() {  # summary.txt and results.tar.gz into $OUT, each replaced whole (a cut call keeps the last pair)
    cp -f "$SUMMARY" "$OUT_DIR/.summary.txt.tmp" && mv -f "$OUT_DIR/.summary.txt.tmp" "$OUT_DIR/summary.txt"
    tar -czf "$OUT_DIR/.results.tar.gz.tmp" -C "$WORK" results 2>/dev/null \
        && mv -f "$OUT_DIR/.results.tar.gz.tmp" "$OUT_DIR/results.tar.gz"
}

limit_of() {  # limit_of NAME: the part's limit, cut to what is left of the budget (5 s kept for the grace)
    local kv limit=60 left
    for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && limit="${kv#*=}"; done
    left=$((BUDGET - (SECONDS - T0) - 10))
    [ "$left" -lt "$limit" ] && limit=$left
    echo "$limit"
}

note() {  # note LINE: a line of the summary that is not a part's verdict
    echo "$1"
    echo "$1" >> "$SUMMARY"
    publish
}

declare -A STATUS
part() {  # part NAME CMD...: run CMD under NAME's limit; its output to the console and $RES/NAME.log
    local name="$1" limit start rc=0 verdict
    shift
    if [ "$DRY_RUN" = 1 ]; then
        STATUS[$name]=ok
        echo "PART $name: $(printf '%q ' "$@")"
        return
    fi
    limit=$(limit_of "$name")
    if [ "$limit" -lt 5 ]; then
        STATUS[$name]=skipped
        note "${name}: skipped (the ${BUDGET} s budget is spent)"
        return
    fi
    echo
    echo "=== ${name} (limit ${limit} s, at $((SECONDS - T0)) s) ==="
    start=$SECONDS
    timeout -k 5 "$limit" "$@" > >(tee "$RES/$name.log") 2>&1 || rc=$?
    sleep 0.2  # let tee flush before the verdict line
    if [ "$rc" -eq 0 ]; then
        verdict="ok in $((SECONDS - start)) s"
        STATUS[$name]=ok
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="TIMED OUT after ${limit} s"
        STATUS[$name]=failed
        failures=$((failures + 1))
    else
        verdict="FAILED (exit ${rc}) after $((SECONDS - start)) s: $(grep -v '^\s*$' "$RES/$name.log" | tail -1 | cut -c1-200)"
        STATUS[$name]=failed
        failures=$((failures + 1))
    fi
    local head
    head=$("$PY" -m benchmarks.gpu_check_figures "$name" "$RES" "${STATUS[$name]}" 2>&1 | tail -1)
    note "${name}: ${verdict}${head:+ | ${head}}"
}

note "gpu_check on ${DEVICE}, budget ${BUDGET} s; $(date -u +%FT%TZ)"

# ---- preflight: each fact is written the moment it is known
part preflight "$PY" -u - "$DEVICE" "$RES/preflight.json" <<'EOF'
import json, platform, sys, time
t0 = time.perf_counter()
device, out = sys.argv[1], sys.argv[2]
facts = {"python": platform.python_version()}
def save(**kw):
    facts.update(kw)
    facts["seconds"] = round(time.perf_counter() - t0, 2)
    with open(out + ".tmp", "w") as fh:
        json.dump(facts, fh, indent=1)
    import os
    os.replace(out + ".tmp", out)
    print(json.dumps(kw))
save()
import torch
save(torch=torch.__version__, cuda=torch.version.cuda, torch_import_seconds=round(time.perf_counter() - t0, 2))
import importlib.metadata as md
import importlib.util
dists = {d.metadata["Name"].lower(): d.version for d in md.distributions() if d.metadata["Name"]}
versions = {}
for mod, names in (("timm", ["timm"]), ("torchvision", ["torchvision"]), ("numpy", ["numpy"]),
                   ("numba", ["numba"]), ("cv2", ["opencv-python-headless", "opencv-python"]),
                   ("matplotlib", ["matplotlib"]), ("pynvml", ["nvidia-ml-py", "pynvml"]), ("ffcv", ["ffcv"]),
                   ("nvidia.dali", sorted(n for n in dists if n.startswith("nvidia-dali")))):
    try:
        present = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        present = False
    versions[mod] = next((dists[n] for n in names if n in dists), "present") if present else None
save(versions=versions)
t = time.perf_counter()
x = torch.randn(64, 64, device=device)
if device == "cuda":
    torch.cuda.synchronize()
    p = torch.cuda.get_device_properties(0)
    save(gpu={"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
              "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count()},
         cudnn=torch.backends.cudnn.version())
save(device_init_seconds=round(time.perf_counter() - t, 2))
# A missing compiler (Triton, gcc) shows here, in seconds, not in the trainer's first step.
f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1)
t = time.perf_counter()
torch.testing.assert_close(f(x), torch.nn.functional.gelu(x) * 2 + 1)
save(first_compile_seconds=round(time.perf_counter() - t, 2))
from supmae.train.metrics import measure_matmul_peak
dtype = torch.bfloat16 if device == "cuda" else torch.float32
save(matmul_peak_tflops=measure_matmul_peak(torch.device(device), dtype, seconds=1.0) / 1e12,
     matmul_peak_dtype=str(dtype).replace("torch.", ""))
EOF

# ---- ffcv: the carried FFCV and crop decoder, built in the background while the step part runs
FFCV_ENV="$WORK/ffcv_env.sh"
ffcv_ready() {  # FFCV imports and the crop decoder's library loads
    "$PY" -c "import ffcv; from pipelines.ffcv_cropdecode import crop_decode_functions; crop_decode_functions()" \
        2>/dev/null
}
if [ "$DRY_RUN" = 1 ]; then
    :
elif ffcv_ready; then
    note "ffcv: installed here already"
elif [ -d .ffcv_carry ]; then
    ffcv_limit=$(limit_of ffcv)
    # Its one line of standard output is the environment to export (PYTHONPATH); progress goes to the log.
    setsid timeout -k 5 "$ffcv_limit" bash benchmarks/ffcv_carry.sh install > "$FFCV_ENV" 2> "$RES/ffcv.log" &
    FFCV_PID=$!
    BG_PIDS+=("$FFCV_PID")
    FFCV_START=$SECONDS
else
    note "ffcv: not carried (no .ffcv_carry): the trainer runs on the torchvision pipeline"
fi

part step "$PY" -u -m supmae.cli bench step --device "$DEVICE" "${STEP_MODEL[@]}" --batch-size "$BATCH" \
    --rows trainer,paper,sdpa,bf16 "${STEP_ITERS[@]}" --out "$RES/step"

# ---- data: generated JPEGs; converted to a .beton for the product's own pipeline when FFCV is there
if [ -n "${FFCV_PID:-}" ]; then
    rc=0
    wait "$FFCV_PID" || rc=$?
    if [ "$rc" -eq 0 ] && grep -q '^export ' "$FFCV_ENV"; then
        # shellcheck disable=SC1090
        source "$FFCV_ENV"
        export PYTHONPATH
        note "ffcv: ok in $((SECONDS - FFCV_START)) s (built from the carry, in the background)"
    else
        note "ffcv: FAILED (exit ${rc}): $(grep -v '^\s*$' "$RES/ffcv.log" | tail -1 | cut -c1-200)"
        failures=$((failures + 1))
    fi
fi
PIPE=torchvision
if [ "$DRY_RUN" = 1 ] || ffcv_ready; then PIPE=ffcv; fi
DATA="$WORK/data"
TRAIN_DATA="$DATA/raw"
if [ "$PIPE" = ffcv ]; then TRAIN_DATA="$DATA/converted"; fi
part data "$PY" -u -m tools.synthetic "$DATA/raw" --train-per-class "$TRAIN_PER_CLASS" \
    --val-per-class "$VAL_PER_CLASS" --size "$IMAGE_SIDE" --num-classes 10
if [ "$PIPE" = ffcv ]; then
    part convert "$PY" -u -m supmae.cli convert "$DATA/raw" "$DATA/converted" --formats ffcv --max-res 256 \
        --no-progress
fi

# ---- the trainer end to end: 2 epochs, killed-and-resumed style continuation for the third
RUN="$WORK/pretrain"
PRETRAIN=(--recipe "$RECIPE" --data.path "$TRAIN_DATA" --data.pipeline "$PIPE" --data.batch_size "$BATCH"
          --data.num_workers "$WORKERS" --data.img_size "$CROP" --model.kwargs "$MODEL_KW"
          --optim.effective_batch "$EFFECTIVE_BATCH" --optim.warmup_epochs 1 --train.epochs 3 --train.log_every 2
          --train.sync_debug "$SYNC_DEBUG" --train.device "$DEVICE" --train.progress false --output-dir "$RUN")
export PYTHONWARNINGS=always  # every host sync reported, not only the first of each call site
TORCH_LOGS=recompiles,graph_breaks part pretrain "$PY" -u -m supmae.cli pretrain "${PRETRAIN[@]}" \
    --train.epochs_per_run 2
TORCH_LOGS=recompiles,graph_breaks part resume "$PY" -u -m supmae.cli pretrain "${PRETRAIN[@]}" --resume auto
unset PYTHONWARNINGS
if [ "$DRY_RUN" != 1 ]; then
    mkdir -p "$RES/trainer"
    for f in log.jsonl steps.jsonl starts.jsonl config.json; do cp -f "$RUN/$f" "$RES/trainer/" 2>/dev/null; done
    cp -rf "$RUN/processes" "$RES/trainer/" 2>/dev/null
    note "trainer: $("$PY" -m benchmarks.gpu_check_figures trainer "$RES" "${STATUS[pretrain]}/${STATUS[resume]}" \
        "$DEVICE" "$PIPE" 2>&1 | tail -1)"
fi

part doctor "$PY" -u -m supmae.cli doctor --data "$TRAIN_DATA" --recipe "$RECIPE" --device "$DEVICE" \
    --pipelines "$PIPE" --workers 1,2 --seconds 1 --batch-limit 1024 --step-json "$RES/step" "${NODE[@]}" \
    --out "$RES/doctor" --data.batch_size "$BATCH" --data.img_size "$CROP" --model.kwargs "$MODEL_KW"

part table1 "$PY" -u -m supmae.cli bench table1 --device "$DEVICE" "${TABLE1_MODEL[@]}" --batch-size "$BATCH" \
    "${TABLE1_ITERS[@]}" --methods supmae --gpus 8 --compile off --out "$RES/table1"
note "table1: left out mocov3, mae, deit, mae_scratch and compilation (they do not fit the call)"

part nvjpeg "$PY" -u - "$DATA/raw/train" "$DEVICE" "$RES/nvjpeg.json" <<'EOF'
import glob, json, sys, time
import torch
from torchvision.io import decode_jpeg
root, device, out = sys.argv[1:4]
files = sorted(glob.glob(f"{root}/*/*.jpg"))[:1024]
datas = []
for f in files:
    with open(f, "rb") as fh:
        datas.append(torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8))
res = {"images": len(datas), "mean_bytes": sum(d.numel() for d in datas) / len(datas), "device": device}
def rate(dev, batch, seconds=1.5):
    chunks = [datas[i:i + batch] for i in range(0, len(datas), batch)]
    decode_jpeg(chunks[0], device=dev)  # first call: the decoder's set-up
    if dev == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for c in chunks:
            imgs = decode_jpeg(c, device=dev)
            n += len(imgs)
    if dev == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)
torch.set_num_threads(1)
res["cpu_one_thread_images_per_sec"] = rate("cpu", 64, seconds=1.0)
if device == "cuda":
    for b in (64, 256):
        res[f"gpu_batch{b}_images_per_sec"] = rate("cuda", b)
print(json.dumps(res))
json.dump(res, open(out, "w"), indent=1)
EOF

if [ "$DRY_RUN" = 1 ] || "$PY" -c "import nvidia.dali" 2>/dev/null; then
    part dali "$PY" -u - "$DATA/raw" "$DEVICE" "$WORK/converted_wds" "$RES/dali.json" 64 <<'EOF'
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
    note "dali: skipped (DALI is not installed here; benchmarks/gpu_carry.sh carries it over several calls)"
fi

note "gpu_check on ${DEVICE}: ${failures} part(s) failed; $((SECONDS - T0)) s of the ${BUDGET} s budget"
exit "$failures"
