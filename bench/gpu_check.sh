#!/usr/bin/env bash
# Every GPU figure of the project in one call on one NVIDIA GPU (H100 80 GB or H200), from a
# bare machine without network, in at most GPU_CHECK_BUDGET_S seconds (default 480) of wall
# time for the steps (give the device call ~60 s more). Each step prints as it goes and has
# its own time limit; a step that fails or runs out of time gives `nan`
# for its figures and the next step starts. Steps:
#   1. bench/t5_step.py: our T5-XL training step against transformers', bf16, eager and
#      compiled (regionally, both), and which attention kernel ours runs (sdpa_backend=...)
#   2. bench/train_step.py: HINT-xl's training step against the concatenation baseline's, MFU,
#      and the step time ratio against the FLOPs ratio (efficiency per FLOP)
#   3. bench/peak_memory.py: one HINT-xxl training step with activation checkpointing: peak
#   4. bench/train_resume.py: HINT-xl through the platform's fit (Ray Train, FSDP2 world size
#      1, bf16, activation checkpointing, Adafactor; compiled with GPU_CHECK_COMPILE_TRAIN=1) on
#      the real SNI sample at the paper's lengths, a DCP checkpoint, the worker killed, the run
#      resumed; tokens/s and MFU from the platform's own reports
#   5. bench/inference.py at xl: HINT's cached task state against concatenation, at the median
#      output length (2 tokens) and at the 256 the paper's SNI evaluation decodes to
#   6. bench/evaluation.py at xl: `evaluate_export` (hint eval, hint paper run) in a Ray worker
#      on the GPU Ray assigned, then `hint predict` on the same rows
#   7. bench/serve_load.py: `hint serve` (a replica on the GPU) under concurrent clients, at
#      GPU_CHECK_SERVE_PRESET (default base: an xl export would take the step's whole limit to
#      write and load)
#   8. bench/decoder_lora_step.py: the decoder-only HINT model's LoRA training step (lora_only,
#      generated LoRA on q and v) at the decoder-only preset in T5-XL's role, llama-3b
#      (Llama-3.2-3B's shape; llama-tiny in the smoke run), bf16 under FSDP: MFU, tokens/s, peak
#      memory, per-example LoRA against a per-token copy
# Last line, every key always there: t5_xl_train_speedup_vs_hf_compiled=<x> hint_xl_mfu=<x>
#   platform_mfu=<x> hint_flop_efficiency_vs_concat=<x> xxl_peak_gib=<x> resume_ok=<0|1>
#   eval_examples_per_s=<x> infer_speedup_at_100=<x> serve_p50_ms=<x> decoder_lora_step_mfu=<x>
# (hint_xl_mfu: the benchmark's step; platform_mfu: `hint train`'s, step 4, nan when it fell
# back to a smaller preset; hint_flop_efficiency_vs_concat: concat's time per FLOP over HINT's,
# = FLOPs ratio / step time ratio, goal >= 0.9)
#
# Install: the GPU image has CUDA torch, transformers, tokenizers, sentencepiece, pandas,
# pyarrow and more, but no Ray or MLflow and no network, so the Makefile's `pip install` cannot
# run there. Run `bash bench/gpu_carry.sh` first where a registry is reachable: it puts the
# missing packages in .whl/ and the SNI sample in .gpu_data/ (both git-ignored); the device
# call carries both, and this script installs the wheels with --no-index, then the project
# itself (--no-deps) over the image's torch.
#
#   bash bench/gpu_check.sh                            # on the GPU machine
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh          # every step at a tiny size, on the CPU
#
# Each step's log goes to $OUT/gpu_check/ (the device machine's return folder: a file a step) or
# /tmp/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=${GPU_CHECK_SMOKE:-0}
PY=${PYTHON:-python3}
if [ "$SMOKE" = 1 ]; then  # a loaded 2-core CPU compiles and trains slowly: larger limits
  BUDGET=${GPU_CHECK_BUDGET_S:-3600} SCALE=8
else
  BUDGET=${GPU_CHECK_BUDGET_S:-480} SCALE=1
