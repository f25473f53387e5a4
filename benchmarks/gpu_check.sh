#!/usr/bin/env bash
# The CUDA checks in one prepared call (GPU time is usually short: every stage has its own time limit, a failing stage
# does not stop the others, and everything lands in $OUT/all.log + $OUT/gpu_check.tgz).
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh gpu_carry/s0        # on the GPU machine
#   DEV=cpu OUT=/tmp/out bash benchmarks/gpu_check.sh gpu_carry/s0  # plumbing dry run (slow, no 7B shapes)
#   ONLY="full_ft tests" OUT=/tmp/out bash benchmarks/gpu_check.sh gpu_carry/s0   # rerun some stages
#
# Every world run starts from the θ0 the repository ships (sena/world/theta0); pools and the test split are made
# from their seeds. gpu_carry/s0/cpu_iter_1/ holds round 1 of a seed-0 world run made on the CPU (fp32): its
# pairs.jsonl, report.json, log.jsonl and θ1's metrics.json. Making it, and the wheels the GPU image lacks:
#   python train.py --run-dir runs/gpu_ref --iter 1 && S=runs/gpu_ref/iter_1 && mkdir -p gpu_carry/s0/cpu_iter_1
#   cp $S/{pairs.jsonl,report.json,log.jsonl} $S/model/metrics.json gpu_carry/s0/cpu_iter_1/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1 importlib_metadata
# (both folders in .git/info/exclude; on the GPU: pip install --no-index --no-deps --target /tmp/site .whl/*.whl and
# PYTHONPATH=/tmp/site before this script).
# Stages:
#   build         θ0 built on the GPU from the shipped θ0's seed (bf16 autocast, DataLoader workers): time, hash
#                 and benchmarks against the shipped CPU-built θ0's meta.json
#   readiness     LLaVA-1.5-7B shapes, bf16 base + fp32 LoRA r=128, 4 pairs/step; then checkpointing, 16 pairs/step
#   bf16_pairs    round 1 on the CPU round's own pairs: bf16 reference cache, step-0 check, bf16 LoRA training,
#                 evaluation -> compare log.jsonl and metrics with the fp32 CPU round (same pairs, same seed)
#   bf16_round    round 1 from scratch on CUDA: bf16 generation, pairs, training, evaluation
#   full_ft       full fine-tuning (fp32 master weights under bf16 autocast) on the same pairs, no evaluation
#   tests         the test suite's training/generation/model files with CUDA visible
set -u
C=$(realpath "${1:-gpu_carry/s0}")
OUT=${OUT:-runs/gpu_check}
DEV=${DEV:-cuda}
W=${WORK:-/tmp/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT" "$W"
LOG="$OUT/all.log"
: > "$LOG"

stage() {  # stage NAME SECONDS CMD...: run with a limit, keep its output, report rc and seconds
    local name=$1 lim=$2 t0 rc
    shift 2
    case " ${ONLY:-$name} " in *" $name "*) ;; *) return ;; esac  # ONLY="full_ft tests": a rerun of some stages
    echo "=== $name (limit $lim s): $*" | tee -a "$LOG"
    t0=$(date +%s)
    timeout "$lim" "$@" > "$W/$name.log" 2>&1
    rc=$?
    echo "=== $name rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
    grep -v "^iter 1 step" "$W/$name.log" | tail -n "${TAIL:-40}" >> "$LOG"
}

world_dir() {  # world_dir NAME [with-pairs]: a fresh run directory (train.py installs θ0, makes pool and test)
    local d="$W/$1"
    rm -rf "$d" && mkdir -p "$d"
    if [ "${2:-}" = with-pairs ]; then
        mkdir -p "$d/iter_1" && cp "$C/cpu_iter_1/pairs.jsonl" "$d/iter_1/"
        # the pairs' image root is the CPU machine's absolute path; point it at this copy
        $PY -c "import json,sys; r=json.load(open(sys.argv[1])); r['image_root']=sys.argv[2]; \
json.dump(r, open(sys.argv[3], 'w'))" "$C/cpu_iter_1/report.json" "$d/pool/iter_1" "$d/iter_1/report.json"
        $PY -c "from sena import world; world.write_split('$d/pool/iter_1', 400, 1, 'pool1', '$d/labels/pool_iter_1.jsonl')"
    fi
    echo "$d"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'| transformers', transformers.__version__, '| diffusers', diffusers.__version__)"; } | tee -a "$LOG"

if [ "$DEV" = cuda ]; then
    SEED=$($PY -c "import json; print(json.load(open('sena/world/theta0/meta.json'))['seed'])")
    stage build 330 $PY -m sena.world.build --device cuda --seed "$SEED" --out "$W/theta0_cuda"
    $PY -c "import json, sys; a, b = (json.load(open(p)) for p in sys.argv[1:]); \
print('theta0 build', a['device'], a['seconds'], a['weights_sha256'][:12], '| shipped', b['device'], b['seconds'], \
b['weights_sha256'][:12]); [print(f'{k:24s} cuda-built {a[\"metrics\"][k]:.3f}  shipped {b[\"metrics\"][k]:.3f}') \
for k in ('pope_adversarial_f1', 'chair_i', 'chair_recall', 'vqa_overall', 'fmt_self_check')]" \
        "$W/theta0_cuda/meta.json" sena/world/theta0/meta.json 2>&1 | tee -a "$LOG"
    cp "$W/theta0_cuda/meta.json" "$W/theta0_cuda_meta.json" 2>/dev/null
    stage readiness 120 $PY -m benchmarks.gpu_readiness
    cp benchmarks/results/gpu_readiness.json "$W/gpu_readiness.json" 2>/dev/null
    stage readiness_ckpt 100 $PY -m benchmarks.gpu_readiness --checkpointing --batch-size 16
    cp benchmarks/results/gpu_readiness.json "$W/gpu_readiness_ckpt.json" 2>/dev/null
