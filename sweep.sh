#!/usr/bin/env bash
# Run hume.py (or run_turtle.py: --turtle) for several seeds over the GPUs of one machine, then score the folder
# with evaluate.py.
#
#   bash sweep.sh                                   # seeds 0..9 of the bundled demo, into ./linear_tasks/
#   bash sweep.sh --seeds "0 1 2" --jobs 2 -- --exp_path tasks/demo --num_iters 150 --outer_lr 0.01
#   bash sweep.sh --eval_phi1 data/representations/mocov2/cifar10test_l2.npy \
#       --eval_labels data/labels/cifar10test_targets.npy -- \
#       --phi1_path data/representations/mocov2/cifar10train_l2.npy \
#       --phi2_path data/representations/dino/cifar10train.npy --exp_path tasks/inductive/moco_dino/cifar10/
#   bash sweep.sh --turtle --seeds "0 1 2 3 4" -- --T 1000 --exp_path tasks/turtle_demo5/
#
# See `bash sweep.sh -h`. On a SLURM cluster use slurm/hume_array.sbatch instead (slurm/README.md).
set -eu
set -f  # word lists (seeds, GPU ids) are split on spaces, never glob-expanded

HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}

usage() {
    cat <<'EOF'
usage: bash sweep.sh [options] [-- hume.py flags...]

Runs hume.py once per seed (--seed is set here), up to --jobs at a time, then evaluate.py on the
--exp_path folder. Everything after "--" goes to hume.py unchanged; its --exp_path (default
./linear_tasks/, hume.py's own) is also the folder evaluated.

options:
  --seeds "S1 S2 ..."  seeds to run (default: "0 1 2 3 4 5 6 7 8 9", as the paper averages)
  --jobs N             runs at a time (default: the number of GPUs, or 1 on CPU)
  --eval_phi1 PATH     evaluate.py --phi1_path (default: evaluate.py's, the bundled demo's test split)
  --eval_labels PATH   evaluate.py --gt_labels_path (default: evaluate.py's)
  --turtle             run run_turtle.py instead of hume.py (its flags after "--"; default --exp_path
                       ./turtle_tasks/, run_turtle.py's own)
  --eval_phi_paths "A B ..."  evaluate.py --phi_paths (TURTLE tasks: every space's array of the points)
  --no_eval            skip the evaluate.py step
  -h, --help           show this help

GPUs: the ids in CUDA_VISIBLE_DEVICES if set, else those `nvidia-smi -L` lists. Parallel slot j (of
--jobs) runs its share of the seeds one after another with CUDA_VISIBLE_DEVICES=<GPU j mod #GPUs> (so
leave hume.py's --device unset, or cuda). No GPU, or
--device cpu among the hume.py flags: CPU, with --device cpu added and OMP_NUM_THREADS (unless set) =
cores / jobs.

A seed whose linear_task_{seed}.pt and results_{seed}.pickle both exist in --exp_path is skipped, so
rerunning the same command finishes an interrupted sweep. Each seed's output is appended to
<exp_path>/log_{seed}.txt. If a seed fails, no new seed starts (running ones finish), the failed seeds
and their logs are named, evaluate.py is not run, and the exit code is 1. Bad options: exit code 2.
evaluate.py also writes <exp_path>/evaluation.json.
EOF
}

die() { echo "sweep.sh: error: $*" >&2; exit 2; }
say() { echo "sweep.sh: $*"; }

decimal() {  # decimal WHAT VALUE MAX: prints VALUE as a base-10 integer in 0..MAX (bash alone reads 08 as octal)
    local v=$2
    case "$v" in
        ''|*[!0123456789]*) die "$1: '$v' is not an integer (digits 0-9 only, read in base 10)" ;;
    esac
    v=${v#"${v%%[!0]*}"}  # leading zeros off: 007 is 7, and seed 7's files are linear_task_7.pt
    v=${v:-0}
    if [ "${#v}" -gt "${#3}" ] || [ $((10#$v)) -gt "$3" ]; then die "$1: $2 is more than $3"; fi
    echo "$v"
}

# ---------------------------------------------------------------- options
seeds="0 1 2 3 4 5 6 7 8 9"
jobs=""
eval_phi1=""
eval_labels=""
eval_phi_paths=""
script=hume.py
do_eval=1
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --seeds) [ $# -ge 2 ] || die "--seeds needs a value"; seeds=$2; shift 2 ;;
        --jobs) [ $# -ge 2 ] && [ -n "$2" ] || die "--jobs needs a value"; jobs=$2; shift 2 ;;
        --eval_phi1) [ $# -ge 2 ] || die "--eval_phi1 needs a value"; eval_phi1=$2; shift 2 ;;
        --eval_labels) [ $# -ge 2 ] || die "--eval_labels needs a value"; eval_labels=$2; shift 2 ;;
        --eval_phi_paths) [ $# -ge 2 ] || die "--eval_phi_paths needs a value"; eval_phi_paths=$2; shift 2 ;;
        --turtle) script=run_turtle.py; shift ;;
        --no_eval) do_eval=0; shift ;;
        --) shift; break ;;
        *) die "unknown option $1 (hume.py flags go after --; see bash sweep.sh -h)" ;;
    esac
done
# "$@" is now the hume.py flags: read the few that sweep.sh must know about.
exp_path=./linear_tasks/
[ "$script" = hume.py ] || exp_path=./turtle_tasks/
device=""
own_data=0
prev=""
for a in "$@"; do
    case "$prev" in
        --exp_path) exp_path=$a ;;
        --device) device=$a ;;
    esac
    case "$a" in
        --exp_path=*) exp_path=${a#--exp_path=} ;;
        --device=*) device=${a#--device=} ;;
        --phi1_path|--phi1_path=*|--phi_paths|--phi_paths=*) own_data=1 ;;
        --seed|--seed=*) die "do not pass --seed to hume.py; use sweep.sh --seeds" ;;
    esac
    for full in --exp_path --seed --device; do  # hume.py would take an abbreviation that sweep.sh cannot see
        case "$full" in
            "${a%%=*}"?*) [ "${#a}" -le 2 ] || die "hume.py flag ${a%%=*}: write $full in full" ;;
        esac
    done
    prev=$a
