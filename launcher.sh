#!/usr/bin/env bash
# Reproduce the five reference runs (SPEC section 5, after shared/reference/reference_notes.txt) and the random
# control beside them (run_5: does Q-learning differ from random actions?), then redraw the plots.
#
#   ./launcher.sh [--profile auto|full|cpu|smoke] [--datasets LIST] [--dir DIR] [-- EXTRA experiment.py FLAGS]
#
# Finished runs (final_info.json present) are skipped; interrupted ones (run.json without final_info.json)
# continue with --resume. The first failure stops the launcher with the failing run named.
# Run folders, notes.txt and the PNGs go to --dir (default: this project's folder).
# PYTHON selects the interpreter (default: python3 on PATH, e.g. an activated virtual environment).
set -euo pipefail

project="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
profile="auto"
datasets="shakespeare_char,enwik8,text8"
dir="$project"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
    --datasets) datasets="${2:?--datasets needs a value}"; shift 2 ;;
    --dir) dir="${2:?--dir needs a value}"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$dir"
cd "$dir"

titles=(
  "Baseline"
  "Q-learning"
  "Q-learning, higher initial LR"
  "Q-learning, improvement reward"
  "Q-learning, epsilon decay"
  "Random control"
)
descriptions=(
  "Cosine schedule with warmup, no agent: the baseline every run is compared with."
  "A tabular Q-learning agent multiplies the learning rate after each evaluation (actions x0.5..x2, reward -val loss, epsilon 0.1)."
  "As run 1, with initial learning rate 2e-3 for shakespeare_char and 1e-3 for enwik8 and text8."
  "As run 1, with reward = improvement in val loss since the previous evaluation."
  "As run 1, with epsilon 0.5 decaying x0.9 per decision to 0.05."
  "Control: the multiplier is multiplied by a uniformly random action (x0.5..x2) after each evaluation; Q-learning must beat this to have learned anything."
)
flags=(
  "--agent none"
  "--agent qlearning"
  "--agent qlearning --learning_rate shakespeare_char=2e-3,enwik8=1e-3,text8=1e-3"
  "--agent qlearning --reward improvement"
  "--agent qlearning --epsilon 0.5 --epsilon_decay 0.9 --epsilon_min 0.05"
  "--agent random"
)

start=$SECONDS
for i in "${!titles[@]}"; do
  run="run_$i"
  if [ -f "$run/final_info.json" ]; then
    echo "== $run: finished earlier, skipped"
    continue
  fi
  t0=$SECONDS
  if [ -f "$run/run.json" ]; then
    echo "== $run: interrupted earlier, resuming"
    cmd=("$python" "$project/experiment.py" --out_dir "$run" --resume ${extra[@]+"${extra[@]}"})
  else
    echo "== $run: ${titles[$i]}"
    # shellcheck disable=SC2206  # the flags are words by design
    cmd=("$python" "$project/experiment.py" --out_dir "$run" --profile "$profile" --datasets "$datasets"
         --title "${titles[$i]}" --description "${descriptions[$i]}" ${flags[$i]} ${extra[@]+"${extra[@]}"})
  fi
  if ! "${cmd[@]}"; then
    echo "launcher: $run failed; fix the cause and run the launcher again (finished runs are kept, $run resumes)" >&2
    exit 1
  fi
  echo "== $run: done in $((SECONDS - t0)) s"
done
"$python" "$project/plot.py" --out_dir "$dir"
echo "== all runs finished in $((SECONDS - start)) s; notes: $dir/notes.txt"