fi
LOGS=${OUT:-/tmp}/gpu_check
START=$SECONDS
export PYTHONUNBUFFERED=1 RAY_DATA_DISABLE_PROGRESS_BARS=1 RAY_TRAIN_ENABLE_PRINT_PATCH=0 \
       TOKENIZERS_PARALLELISM=false

if [ "$SMOKE" != 1 ]; then
  if ! nvidia-smi -L >/dev/null 2>&1 || \
     ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible here (nvidia-smi and $PY's torch); run it on a GPU machine, or GPU_CHECK_SMOKE=1 for the CPU smoke run"
    exit 2
  fi
fi
mkdir -p "$LOGS"

if [ "$SMOKE" != 1 ]; then
  echo "== install ($((SECONDS - START)) s)"
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/hint-site .whl/*.whl || { echo "gpu_check: installing .whl/ failed"; exit 3; }
    export PYTHONPATH=/tmp/hint-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl/ (bench/gpu_carry.sh makes it): Ray and MLflow must be on this machine already"
  fi
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || echo "(editable install failed; the project runs from PYTHONPATH)"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DATA=.gpu_data
[ -d "$DATA/sni" ] || DATA=../shared/data

"$PY" - <<'EOF' 2>&1 | tee "$LOGS/environment.log"
import importlib.metadata as md, os, platform, shutil, torch
names = ("torch", "transformers", "ray", "mlflow-skinny", "mlflow", "numpy", "pyarrow", "pandas")
versions = []
for n in names:
    try:
        versions.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        pass
print("python", platform.python_version(), "|", ", ".join(versions))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for path in ("/dev/shm", "/tmp"):
    if os.path.isdir(path):
        print(f"{path}: {shutil.disk_usage(path).free / 2**30:.0f} GiB free")
print(f"CPUs {os.cpu_count()}")
EOF

step() {  # step NAME BUDGET_S COMMAND...: runs COMMAND in its own session, within its budget
  local name=$1 budget=$(($2 * SCALE)); shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((budget < left ? budget : left))
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, ${left} s of the ${BUDGET} s left"
    return 1
  fi
  echo "== $name (limit ${limit} s, at $((SECONDS - START)) s): $*"
  local begin=$SECONDS
  local sid_file rc
  sid_file=$(mktemp)
  if command -v setsid >/dev/null; then
    setsid -w bash -c 'echo $$ > "$0"; exec timeout -s INT -k 15 "$@"' "$sid_file" "$limit" "$@" \
      2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    pkill -KILL -s "$(cat "$sid_file")" 2>/dev/null  # what the step left running (Ray)
  else
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
  fi
  rm -f "$sid_file"
  echo "== $name: exit $rc after $((SECONDS - begin)) s"
  return "$rc"
}

figure() {  # figure NAME KEY: KEY's last value in step NAME's log, else nan
  local value
  value=$(cat "$LOGS/$1.log" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | tail -n 1)
  echo "${value:-nan}"
}

if [ "$SMOKE" = 1 ]; then
  XL=tiny XXL=tiny SERVE_PRESET=tiny DECODER=llama-tiny
  T5_ARGS=(--batch 2 --input-len 32 --target-len 8 --steps 2)
  STEP_ARGS=(--batch 4 --micro 2 --steps 1)
  PEAK_ARGS=(--batch 2)
  RESUME_ARGS=(--steps 6 --checkpoint-every 2 --kill-after 3 --log-every 1)
  INFER_ARGS=(--dtype fp32 --repeats 1 --batch-size 4 --output-lens median,8)
  EVAL_ARGS=(--max-per-task 2 --max-new-tokens 8)
  SERVE_ARGS=(--requests 8 --seconds 30 --clients 2)
  DECODER_ARGS=(--batch 4 --micro 2 --steps 1)
else
  XL=xl XXL=xxl SERVE_PRESET=${GPU_CHECK_SERVE_PRESET:-base} DECODER=llama-3b
  T5_ARGS=(--batch 16 --input-len 512 --target-len 128 --steps 5)
  STEP_ARGS=(--batch 16 --micro 8 --steps 2)  # two micro-batches a step, as the worker runs
  PEAK_ARGS=(--batch 4)
  RESUME_ARGS=(--steps 16 --checkpoint-every 8 --kill-after 10 --log-every 2)
  INFER_ARGS=(--dtype bf16 --repeats 1)
  EVAL_ARGS=(--max-per-task 20 --max-new-tokens 32)
  SERVE_ARGS=(--requests 200 --seconds 20 --clients 8)
  DECODER_ARGS=(--batch 8 --steps 3 --instruction-len 256 --input-len 512 --target-len 128)
fi

step t5_step 120 "$PY" bench/t5_step.py --preset "$XL" --compile "${T5_ARGS[@]}"
step train_step 55 "$PY" bench/train_step.py --preset "$XL" --data "$DATA" "${STEP_ARGS[@]}"
step peak_memory 40 "$PY" bench/peak_memory.py --preset "$XXL" "${PEAK_ARGS[@]}"
# Compiling HINT's block variants (twice: the restarted worker compiles again) could take this
# step's whole limit on the GPU: eager unless GPU_CHECK_COMPILE_TRAIN=1 (the smoke compiles).
[ "${GPU_CHECK_COMPILE_TRAIN:-$SMOKE}" = 1 ] && RESUME_ARGS+=(--compile)
step train_resume 120 "$PY" bench/train_resume.py --preset "$XL" --data "$DATA" "${RESUME_ARGS[@]}"
step inference 60 "$PY" bench/inference.py --preset "$XL" --out /tmp/gpu_check_inference "${INFER_ARGS[@]}"
step evaluation 60 "$PY" bench/evaluation.py --preset "$XL" --data "$DATA" "${EVAL_ARGS[@]}"
step serve 70 "$PY" bench/serve_load.py --preset "$SERVE_PRESET" "${SERVE_ARGS[@]}"
step decoder_lora 60 "$PY" bench/decoder_lora_step.py --preset "$DECODER" "${DECODER_ARGS[@]}"

echo "== done in $((SECONDS - START)) s; logs in $LOGS"
grep -h "^sdpa_backend=" "$LOGS/t5_step.log" 2>/dev/null
grep -ho "^[a-z]* *step .*sdpa kernels [a-z,]*" "$LOGS/train_step.log" 2>/dev/null | sed 's/step .*sdpa kernels/sdpa kernels/'
grep -h "^eval_examples_per_s=" "$LOGS/evaluation.log" 2>/dev/null
grep -h "^hint_speedup_at_1=" "$LOGS/inference.log" 2>/dev/null
step_ratio=$(figure train_step hint_over_concat_step)
flops_ratio=$(figure train_step hint_over_concat_flops)
efficiency=$(awk -v s="$step_ratio" -v f="$flops_ratio" \
  'BEGIN { if (s + 0 > 0 && f != "nan" && s != "nan") printf "%.3f", f / s; else print "nan" }')
echo "hint_over_concat_step=$step_ratio hint_over_concat_flops=$flops_ratio (efficiency per FLOP = flops / step)"
platform_mfu=$(figure train_resume mfu)
[ "$(figure train_resume preset)" = "$XL" ] || platform_mfu=nan  # fell back to a smaller preset
resume=$(figure train_resume resume_ok)
echo "t5_xl_train_speedup_vs_hf_compiled=$(figure t5_step compiled_train_speedup_vs_hf)" \
     "hint_xl_mfu=$(figure train_step mfu) platform_mfu=$platform_mfu" \
     "hint_flop_efficiency_vs_concat=$efficiency xxl_peak_gib=$(figure peak_memory peak_gib)" \
     "resume_ok=${resume/nan/0} eval_examples_per_s=$(figure evaluation eval_examples_per_s)" \
     "infer_speedup_at_100=$(figure inference hint_speedup_at_100) serve_p50_ms=$(figure serve p50_ms)" \
     "decoder_lora_step_mfu=$(figure decoder_lora mfu)"