done
[ -n "$exp_path" ] || die "--exp_path is empty"
[ -n "$jobs" ] && { jobs=$(decimal --jobs "$jobs" 4096) || exit 2; }
[ "$jobs" != 0 ] || die "--jobs must be a positive integer, got '0'"
checked=""
for s in $seeds; do  # numpy's seed range, checked before any run
    checked="$checked $(decimal "--seeds" "$s" 4294967295)" || exit 2
done
seeds=$checked
[ -n "$seeds" ] || die "--seeds is empty"
uniq=""
for s in $seeds; do  # a seed given twice would run twice into the same files (hume.py refuses the second)
    case " $uniq " in
        *" $s "*) say "seed $s: given more than once, run once" ;;
        *) uniq="$uniq $s" ;;
    esac
done
seeds=$uniq
if [ -n "$eval_labels" ] && [ -z "$eval_phi1$eval_phi_paths" ]; then
    die "--eval_labels needs --eval_phi1 or --eval_phi_paths (the points those labels belong to)"
fi
if [ "$own_data" -eq 1 ] && [ -z "$eval_phi1$eval_phi_paths" ] && [ "$do_eval" -eq 1 ]; then
    die "$script gets its own data but sweep.sh no --eval_phi1/--eval_phi_paths: evaluate.py would score the" \
        "tasks on the bundled demo; pass --eval_phi1 or --eval_phi_paths (and --eval_labels), or --no_eval"
fi

# ---------------------------------------------------------------- devices
gpus=""
case "$device" in
    cpu) ;;
    *)
        if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
            gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' ' ')
        elif command -v nvidia-smi >/dev/null 2>&1; then
            gpus=$(nvidia-smi -L 2>/dev/null | sed -n 's/^GPU \([0-9][0-9]*\):.*/\1/p' | tr '\n' ' ')
        fi ;;
esac
extra=""
if [ -z "$gpus" ]; then
    ngpu=0
    [ -n "$device" ] || extra="--device cpu"
else
    ngpu=$(echo $gpus | wc -w)
fi
if [ -z "$jobs" ]; then
    if [ "$ngpu" -gt 0 ]; then jobs=$ngpu; else jobs=1; fi