else
    stage readiness 150 $PY -m benchmarks.gpu_readiness --tiny --no-json
fi

A=$(world_dir bf16_pairs with-pairs)
stage bf16_pairs 120 $PY train.py --run-dir "$A" --iter 1 --device "$DEV"
B=$(world_dir bf16_round)
stage bf16_round 150 $PY train.py --run-dir "$B" --iter 1 --device "$DEV"
F=$(world_dir full_ft with-pairs)
stage full_ft 90 $PY train.py --run-dir "$F" --iter 1 --device "$DEV" --full-ft --lr 1e-5 --no-eval

# The side-by-side the checks are for: same pairs, fp32 CPU vs bf16 CUDA, step by step and in the end metrics.
$PY - "$C/cpu_iter_1" "$A/iter_1" "$B/iter_1" "$F/iter_1" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
cpu, a, b, f = sys.argv[1:]
def log(d):
    p = os.path.join(d, "log.jsonl")
    return [json.loads(x) for x in open(p)] if os.path.exists(p) else []
def met(p):
    return json.load(open(p)) if os.path.exists(p) else {}
lc, la, lf = log(cpu), log(a), log(f)
for name, l in (("cpu fp32", lc), ("cuda bf16 lora", la), ("cuda full-ft", lf)):
    if l:
        print(f"{name:15s} steps {len(l):3d} | step0 loss {l[0]['loss']:.4f} dpo {l[0]['dpo']:.4f} | last loss "
              f"{l[-1]['loss']:.4f} dpo {l[-1]['dpo']:.4f} margin {l[-1]['rewards/margins']:.3f} | "
              f"mean tok/s {sum(x['tokens_per_s'] for x in l) / len(l):.0f}")
if lc and la:
    n = min(len(lc), len(la))
    d = [abs(lc[i]["loss"] - la[i]["loss"]) for i in range(n)]
    print(f"|loss cpu - loss cuda bf16| over {n} steps: max {max(d):.4f}, mean {sum(d) / n:.4f}")
rows = {"cpu fp32 (pairs)": met(os.path.join(cpu, "metrics.json")),
        "cuda bf16 (pairs)": met(os.path.join(a, "model", "metrics.json")),
        "cuda bf16 (round)": met(os.path.join(b, "model", "metrics.json"))}
pick = {"POPE-adv F1": ("pope", "adversarial", "f1"), "POPE-adv yes": ("pope", "adversarial", "yes_ratio"),
        "CHAIR_i": ("chair", "chair_i"), "CHAIR recall": ("chair", "recall"), "VQA": ("vqa", "overall", "accuracy"),
        "fmt ask": ("format", "fmt_ask_question"), "fmt check": ("format", "fmt_self_check"),
        "fmt improve": ("format", "fmt_improve")}
def get(m, path):
    for p in path:
        m = m.get(p, {}) if isinstance(m, dict) else {}
    return m if isinstance(m, (int, float)) else float("nan")
print("metric".ljust(16) + "".join(n.rjust(20) for n in rows))
for k, path in pick.items():
    print(k.ljust(16) + "".join(f"{get(m, path):20.3f}" for m in rows.values()))
rb = os.path.join(b, "report.json")
if os.path.exists(rb):
    r, rc = json.load(open(rb)), json.load(open(os.path.join(cpu, "report.json")))
    for k in ("self_check_rewritten", "questions_kept", "pairs", "pairs_des", "pairs_gen", "mean_words_chosen",
              "mean_words_rejected"):
        print(f"generation {k:22s} cpu {rc.get(k)!s:>10}  cuda bf16 {r.get(k)!s:>10}")
EOF

stage tests "${TESTS_LIMIT:-100}" env OMP_NUM_THREADS=4 $PY -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_generate.py tests/test_losses.py \
    tests/test_lora.py tests/test_model.py tests/test_fast_paths.py tests/test_resume.py

# everything else comes back in one archive (the device tool returns at most 8 files)
for d in bf16_pairs bf16_round full_ft; do
    mkdir -p "$W/keep/$d" && cp "$W/$d/iter_1/"{log.jsonl,report.json,meta.json} "$W/keep/$d/" 2>/dev/null
    cp "$W/$d/iter_1/model/metrics.json" "$W/keep/$d/" 2>/dev/null
done
tar czf "$OUT/gpu_check.tgz" -C "$W" keep $(cd "$W" && ls *.log *.json 2>/dev/null)
echo "=== done" | tee -a "$LOG"
