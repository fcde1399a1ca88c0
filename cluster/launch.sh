#!/usr/bin/env bash
# Launch gigatron training, on a SLURM cluster or on this machine.
#
#   sbatch cluster/launch.sh recipes/llama3_405b.yaml [--set key=value ...]    # SLURM
#   sbatch --nodes=16 --time=4:00:00 cluster/launch.sh RECIPE                  # override any #SBATCH line
#   cluster/launch.sh recipes/llama3_debug.yaml [--set key=value ...]          # this machine (torchrun --standalone)
#   cluster/launch.sh --dry-run RECIPE ...                                      # check the layout, print the commands
#
# What it does, in order:
#   1. `gigatron layout RECIPE --set ...` validates the parallel layout without starting any process
#      group and prints `world_size=N tp=.. cp=.. pp=.. dp=..` (exit 2 and a message if invalid).
#   2. Under SLURM it checks nodes x processes-per-node == world_size and stops BEFORE srun otherwise.
#   3. It starts one torchrun per node (srun --ntasks-per-node=1), rendezvous on the first node,
#      running `python -m gigatron.core.train RECIPE --set ... --set run.dir=RUN_DIR` on every rank.
#   4. Preemption / time limit: SLURM sends SIGUSR1 to this script 300 s before the end
#      (--signal=B:USR1@300). We touch RUN_DIR/checkpoint_request; the trainer checkpoints at the
#      next step boundary and exits 42; we `scontrol requeue` the job. The requeued job has the same
#      SLURM_JOB_ID, hence the same RUN_DIR, and the trainer resumes from its latest checkpoint.
#
# Trainer contract relied on (gigatron.core.cli and gigatron.core.train):
#   - `layout` subcommand: exit 0 with one `world_size=N tp=.. cp=.. pp=.. dp=..` line on stdout, or
#     exit 2 with an explanation. Any other exit status is reported as "could not run the trainer".
#   - `train`: resumes from RUN_DIR's latest checkpoint if any; at each step boundary, if
#     RUN_DIR/checkpoint_request exists: checkpoint, delete the file, exit 42. Exit 0 = finished.
#   torchrun reports any failed worker as exit 1, so every rank runs under a small bash shim that
#   records its exit status in RUN_DIR/.exit/attempt-<A>/rank-<RANK> (and its node and the time in
#   .exit/attempt-<A>.hosts/rank-<RANK>); "42 on any rank" means "checkpointed". The shim also prints one line
#   `gigatron-launch: rank R/W local_rank L node N` at the top of each rank's log.
#   5. Failures: cluster/supervisor.py runs the attempts (torchrun here, srun under SLURM). When a
#      rank crashes, hangs (core/heartbeat.py exits 43) or a node is lost, it restarts the job from
#      the latest checkpoint, up to cluster.max_restarts (and cluster.max_restarts_per_hour); under
#      SLURM with cluster.exclude_failed_nodes it requeues the job without the failing node instead.
#      Every cause is in RUN_DIR/supervisor.jsonl; `gigatron status RUN_DIR` lists them.
#
# Where things go:
#   RUN_DIR   = --set run.dir=... if given, else $GIGATRON_RUNS_DIR/<recipe stem>-<id>, where
#               GIGATRON_RUNS_DIR defaults to $GIGATRON_HOME/runs and <id> is the SLURM job id
#               (stable across requeues: a requeued job resumes) or a timestamp outside SLURM.
#               Under SLURM, RUN_DIR must be on a filesystem shared by all nodes.
#   Logs      : RUN_DIR/logs/attempt-<A>/<node>/<torchrun dir>/attempt_0/<local rank>/{stdout,stderr}.log
#               (one file per rank; every line is also teed to the job output prefixed by [rankR]).
#               Job output: <job name>-<job id>.out in the submit directory, appended across requeues.
#               This script's own messages also go to RUN_DIR/launcher.log.
#
# Environment:
#   GIGATRON_HOME            repository root. Default: outside SLURM the folder above this script;
#                            under SLURM (sbatch runs a copy of the script from its spool directory)
#                            the folder above the submitted script, else SLURM_SUBMIT_DIR if it is a
#                            gigatron checkout. Relative recipe paths are tried against the current
#                            directory first, then GIGATRON_HOME.
#   GIGATRON_PYTHON          python with gigatron and torch installed (default: `python` on PATH; the
#                            job inherits the submitting shell's environment, so activate the venv
#                            before sbatch or set this).
#   GIGATRON_PROCS_PER_NODE  processes (ranks) per node. Default: GPUs per node, i.e.
#                            SLURM_GPUS_PER_NODE (the request, "type:N" allowed), else
#                            SLURM_GPUS_ON_NODE; on CPU-only nodes 1 (one process per node, using all
#                            cores as threads). To run several CPU ranks per node, e.g. on the local
#                            test cluster, set it (GIGATRON_PROCS_PER_NODE=2).
#   GIGATRON_RUNS_DIR        parent folder of run directories (default $GIGATRON_HOME/runs).
#   GIGATRON_RDZV_PORT       rendezvous port on the first node (default 20000 + job id % 10000).
#
#SBATCH --job-name=gigatron
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# --ntasks-per-node=1: one torchrun agent per node, which starts the per-GPU workers itself.
# --exclusive --mem=0: the whole node (all cores, all memory) for the job.
# --time: set it to your partition's limit; at the limit the job checkpoints, requeues and resumes.
# --signal=B:USR1@300: SIGUSR1 to this batch script (B:) 300 s before the time limit, enough for a
#   checkpoint of a 405B model to a parallel filesystem; raise it if checkpoints take longer.
# --open-mode=append: a requeued job appends to the same output file instead of truncating it.
set -euo pipefail

