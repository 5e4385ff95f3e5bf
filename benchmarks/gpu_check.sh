#!/bin/bash
# The GPU checks, as one call on a bare GPU machine (torch + transformers, no Ray, no vLLM):
# the CUDA/bf16 tests (tests/test_cuda.py), then one of two GPU-sized benchmarks (BENCH):
#   sft       benchmarks/gpu_sft.py: the 4.9x larger `small` policy by the SFT recipe, for issue 6's
#             "small policy + guided@8 vs the larger policy's greedy"; its snapshots come back as tgz
#   verifier  benchmarks/prm_verifier.py: a learned verifier on exact labels, variants side by side
#             (needs runs/arith/policy, from make demo: carry it)
# Results go under $OUT (default runs/gpu_check): pytest.log, then sft.log + log.json + snapshots,
# or verifier.log + results.json + data/test samples (gzipped) + the two best PRMs (tgz).
#
#   OUT=runs/gpu_check bash benchmarks/gpu_check.sh                  # tests + the larger policy, MINUTES=4
#   SFT_ARGS="lr=7e-4 max_steps=40000" MINUTES=6 bash benchmarks/gpu_check.sh   # more SFTConfig overrides
#   LRS=5e-4,1e-3,2e-3 MINUTES=6 bash benchmarks/gpu_check.sh    # one sft run per lr, side by side on the GPU
#   BENCH=verifier TRAIN_PROBLEMS=3000 MINUTES=3 VARIANTS=head+min,head bash benchmarks/gpu_check.sh
#
# Sized for a 15-minute device lease: ~1-2 min of tests, then MINUTES of training plus its
# held-out checks (sft), or ~2 min of sampling, MINUTES of training and ~1 min of scoring
# (verifier). On a CPU the tests skip and the benchmark runs (slowly) on the CPU.
OUT=${OUT:-runs/gpu_check}; mkdir -p "$OUT"; export OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
${PYTHON:-python3} -c "import torch,transformers,sys;print(sys.version.split()[0],torch.__version__,transformers.__version__)"
date +%T
# the CUDA / bf16 paths (published PRM kinds and the chat policy included), then the published
# PRM kinds against their authors' recipes (no Ray, no vLLM needed)
timeout 240 ${PYTHON:-python3} -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_published_prms.py > $OUT/pytest.log 2>&1
echo "pytest rc $?"; grep -v 'Loading\|Writing' $OUT/pytest.log | tail -25
date +%T
sft_run() {  # sft_run OUT_DIR LOG [more SFTConfig overrides]: the larger policy by gpu_sft.py
  timeout ${BENCH_TIMEOUT:-420} ${PYTHON:-python3} benchmarks/gpu_sft.py --config mathprm/configs/sft_arith_small.yaml \
    --out "$1" --minutes ${MINUTES:-4} eval_every=${EVAL_EVERY:-1000} $SFT_ARGS "${@:3}" 2>&1 \
    | grep --line-buffered -v 'Loading\|Writing' > "$2"
}
if [ "${BENCH:-sft}" = sft ] && [ -n "$LRS" ]; then  # one run per learning rate, all at once on the one GPU
  for lr in ${LRS//,/ }; do
    sft_run /tmp/s_$lr $OUT/sft_$lr.log lr=$lr &
  done
  wait; echo "sft done"; date +%T
  for lr in ${LRS//,/ }; do
    echo "== lr $lr"; tail -6 $OUT/sft_$lr.log; cp /tmp/s_$lr/log.json $OUT/log_$lr.json 2>/dev/null
    # the final policy and the best snapshot only (a 4.3M policy is ~9 MB in bf16)
    best=$(cd /tmp/s_$lr 2>/dev/null && ls -d snap_* 2>/dev/null | sort -t_ -k2 -g | tail -1)
    for d in $best final; do [ -d /tmp/s_$lr/$d ] && tar czf $OUT/${lr}_$d.tgz -C /tmp/s_$lr $d; done
  done
  ls -la $OUT; exit 0
fi
if [ "${BENCH:-sft}" = sft ]; then
  sft_run /tmp/s $OUT/sft.log
  echo "sft done"; date +%T; tail -25 $OUT/sft.log
  cp /tmp/s/log.json $OUT/ 2>/dev/null
  cd /tmp/s && for d in snap_* final; do [ -d $d ] && tar czf $OUT/$d.tgz $d; done
  ls -la $OUT; exit 0
fi
timeout ${BENCH_TIMEOUT:-400} ${PYTHON:-python3} benchmarks/prm_verifier.py --policy runs/arith/policy --out /tmp/v \
  --train-problems ${TRAIN_PROBLEMS:-3000} --minutes ${MINUTES:-3} --variants ${VARIANTS:-head+min,head+min@3e-4,head,head+all~128} 2>&1 \
  | grep --line-buffered -v 'Loading\|Writing' > $OUT/verifier.log
echo "bench done"; date +%T; tail -30 $OUT/verifier.log
cp /tmp/v/results.json $OUT/ 2>/dev/null
cd /tmp/v && gzip -c data.jsonl > $OUT/data.jsonl.gz; gzip -c test.jsonl > $OUT/test.jsonl.gz
${PYTHON:-python3} - <<'PY'
import json, os, subprocess
from pathlib import Path
out = os.environ["OUT"]
try:
    rows = json.loads(Path("/tmp/v/results.json").read_text())["results"]
    ranked = sorted((r for r in rows if not r["prm"].startswith("prior")), key=lambda r: -(r["step_auroc"] or 0))
    dirs = [Path(r["dir"]).name for r in ranked[:2]]
except (OSError, KeyError, ValueError) as e:  # no results (a timeout): whatever variants finished training
    print("no results.json:", e)
    dirs = [p.name for p in Path("/tmp/v").glob("prm_*") if p.name != "prm_prior"][:2]
for i, d in enumerate(dirs):
    subprocess.run(["tar", "czf", f"{out}/best{i + 1}.tgz", d], cwd="/tmp/v", check=False)
    print("packed", d)
PY
ls -la $OUT