fi
if [ "$ngpu" -eq 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
    OMP_NUM_THREADS=$(( cores / jobs > 0 ? cores / jobs : 1 ))
    export OMP_NUM_THREADS
fi

# ---------------------------------------------------------------- which seeds to run
mkdir -p "$exp_path" || die "--exp_path $exp_path: cannot create the folder"
todo=""
nskip=0
for s in $seeds; do
    if { [ -f "$exp_path/linear_task_$s.pt" ] || [ -f "$exp_path/turtle_task_$s.pt" ]; } &&
        [ -f "$exp_path/results_$s.pickle" ]; then
        say "seed $s: skipped, its task already exists in $exp_path"
        nskip=$((nskip + 1))
    else
        todo="$todo $s"
    fi
done
ntodo=$(echo $todo | wc -w)
if [ "$ngpu" -gt 0 ]; then where="GPUs: $gpus"; else where="CPU"; fi
say "$ntodo seed(s) to run, $nskip skipped; $jobs at a time on $where; logs: $exp_path/log_{seed}.txt"

# ---------------------------------------------------------------- run
state=$(mktemp -d "${TMPDIR:-/tmp}/hume_sweep.XXXXXX")
trap 'rm -rf "$state"' EXIT

run_seed() {  # run_seed SEED GPU_OR_EMPTY HUME_FLAGS...
    local seed=$1 gpu=$2 log="$exp_path/log_$1.txt" start rc=0
    shift 2
    start=$(date +%s)
    {
        echo "=== $(date '+%Y-%m-%d %H:%M:%S') sweep.sh: $PY $HERE/$script $* $extra --seed $seed" \
            "${gpu:+(CUDA_VISIBLE_DEVICES=$gpu)}"
    } >>"$log"
    if [ -n "$gpu" ]; then
        CUDA_VISIBLE_DEVICES=$gpu "$PY" "$HERE/$script" "$@" $extra --seed "$seed" >>"$log" 2>&1 || rc=$?
    else
        "$PY" "$HERE/$script" "$@" $extra --seed "$seed" >>"$log" 2>&1 || rc=$?
    fi
    if [ "$rc" -eq 0 ]; then
        say "seed $seed: done in $(( $(date +%s) - start ))s"
    else
        touch "$state/stop"
        echo "$seed $rc" >>"$state/failed"
        echo "sweep.sh: seed $seed FAILED (exit $rc); log: $log; its last lines:" >&2
        tail -n 5 "$log" | sed 's/^/    /' >&2
    fi
}

worker() {  # worker INDEX HUME_FLAGS...: runs seeds INDEX, INDEX+jobs, ... of the to-do list, in turn
    local w=$1 i=0 gpu="" s
    shift
    if [ "$ngpu" -gt 0 ]; then gpu=$(echo $gpus | cut -d' ' -f$(( w % ngpu + 1 ))); fi
    for s in $todo; do
        if [ $(( i % jobs )) -eq "$w" ]; then
            [ ! -e "$state/stop" ] || return 0
            say "seed $s: started${gpu:+ on GPU $gpu}"
            run_seed "$s" "$gpu" "$@"
        fi
        i=$((i + 1))
    done
}

w=0
while [ "$w" -lt "$jobs" ] && [ "$w" -lt "$ntodo" ]; do
    worker "$w" "$@" &
    w=$((w + 1))
done
wait

if [ -s "$state/failed" ]; then
    echo "sweep.sh: $(wc -l <"$state/failed" | tr -d ' ') seed(s) failed:" >&2
    while read -r seed rc; do
        echo "    seed $seed (exit $rc): see $exp_path/log_$seed.txt" >&2
    done <"$state/failed"
    echo "sweep.sh: fix the cause and rerun the same command (finished seeds are skipped)" >&2
    exit 1
fi

# ---------------------------------------------------------------- evaluate
[ "$do_eval" -eq 1 ] || exit 0
say "evaluating $exp_path"
set -- --tasks_path "$exp_path" --json "$exp_path/evaluation.json"
[ -z "$eval_phi1" ] || set -- "$@" --phi1_path "$eval_phi1"
[ -z "$eval_phi_paths" ] || set -- "$@" --phi_paths $eval_phi_paths
[ -z "$eval_labels" ] || set -- "$@" --gt_labels_path "$eval_labels"
"$PY" "$HERE/evaluate.py" "$@" || { echo "sweep.sh: evaluate.py failed on $exp_path" >&2; exit 1; }
say "evaluation written to $exp_path/evaluation.json"