LAUNCH_START="$(date +%s.%N)"   # the session's start, for effective training time
LOG_FILE=""   # RUN_DIR/launcher.log once RUN_DIR exists

log() {
    local line
    line="gigatron-launch: $*"
    printf '%s\n' "$line" >&2
    if [[ -n "$LOG_FILE" ]]; then printf '%s %s\n' "$(date '+%F %T')" "$line" >> "$LOG_FILE" || true; fi
}
die() {
    local status="$1"
    shift
    log "error: $*"
    exit "$status"
}

usage() {
    cat >&2 <<'EOF'
usage: cluster/launch.sh [--dry-run] RECIPE [--set key=value ...]
       sbatch [sbatch options] cluster/launch.sh RECIPE [--set key=value ...]
See the comments at the top of cluster/launch.sh for the environment variables it reads.
EOF
}

# --- arguments ----------------------------------------------------------------------------------------

ORIGINAL_ARGS=("$@")   # find_home needs them to read the submitted script's path
DRY_RUN=0
RECIPE_ARG=""
OVERRIDES=()          # "key=value" strings, in order
RUN_DIR_OVERRIDE=""   # value of the last run.dir override, if any
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --set)
            (($# >= 2)) || { usage; die 2 "--set needs a key=value argument"; }
            OVERRIDES+=("$2")
            shift
            ;;
        --set=*) OVERRIDES+=("${1#--set=}") ;;
        -*) usage; die 2 "unknown option '$1'" ;;
        *)
            [[ -z "$RECIPE_ARG" ]] || { usage; die 2 "unexpected argument '$1' (overrides are passed as --set key=value)"; }
            RECIPE_ARG="$1"
            ;;
    esac
    shift
done
[[ -n "$RECIPE_ARG" ]] || { usage; die 2 "missing RECIPE"; }
# run.dir is ours to set: remember the user's value and pass it on last, as an absolute path.
USER_OVERRIDES=()
for kv in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
    [[ "$kv" == *=* ]] || die 2 "override '$kv' is not key=value"
    if [[ "${kv%%=*}" == run.dir ]]; then RUN_DIR_OVERRIDE="${kv#*=}"; else USER_OVERRIDES+=("$kv"); fi
done
SET_ARGS=()
for kv in ${USER_OVERRIDES[@]+"${USER_OVERRIDES[@]}"}; do SET_ARGS+=(--set "$kv"); done

# --- where is the repository ----------------------------------------------------------------------------

is_checkout() { [[ -f "$1/cluster/launch.sh" ]]; }

