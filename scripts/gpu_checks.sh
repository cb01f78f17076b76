#!/usr/bin/env bash
# Every GPU check in one run, for a machine with a CUDA GPU (CI has none): run from the repository root.
#   bash scripts/gpu_checks.sh OUTDIR
# Uses the machine's own python3 (PYTHON=... for another) with the repository on PYTHONPATH, no install.
# Steps: versions; the CUDA tests (must run, not skip); benchmarks/gpu_check.py; the CLI on --device cuda /
# --runtime torch-cuda; torchrun on a GPU machine (CPU job -> gloo; more processes than GPUs -> exit 2);
# the whole test suite on this machine's torch. Each step's exit status goes to OUTDIR/summary.txt, every step's
# output to OUTDIR/steps.log, gpu_check's JSON to OUTDIR/gpu_check.json.
# On this workplace's lent H200 (2026-11-28: torch 2.11.0+cu130, onnxruntime 1.30.0 without CUDA, no onnxsim) the
# whole run took 345 s with SUITE_TIMEOUT=180; onnxsim went along as a wheel (.whl/, pip --target, PYTHONPATH).
# 2026-12-04 (same versions): every step but the suite 383 s; the suite (683 tests) needs over 210 s on 14 workers.
# ONLY="cuda_tests suite suite_failed_rerun" reruns just those steps.
set -u
out=${1:-gpu_out}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
t=$(mktemp -d)
step() {  # step NAME EXPECTED_RC CMD...; ONLY="name name ..." runs just those steps (a rerun of what failed)
  local name=$1 want=$2 start rc
  shift 2
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  echo "=== $name"
  start=$(date +%s)
  "$@" >"$t/$name.log" 2>&1
  rc=$?
  { echo "=== $name"; cat "$t/$name.log"; } >>"$out/steps.log"  # one file: a device run returns only 8
  tail -n 25 "$t/$name.log"
  echo "$name rc=$rc want=$want $(($(date +%s) - start))s $([ "$rc" = "$want" ] && echo ok || echo FAIL)" | tee -a "$out/summary.txt"
}
step env 0 bash -c "nvidia-smi -L; $py -c 'import torch, onnx, onnxruntime as o; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), onnx.__version__, o.__version__, o.get_available_providers())'"
step cuda_tests 0 bash -c "$py -m pytest -p no:cacheprovider -rs tests/test_verify.py tests/test_export_bench.py -k cuda >$t/cuda.txt 2>&1; cat $t/cuda.txt; grep -qE '[0-9]+ passed' $t/cuda.txt && ! grep -qiE 'skipped|failed|error' $t/cuda.txt"
step gpu_check 0 $py benchmarks/gpu_check.py --json "$out/gpu_check.json"
step train_cuda 0 $py -m bnfold train --arch resnet-tiny --steps 40 --device cuda -o "$t/c.pt" --json
$py -c "import numpy as np; np.save('$t/x.npy', np.random.default_rng(0).standard_normal((256, 1, 8, 8)).astype('float32'))"
step stats_cuda 0 $py -m bnfold stats "$t/c.pt" --data "$t/x.npy" --device cuda -o "$t/s.pt" --json
step fold_pt 0 $py -m bnfold fold "$t/s.pt" -o "$t/f.pt"
step fold_onnx_verify 0 $py -m bnfold fold "$t/s.pt" -o "$t/f.onnx" --verify
step verify_torch_cuda 0 $py -m bnfold verify "$t/s.pt" "$t/f.pt" --runtime torch-cuda --json
step bench_torch_cuda 0 $py -m bnfold bench "$t/s.pt" "$t/f.pt" --runtime torch-cuda --batch-size 1 --batch-size 64 --rounds 3
step bench_default 0 $py -m bnfold bench "$t/s.pt" --iterations 20
step torchrun_cpu_on_gpu_machine 0 $py -m torch.distributed.run --standalone --nproc-per-node 2 -m bnfold train --arch resnet-tiny --steps 20 -o "$t/ddp.pt" --json
step torchrun_cuda_1 0 $py -m torch.distributed.run --standalone --nproc-per-node 1 -m bnfold train --arch resnet-tiny --steps 20 --device cuda --sync-bn -o "$t/ddp1.pt" --json
gpus=$($py -c 'import torch; print(torch.cuda.device_count())')
step torchrun_more_procs_than_gpus 0 bash -c "$py -m torch.distributed.run --standalone --nproc-per-node $((gpus + 1)) -m bnfold train --arch resnet-tiny --steps 20 --device cuda -o $t/ddp2.pt 2>&1 | grep 'needs one GPU per process'"
# -v (pyproject's -q taken off): each test's verdict is printed as it ends, so a run stopped at the time limit still names what failed
# (xdist loses the end-of-run report on SIGINT); OUTDIR/suite_failed.txt lists them
step suite 0 timeout -s INT "${SUITE_TIMEOUT:-300}" $py -m pytest -p no:cacheprovider -n "${SUITE_WORKERS:-8}" --timeout 240 -o addopts= -v --tb=short -rfE --durations 25 tests
grep -E "(FAILED|ERROR) tests/" "$out/steps.log" | sed 's/^.*\(FAILED\|ERROR\) /\1 /' | sort -u >"$out/suite_failed.txt"
# the failures again, alone, for their tracebacks (a suite stopped at its time limit prints none)
ids=$(grep -oE "tests/[^ ]+::[^ ]+" "$out/suite_failed.txt" | sort -u | tr '\n' ' ')
[ -z "$ids" ] || step suite_failed_rerun 0 timeout -s INT "${RERUN_TIMEOUT:-120}" $py -m pytest -p no:cacheprovider -n 4 --timeout 100 --tb=short -rfE $ids
echo "=== summary"
cat "$out/summary.txt"
! grep -q FAIL "$out/summary.txt"
