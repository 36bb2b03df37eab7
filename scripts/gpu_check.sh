#!/usr/bin/env bash
# One call on a CUDA machine: the CUDA tests, the benchmarks with --device cuda, and NCCL with one rank.
#
#   scripts/gpu_check.sh [--dry-run] [--prepare] [FOLDER]
#
# FOLDER (default $OUT, else outputs/gpu_check) receives three files: summary.txt (one line per step: exit code and
# seconds), gpu_check.log (every step's output, under a '=== step' header) and env.txt (nvidia-smi, torch, commit).
# Run folders of run.py go to a temporary folder, so FOLDER holds only those three files.
#
# --dry-run   print the steps and their time limits; run nothing (tests/test_gpu_check.py runs this on the CPU)
# --prepare   (here, with network access to the package index) put the wheels the GPU image lacks into .whl/:
#             hydra-core, omegaconf and antlr4-python3-runtime (built here: PyPI has only its source). On the GPU
#             machine the script installs .whl/*.whl into /tmp/site when that folder exists.
#
# Each step has its own time limit (timeout), a failed step does not stop the others, and the limits add up to
# under 8 minutes. With the device tool of this workplace (once, here: echo /.whl/ >> .git/info/exclude):
#   scripts/gpu_check.sh --prepare
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -u
cd "$(dirname "$0")/.."

DRY=0
PREPARE=0
FOLDER=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --prepare) PREPARE=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (valid: --dry-run, --prepare, FOLDER)" >&2; exit 2 ;;
    *) FOLDER="$arg" ;;
  esac
done
FOLDER="${FOLDER:-${OUT:-outputs/gpu_check}}"
PY="${PYTHON:-python3}"

if [ "$PREPARE" = 1 ]; then
  mkdir -p .whl
  set -e
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl hydra-core==1.3.8 omegaconf==2.3.1
  "$PY" -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
  ls -l .whl
  exit 0
fi

RUNS="$(mktemp -d 2>/dev/null || echo /tmp/gpu_check_runs)"
TOTAL=0
# name | limit (s) | command
STEPS=(
  "tests_cuda|150|$PY -m pytest -q -p no:cacheprovider -m 'slow or not slow' tests/test_cuda.py tests/test_compiled.py; $PY -m pytest -q -p no:cacheprovider tests/test_kfac.py tests/test_torch_optim.py -k cuda"
  "bench_curvature|90|$PY scripts/bench_curvature.py --device cuda --no-backends --repeats 5"
  "bench_execution|90|$PY scripts/bench_curvature.py --device cuda --rows execution --repeats 5 --models mlp cnn"
  "bench_runner|45|$PY scripts/bench_runner.py --device cuda --steps 100 --repeats 2"
  "bench_peers|45|$PY scripts/bench_peers.py --device cuda --repeats 3"
  "nccl_backend|25|torchrun --standalone --nproc_per_node=1 $RUNS/nccl_probe.py"
  "nccl_run|25|torchrun --standalone --nproc_per_node=1 run.py device=cuda optimizer=hf trainer.max_steps=5 trainer.progress=false hydra.run.dir=$RUNS/nccl"
)
# runner/distributed.py starts no process group for one rank (launch_rank() == world 1), so the NCCL step joins one
# itself: an all-reduce on the GPU through NCCL, then the same one-rank launch of run.py.
cat > "$RUNS/nccl_probe.py" <<'PROBE'
import torch
import torch.distributed as dist

dist.init_process_group("nccl")
t = torch.full((4,), 2.0, device="cuda")
dist.all_reduce(t)
print(f"backend {dist.get_backend()}, world {dist.get_world_size()}, all_reduce {t.tolist()}")
assert dist.get_backend() == "nccl" and t.tolist() == [2.0] * 4
dist.destroy_process_group()
PROBE
for step in "${STEPS[@]}"; do TOTAL=$((TOTAL + $(echo "$step" | cut -d'|' -f2))); done

if [ "$DRY" = 1 ]; then
  echo "gpu_check.sh --dry-run: ${#STEPS[@]} steps, time limits adding up to ${TOTAL} s; output to $FOLDER"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<< "$step"
    printf '%-16s %4ss  %s\n' "$name" "$limit" "$command"
  done
  exit 0
fi

mkdir -p "$FOLDER"
LOG="$FOLDER/gpu_check.log"
SUMMARY="$FOLDER/summary.txt"
: > "$LOG"; : > "$SUMMARY"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
export CURVLAB_DATA="${CURVLAB_DATA:-$RUNS/data}"
{
  date -u +%FT%TZ
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi 2>&1 | head -15
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
  lscpu | grep -E 'Model name|^CPU\(s\)'
} > "$FOLDER/env.txt" 2>&1

for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<< "$step"
  echo "=== $name (limit ${limit}s): $command" >> "$LOG"
  start=$SECONDS
  timeout --kill-after=5 "$limit" bash -c "$command" >> "$LOG" 2>&1
  rc=$?
  line="$name rc=$rc $((SECONDS - start))s"
  [ "$rc" = 124 ] && line="$line (time limit)"
  echo "$line" | tee -a "$SUMMARY"
done
grep -E '^\| |passed|failed|skipped|error' "$LOG" | tail -60