find_home() {
    local script
    if [[ -n "${GIGATRON_HOME:-}" ]]; then
        printf '%s\n' "$GIGATRON_HOME"
        return
    fi
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
        return
    fi
    # sbatch runs a copy of this script; squeue's %o is the submitted path followed by its arguments.
    script="$(squeue -h -j "$SLURM_JOB_ID" -o %o 2>/dev/null || true)"
    if (($# > 0)); then script="${script%" $*"}"; fi
    if [[ -f "$script" ]] && is_checkout "$(dirname "$script")/.."; then
        (cd "$(dirname "$script")/.." && pwd)
    elif is_checkout "${SLURM_SUBMIT_DIR:-/nonexistent}"; then
        printf '%s\n' "$SLURM_SUBMIT_DIR"
    else
        die 2 "cannot find the gigatron repository: set GIGATRON_HOME=/path/to/gigatron (e.g. sbatch --export=ALL,GIGATRON_HOME=...)"
    fi
}
GIGATRON_HOME="$(find_home ${ORIGINAL_ARGS[@]+"${ORIGINAL_ARGS[@]}"})"
export GIGATRON_HOME

# Recipe: absolute, or relative to the current directory, or relative to the repository.
if [[ "$RECIPE_ARG" == /* ]]; then
    RECIPE="$RECIPE_ARG"
elif [[ -f "$PWD/$RECIPE_ARG" ]]; then
    RECIPE="$PWD/$RECIPE_ARG"
else
    RECIPE="$GIGATRON_HOME/$RECIPE_ARG"
fi
[[ -f "$RECIPE" ]] || die 2 "recipe '$RECIPE_ARG' not found (looked in $PWD and $GIGATRON_HOME)"
RECIPE_STEM="$(basename "$RECIPE")"
RECIPE_STEM="${RECIPE_STEM%.yaml}"
RECIPE_STEM="${RECIPE_STEM%.yml}"
RECIPE_STEM="${RECIPE_STEM//[^A-Za-z0-9._-]/_}"   # run directory names stay shell- and YAML-safe

PYTHON="${GIGATRON_PYTHON:-python}"
command -v "$PYTHON" >/dev/null || die 2 "python '$PYTHON' not found: activate the venv or set GIGATRON_PYTHON"

# `gigatron ...` without relying on the console script being on PATH: same entry point, same python.
gigatron_cli() {
    "$PYTHON" -c 'import sys; sys.argv[0] = "gigatron"; from gigatron.core.cli import main; sys.exit(main())' "$@"
}

# The trainer parses every --set value as YAML: ": " or " #" inside run.dir would not survive.
check_run_dir() {
    if [[ "$RUN_DIR" == *": "* || "$RUN_DIR" == *" #"* || "$RUN_DIR" == *: ]]; then
        die 2 "run directory '$RUN_DIR' contains ': ' or ' #', which a --set value (parsed as YAML) cannot carry: choose another run.dir / GIGATRON_RUNS_DIR"
    fi
}

# --- 1. validate the layout -------------------------------------------------------------------------------

layout_status=0
layout_out="$(gigatron_cli layout "$RECIPE" ${SET_ARGS[@]+"${SET_ARGS[@]}"})" || layout_status=$?
if ((layout_status == 2)); then
    [[ -z "$layout_out" ]] || printf '%s\n' "$layout_out" >&2
    die 2 "invalid layout for recipe $RECIPE_ARG (see above); nothing was started"
elif ((layout_status != 0)); then
    [[ -z "$layout_out" ]] || printf '%s\n' "$layout_out" >&2
    die "$layout_status" "'gigatron layout' failed with exit status $layout_status using $PYTHON: is gigatron installed in it? (activate the venv or set GIGATRON_PYTHON)"
fi
LAYOUT_LINE="$(grep -m1 '^world_size=' <<<"$layout_out" || true)"
[[ -n "$LAYOUT_LINE" ]] || die 2 "'gigatron layout' printed no 'world_size=N ...' line; it printed: $layout_out"
# Parse key=value tokens without eval.
WORLD_SIZE=""
read -r -a layout_tokens <<<"$LAYOUT_LINE"
for token in "${layout_tokens[@]}"; do
    [[ "$token" == world_size=* ]] && WORLD_SIZE="${token#world_size=}"
done
[[ "$WORLD_SIZE" =~ ^[1-9][0-9]*$ ]] || die 2 "bad world_size in layout line '$LAYOUT_LINE'"

# Only set a variable if the user has not: every default below can be overridden from the environment.
default_env() { if [[ -z "${!1+x}" ]]; then export "$1=$2"; fi; }

# NCCL / PyTorch defaults for H100 clusters with InfiniBand/RoCE between nodes.
set_distributed_env() {
    local procs="$1" cpus="$2"
    # Tear the process down on an NCCL error or timeout, so the job fails (and srun's
    # --kill-on-bad-exit stops the other nodes) instead of hanging until the time limit.
    default_env TORCH_NCCL_ASYNC_ERROR_HANDLING 1
    # Free collective buffers when the collective ends instead of through recordStream: lower, more
    # predictable memory with FSDP2 and async TP.
    default_env TORCH_NCCL_AVOID_RECORD_STREAMS 1
    # 32 CUDA hardware queues (the most; CUDA's default is 8). FSDP2 issues its all-gathers and
    # reduce-scatters on their own streams to overlap them with the compute stream; with 1 queue
    # (Megatron's setting, which orders its hand-scheduled TP communication before compute) every
    # stream's kernels are serialised and that overlap is lost. Our TP collectives (DTensor) run
    # synchronously on the compute stream and need no issue-order guarantee.
    default_env CUDA_DEVICE_MAX_CONNECTIONS 32
    # NCCL flight recorder: keep the last 20000 collectives per rank and dump them to
    # RUN_DIR/nccl_trace/rank_<R> on a timeout, to find the rank that hung. (torch < 2.8 names the
    # first and last TORCH_NCCL_TRACE_BUFFER_SIZE and TORCH_NCCL_DEBUG_INFO_TEMP_FILE; newer torch
    # warns about those names on every rank, so we set only the new ones.)
    default_env TORCH_FR_BUFFER_SIZE 20000
    default_env TORCH_NCCL_DUMP_ON_TIMEOUT 1
    default_env TORCH_FR_DUMP_TEMP_FILE "$RUN_DIR/nccl_trace/rank_"
    mkdir -p "$RUN_DIR/nccl_trace"
    # Print NCCL warnings (not the INFO flood); set NCCL_DEBUG=INFO to see the topology NCCL picked.
    default_env NCCL_DEBUG WARN
    # InfiniBand: wait longer before declaring a lost packet a failure (4.096 us * 2^22 ~ 17 s instead
    # of ~4 s), which large all-to-all/all-gather bursts on a congested fabric need. NCCL picks HCAs
    # and interfaces itself; pin them per site with NCCL_IB_HCA / NCCL_SOCKET_IFNAME if needed.
    default_env NCCL_IB_TIMEOUT 22
    # Python tracebacks on a crash (SIGSEGV, SIGABRT) of any rank.
    default_env PYTHONFAULTHANDLER 1
    # torchrun would force 1 thread per worker: give each its share of the node's cores instead
    # (these threads serve the CPU side: data loading, optimizer on CPU tensors, gloo).
    default_env OMP_NUM_THREADS "$(((cpus / procs) > 0 ? cpus / procs : 1))"
    # Prefix every teed line with the global rank (torchrun substitutes ${rank} itself).
    # shellcheck disable=SC2016
    default_env TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE '[rank${rank}]: '
}

# Per-rank shim run by torchrun (with --no-python): records the trainer's exit status, which
# torchrun itself collapses into "1", and labels the rank's log. Single quotes: it expands per rank.
# shellcheck disable=SC2016
RANK_SHIM='printf "gigatron-launch: rank %s/%s local_rank %s node %s\n" "$RANK" "$WORLD_SIZE" "$LOCAL_RANK" "${SLURMD_NODENAME:-$(hostname)}"
"$@"
status=$?
printf "%s %s\n" "${SLURMD_NODENAME:-$(hostname)}" "$(date +%s.%N)" > "$GIGATRON_EXIT_DIR.hosts/rank-$RANK"
printf "%s\n" "$status" > "$GIGATRON_EXIT_DIR/rank-$RANK"
exit "$status"'

# The supervisor (cluster/supervisor.py) runs the attempts: it restarts a failed job from its latest
# checkpoint within cluster.max_restarts, records each cause in RUN_DIR/supervisor.jsonl, and exits
# 0 finished, 42 checkpointed on request, 75 requeue without RUN_DIR/exclude_nodes, 1 budget spent.
supervisor_cmd() {
    SUPERVISOR=("$PYTHON" -m gigatron.cluster.supervisor "$RECIPE" ${SET_ARGS[@]+"${SET_ARGS[@]}"}
        --run-dir "$RUN_DIR" --session "$1" --started-at "$LAUNCH_START" --world-size "$WORLD_SIZE")
}

# ==================================================================================================
# Outside SLURM: torchrun --standalone on this machine.
# ==================================================================================================
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    if [[ -n "$RUN_DIR_OVERRIDE" ]]; then
        RUN_DIR="$RUN_DIR_OVERRIDE"
    else
        RUN_DIR="${GIGATRON_RUNS_DIR:-$GIGATRON_HOME/runs}/$RECIPE_STEM-$(date +%Y%m%d-%H%M%S)"
    fi
    [[ "$RUN_DIR" == /* ]] || RUN_DIR="$PWD/$RUN_DIR"
    check_run_dir
    # A machine with GPUs cannot run more ranks than it has GPUs.
    if command -v nvidia-smi >/dev/null; then
        gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
        if ((gpus > 0 && WORLD_SIZE > gpus)); then
            die 2 "recipe $RECIPE_ARG needs world_size=$WORLD_SIZE ($LAYOUT_LINE) but this machine has $gpus GPUs: submit it with sbatch or lower the recipe's parallel degrees"
        fi
    fi
    torchrun_cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$WORLD_SIZE"
        --max-restarts=0 --log-dir="$RUN_DIR/logs/local" --redirects=3 --tee=3
        --no-python bash -c "$RANK_SHIM" gigatron-rank
        "$PYTHON" -m gigatron.core.train "$RECIPE" ${SET_ARGS[@]+"${SET_ARGS[@]}"} --set "run.dir=$RUN_DIR")
    if ((DRY_RUN)); then
        printf 'layout: %s\nrun dir: %s\ncommand:' "$LAYOUT_LINE" "$RUN_DIR"
        printf ' %q' "${torchrun_cmd[@]}"
        printf '\n'
        exit 0
    fi
    mkdir -p "$RUN_DIR"
    LOG_FILE="$RUN_DIR/launcher.log"
    set_distributed_env "$WORLD_SIZE" "$(nproc)"
    log "recipe $RECIPE, $LAYOUT_LINE, run dir $RUN_DIR"
    # Foreground, so Ctrl-C reaches torchrun (and the supervisor, which then stops restarting).
    supervisor_cmd "local-$(date +%Y%m%d-%H%M%S)-$$"
    status=0
    "${SUPERVISOR[@]}" -- "${torchrun_cmd[@]}" || status=$?
    case "$status" in
        0) log "training finished" ;;
        42) log "trainer checkpointed on request (exit 42); rerun with --set run.dir=$RUN_DIR to resume" ;;
        *) log "training failed (exit $status; causes and restarts: gigatron status $RUN_DIR)" ;;
    esac
    exit "$status"
fi

# ==================================================================================================
# Under SLURM: one torchrun per node.
# ==================================================================================================
JOB_KEY="$SLURM_JOB_ID"
if [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then JOB_KEY="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; fi
RESTART="${SLURM_RESTART_COUNT:-0}"
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"

# Processes per node: explicit > GPUs requested per node > GPUs on this node > 1 (CPU-only node).
gpu_count() { local v="${1##*:}"; [[ "$v" =~ ^[0-9]+$ ]] && printf '%s' "$v"; }
if [[ -n "${GIGATRON_PROCS_PER_NODE:-}" ]]; then
    PROCS="$GIGATRON_PROCS_PER_NODE"
    procs_from="GIGATRON_PROCS_PER_NODE"
elif [[ -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
    PROCS="$(gpu_count "$SLURM_GPUS_PER_NODE" || true)"
    procs_from="--gpus-per-node (SLURM_GPUS_PER_NODE=$SLURM_GPUS_PER_NODE)"
elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    PROCS="$SLURM_GPUS_ON_NODE"
    procs_from="GPUs on the node (SLURM_GPUS_ON_NODE)"
else
    PROCS=1
    procs_from="no GPUs: one process per node"
fi
[[ "${PROCS:-0}" =~ ^[0-9]+$ ]] || die 2 "cannot read processes per node from $procs_from"
if ((PROCS == 0)); then PROCS=1; procs_from="$procs_from; 0 GPUs: one process per node"; fi

if ((NNODES * PROCS != WORLD_SIZE)); then
    fix="change the recipe's parallel degrees (tp*cp*pp*dp) to multiply to $((NNODES * PROCS))"
    if ((WORLD_SIZE % PROCS == 0)); then
        fix="submit with --nodes=$((WORLD_SIZE / PROCS)) (sbatch --nodes=$((WORLD_SIZE / PROCS)) cluster/launch.sh $RECIPE_ARG ...), or $fix"
    else
        fix="$fix, or use a number of processes per node that divides $WORLD_SIZE (--gpus-per-node / GIGATRON_PROCS_PER_NODE)"
    fi
    die 2 "layout mismatch: recipe $RECIPE_ARG needs world_size=$WORLD_SIZE ($LAYOUT_LINE), but job $SLURM_JOB_ID has $NNODES node(s) x $PROCS process(es) per node [$procs_from] = $((NNODES * PROCS)). Fix: $fix. Nothing was started."
fi

if [[ -n "$RUN_DIR_OVERRIDE" ]]; then
    RUN_DIR="$RUN_DIR_OVERRIDE"
else
    RUN_DIR="${GIGATRON_RUNS_DIR:-$GIGATRON_HOME/runs}/$RECIPE_STEM-$JOB_KEY"
fi
[[ "$RUN_DIR" == /* ]] || RUN_DIR="$PWD/$RUN_DIR"
check_run_dir

# Rendezvous on the first node of the allocation, at the address SLURM itself uses to reach it
# (NodeAddr): the node name need not resolve, and `hostname` need not equal the node name.
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE="${HOSTS[0]}"
HEAD_ADDR="$(scontrol show node "$HEAD_NODE" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n1 | cut -d= -f2 || true)"
if [[ -z "$HEAD_ADDR" ]]; then
    HEAD_ADDR="$(getent ahostsv4 "$HEAD_NODE" | awk 'NR == 1 {print $1}' || true)"
fi
HEAD_ADDR="${HEAD_ADDR:-$HEAD_NODE}"
RDZV_PORT="${GIGATRON_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"

LOGS="$RUN_DIR/logs"   # logs/attempt-<A>/: the supervisor sets GIGATRON_LOG_DIR per attempt
# Static rendezvous with --node-rank=SLURM_NODEID (added per node below): node k of the allocation
# holds global ranks k*PROCS .. k*PROCS+PROCS-1, so tensor-parallel groups (innermost) stay inside a
# node, rank 0 runs on the batch node, and a requeued job gets the same placement. (c10d rendezvous
# numbers nodes by arrival instead; on the local test cluster a run whose rank 0 landed on the second
# node drifted from the others in the 7th digit from step 2 on, breaking bitwise reproducibility.)
torchrun_args=(--nnodes="$NNODES" --nproc-per-node="$PROCS"
    --master-addr="$HEAD_ADDR" --master-port="$RDZV_PORT" --rdzv-id="$JOB_KEY"
    --max-restarts=0 --redirects=3 --tee=3
    --no-python bash -c "$RANK_SHIM" gigatron-rank
    "$PYTHON" -m gigatron.core.train "$RECIPE" ${SET_ARGS[@]+"${SET_ARGS[@]}"} --set "run.dir=$RUN_DIR")
# The node-level command adds what is only known inside the task: the node's rank and name.
# shellcheck disable=SC2016
NODE_CMD='py="$1"; shift; exec "$py" -m torch.distributed.run --node-rank="$SLURM_NODEID" --log-dir="$GIGATRON_LOG_DIR/$SLURMD_NODENAME" "$@"'
# --cpus-per-task: the node's torchrun and all its workers may use every core of the node (by
# default a step task gets one CPU, and with task/affinity all ranks would share it).
srun_cmd=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
    ${SLURM_CPUS_ON_NODE:+--cpus-per-task="$SLURM_CPUS_ON_NODE"}
    bash -c "$NODE_CMD" gigatron-node "$PYTHON" "${torchrun_args[@]}")

if ((DRY_RUN)); then
    printf 'layout: %s\nnodes: %s x %s processes\nrun dir: %s\ncommand:' "$LAYOUT_LINE" "$NNODES" "$PROCS" "$RUN_DIR"
    printf ' %q' "${srun_cmd[@]}"
    printf '\n'
    exit 0
fi

mkdir -p "$RUN_DIR" "$LOGS"
LOG_FILE="$RUN_DIR/launcher.log"
set_distributed_env "$PROCS" "${SLURM_CPUS_ON_NODE:-$(nproc)}"
REQUEST="$RUN_DIR/checkpoint_request"
if [[ -e "$REQUEST" ]]; then
    log "removing a stale $REQUEST left by an earlier attempt"
    rm -f "$REQUEST"
fi
log "job $SLURM_JOB_ID restart $RESTART (SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}) on ${HOSTS[*]}"
log "recipe $RECIPE: $LAYOUT_LINE = $NNODES node(s) x $PROCS process(es) [$procs_from]"
log "run dir $RUN_DIR; rendezvous $HEAD_ADDR:$RDZV_PORT ($HEAD_NODE); logs $LOGS"

# Preemption: SIGUSR1 (--signal=B:USR1@N, or `scancel --signal=USR1 --batch`) and SIGTERM ask the
# trainer to checkpoint at its next step boundary. srun runs in the background and we `wait`, so the
# trap runs as soon as the signal arrives instead of after srun returns.
SIGNALLED=""
INTERRUPTED=0
# shellcheck disable=SC2317  # called from the traps below
on_signal() {
    INTERRUPTED=1
    SIGNALLED="$1"
    log "received SIG$1: requesting a checkpoint ($REQUEST)"
    touch "$REQUEST" || log "warning: could not create $REQUEST"
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

supervisor_cmd "slurm-$JOB_KEY"
"${SUPERVISOR[@]}" --slurm --hosts "${HOSTS[*]}" --procs-per-node "$PROCS" -- "${srun_cmd[@]}" &
SRUN_PID=$!
while :; do
    INTERRUPTED=0
    status=0
    wait "$SRUN_PID" || status=$?
    # A trapped signal interrupts `wait` (status > 128) while srun keeps running: wait again.
    if ((INTERRUPTED && status > 128)); then
        if kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
        again=0
        wait "$SRUN_PID" 2>/dev/null || again=$?
        ((again == 127)) || status=$again
    fi
    break
done
# From here on, signals (including the SIGTERM that `scontrol requeue` sends us) are not requests.
trap '' USR1 TERM

if ((status == 0)); then
    log "training finished"
    rm -f "$REQUEST"
    exit 0
fi
if ((status == 42)) || [[ -n "$SIGNALLED" ]]; then
    if ((status == 42)); then
        log "trainer checkpointed (exit 42); requeueing job $SLURM_JOB_ID"
    else
        log "got SIG$SIGNALLED but the trainer did not confirm a checkpoint (status $status); requeueing to resume from the latest checkpoint"
    fi
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    # SIGTERM usually means SLURM is ending the job (scancel, time limit, node failure): a cancelled
    # job cannot be requeued, and that is intended.
    resume="resume with: sbatch cluster/launch.sh $RECIPE_ARG --set run.dir=$RUN_DIR"
    [[ "$SIGNALLED" == TERM ]] && die 143 "job $SLURM_JOB_ID is ending (SIGTERM) and was not requeued; $resume"
    die 42 "scontrol requeue failed (was the job submitted with --no-requeue?); $resume"
fi
if ((status == 75)) && [[ -s "$RUN_DIR/exclude_nodes" ]]; then
    excluded="$(tr -d '[:space:]' < "$RUN_DIR/exclude_nodes")"
    # A running job's ExcNodeList cannot change: hold it pending, exclude, release.
    if scontrol requeuehold "$SLURM_JOB_ID" && scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="$excluded" \
        && scontrol release "$SLURM_JOB_ID"; then
        log "requeued job $SLURM_JOB_ID without node(s) $excluded (recorded in $RUN_DIR/supervisor.jsonl)"
        exit 0
    fi
    scontrol release "$SLURM_JOB_ID" 2>/dev/null || true
    die 1 "could not requeue job $SLURM_JOB_ID without $excluded; resume with: sbatch --exclude=$excluded cluster/launch.sh $RECIPE_ARG --set run.dir=$RUN_DIR"
fi
die "$status" "training failed (exit $status; causes and restarts: gigatron status $RUN_DIR); logs in $LOGS"
