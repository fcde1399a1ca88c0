#!/usr/bin/env bash
# A real three-node SLURM cluster on this one machine, for tests and for trying cluster/launch.sh.
#
#   cluster/local_slurm.sh start    # install (first time), configure, start, wait for 3 idle nodes
#   cluster/local_slurm.sh status   # daemons and sinfo
#   cluster/local_slurm.sh stop     # cancel jobs, stop every daemon by its PID file
#
# After `start`, point the SLURM clients at the cluster with the line it prints:
#   export SLURM_CONF=/tmp/gigatron-slurm/slurm.conf
#
# What it builds (comments next to the settings below say which trap each one avoids):
#   - Debian's SLURM 22.05 (slurmctld, slurmd, slurm-client) and munge, installed with apt when missing.
#   - One controller and three emulated nodes n1, n2, n3 (a 2-node job has a spare to move to when a
#     node is excluded). Every slurmd runs here (`slurmd -N n1`, `-N n2`, `-N n3`),
#     reached at 127.0.0.1 on distinct ports. `hostname` inside a job still prints this machine's
#     name; SLURMD_NODENAME is the node.
#   - Each node claims 2 CPUs (more tasks than real cores work thanks to config_overrides) and 8 fake
#     GPUs (gres "gpu", backed by character devices cloned from /dev/null), so a job script written
#     for an 8-GPU H100 node (`--gpus-per-node=8 --exclusive`) is accepted unchanged. Nothing can
#     run on those "GPUs"; CPU code ignores the CUDA_VISIBLE_DEVICES that SLURM sets.
#   - Tuned for fast tests: MinJobAge=4 (sbatch --wait polls every 2 s and still sees the exit
#     code), AuthInfo=cred_expire=10 (a requeued job restarts after ~12-25 s instead of ~120 s),
#     KillWait=5.
#
# Requires root (daemons run as root, munged as user munge). Idempotent: `start` on a running
# cluster does nothing; `stop` on a stopped one does nothing.
#
# Environment:
#   GIGATRON_SLURM_DIR        state, logs, PID files and slurm.conf   (default /tmp/gigatron-slurm)
#   GIGATRON_SLURM_CTLD_PORT  slurmctld port                           (default 6817)
#   GIGATRON_SLURM_NODE_PORT  first slurmd port; n2, n3 use the next ones (default 17001)
#   GIGATRON_SLURM_TIMEOUT    seconds to wait for the nodes to be idle (default 30)
set -euo pipefail

SLURM_DIR="${GIGATRON_SLURM_DIR:-/tmp/gigatron-slurm}"
CTLD_PORT="${GIGATRON_SLURM_CTLD_PORT:-6817}"
NODE_PORT="${GIGATRON_SLURM_NODE_PORT:-17001}"
TIMEOUT="${GIGATRON_SLURM_TIMEOUT:-30}"

CONF="$SLURM_DIR/slurm.conf"
PID_DIR="$SLURM_DIR/run"
LOG_DIR="$SLURM_DIR/log"
NODES=(n1 n2 n3)
GPUS_PER_NODE=8
PACKAGES=(slurmctld slurmd slurm-client munge)
MUNGE_RUN=/run/munge
MUNGE_PID_FILE="$MUNGE_RUN/munged.pid"
# munged writes its own PID file under /run/munge; we copy the PID here only when WE started it,
# so `stop` never kills a munged that was already running for someone else.
OWN_MUNGE_PID_FILE="$PID_DIR/munged.pid"

export SLURM_CONF="$CONF"

log() { printf 'local_slurm: %s\n' "$*" >&2; }
die() { printf 'local_slurm: error: %s\n' "$*" >&2; exit 1; }

# --- PID file helpers -----------------------------------------------------------------------------

# Print the PID stored in file $1 if that process is alive AND runs the program the file is named
# after (slurmd-n1.pid -> slurmd), so a stale file whose PID was reused never points at a stranger.
# Debian installs the daemons as e.g. /usr/sbin/slurmd -> slurmd-wlm: compare resolved paths.
live_pid() {
    local pid program
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc '0-9' < "$1")"
    program="$(basename "$1" .pid)"
    program="$(command -v "${program%%-*}")" || return 1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == "$(readlink -f "$program")" ]] || return 1
    printf '%s\n' "$pid"
}

# Wait up to $1 seconds (in 0.1 s steps) for the command "${@:2}" to succeed.
wait_for() {
    local seconds="$1" i
    shift
    for ((i = 0; i < seconds * 10; i++)); do
        if "$@"; then return 0; fi
        sleep 0.1
    done
    return 1
}

pid_gone() { ! kill -0 "$1" 2>/dev/null; }
no_jobs() { [[ -z "$(squeue -h -o %i 2>/dev/null)" ]]; }

# Stop the daemon whose PID is in file $1: SIGTERM, wait up to 10 s, then SIGKILL.
stop_pid_file() {
    local file="$1" pid i
    if ! pid="$(live_pid "$file")"; then
        rm -f "$file"
        return 0
    fi
    log "stopping $(basename "$file" .pid) (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$(basename "$file" .pid) ignored SIGTERM for 10 s: sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_for 5 pid_gone "$pid" || die "pid $pid survived SIGKILL"
    fi
    rm -f "$file"
}

# --- start ----------------------------------------------------------------------------------------

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    # A fresh machine has empty package lists: run `apt-get update` only when the install needs it.
    # policy-rc.d-less containers print "could not start service" warnings here; they are harmless.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >"$LOG_DIR/apt.log" 2>&1; then
        log "package lists missing or stale: running apt-get update, then installing again"
        apt-get update -qq >>"$LOG_DIR/apt.log" 2>&1 || die "apt-get update failed, see $LOG_DIR/apt.log"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            >>"$LOG_DIR/apt.log" 2>&1 || die "apt-get install ${missing[*]} failed, see $LOG_DIR/apt.log"
    fi
}

# The nodes must resolve (SLURM itself uses NodeAddr, but tools and users may ssh/ping by name).
ensure_hosts() {
    local node missing=()
    for node in "${NODES[@]}"; do getent hosts "$node" >/dev/null || missing+=("$node"); done
    ((${#missing[@]} > 0)) || return 0
    if [[ -w /etc/hosts ]]; then
        log "adding '127.0.0.1 ${missing[*]}' to /etc/hosts"
        printf '127.0.0.1 %s\n' "${missing[*]}" >> /etc/hosts
    else
        log "warning: /etc/hosts is read-only; ${missing[*]} will not resolve by name (SLURM still works)"
    fi
}

# Fake GPUs: gres.conf File= must name character devices (plain files are refused).
make_fake_gpus() {
    local i dev
    mkdir -p "$SLURM_DIR/dev"
    for ((i = 0; i < GPUS_PER_NODE; i++)); do
        dev="$SLURM_DIR/dev/gpu$i"
        [[ -c "$dev" ]] || { rm -f "$dev"; mknod "$dev" c 1 3; }
    done
}

write_config() {
    local host tmp
    host="$(hostname -s)"
    tmp="$CONF.tmp"
    # SlurmctldHost must be this machine's short name, or slurmctld refuses to start.
    cat > "$tmp" <<EOF
# Written by cluster/local_slurm.sh: three emulated nodes on one machine. Do not edit; rerun start.
ClusterName=gigatron
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# Credentials expire after 10 s instead of 120 s: a requeued job can restart ~12 s after it ended.
AuthInfo=cred_expire=10
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool/%n
SlurmctldPidFile=$PID_DIR/slurmctld.pid
SlurmdPidFile=$PID_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MailProg=/bin/true
# Finished jobs stay listed 4 s. \`sbatch --wait\` polls every 2 s while MinJobAge < 5 (above that it
# backs off to 8 s and more) and reads the exit code from that listing: a job purged before the next
# poll makes sbatch print "no longer found and exit code not found" and exit 0, whatever the job did.
MinJobAge=4
JobRequeue=1
# Seconds between SIGTERM and SIGKILL when a job is cancelled or times out (default 30).
KillWait=5
# Trust the node lines below over the hardware slurmd detects (2 real cores run 4+ tasks).
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=n[1-${#NODES[@]}] NodeHostname=$host NodeAddr=127.0.0.1 Port=$NODE_PORT-$((NODE_PORT + ${#NODES[@]} - 1)) CPUs=2 Gres=gpu:$GPUS_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=n[1-${#NODES[@]}] Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$tmp" "$CONF"
    printf 'Name=gpu File=%s/dev/gpu[0-%d]\n' "$SLURM_DIR" "$((GPUS_PER_NODE - 1))" > "$SLURM_DIR/gres.conf"
}

start_munge() {
    if live_pid "$MUNGE_PID_FILE" >/dev/null; then
        # Already running: ours (PID recorded) or someone else's, which we use but never stop.
        live_pid "$OWN_MUNGE_PID_FILE" >/dev/null || log "using the munged that is already running"
        return 0
    fi
    [[ -s /etc/munge/munge.key ]] || { log "creating /etc/munge/munge.key"; runuser -u munge -- mungekey --create; }
    install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 live_pid "$MUNGE_PID_FILE" >/dev/null || die "munged did not start, see /var/log/munge/munged.log"
    live_pid "$MUNGE_PID_FILE" > "$OWN_MUNGE_PID_FILE"
}

start_slurmctld() {
    live_pid "$PID_DIR/slurmctld.pid" >/dev/null && return 0
    # No -c (clear state): job ids keep counting across restarts, so a new job never reuses the id,
    # and with it the run folder (runs/<recipe>-<job id>), of an earlier one. `stop` cancels every
    # job first, so there is nothing to resurrect.
    slurmctld -f "$CONF"
    wait_for 10 live_pid "$PID_DIR/slurmctld.pid" >/dev/null \
        || die "slurmctld did not start, see $LOG_DIR/slurmctld.log"
}

start_slurmd() {
    local node="$1"
    live_pid "$PID_DIR/slurmd-$node.pid" >/dev/null && return 0
    slurmd -f "$CONF" -N "$node"
    wait_for 10 live_pid "$PID_DIR/slurmd-$node.pid" >/dev/null \
        || die "slurmd -N $node did not start, see $LOG_DIR/slurmd-$node.log"
}

# True when every node is idle (or already running something: mixed/allocated after a restart).
nodes_ready() {
    local states
    states="$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)" || return 1
    [[ "$(grep -cE '^n[0-9]+ (idle|mix|alloc)$' <<<"$states")" -eq ${#NODES[@]} ]]
}

all_running() {
    local node
    live_pid "$MUNGE_PID_FILE" >/dev/null || return 1
    live_pid "$PID_DIR/slurmctld.pid" >/dev/null || return 1
    for node in "${NODES[@]}"; do live_pid "$PID_DIR/slurmd-$node.pid" >/dev/null || return 1; done
    [[ -f "$CONF" ]]
}

cmd_start() {
    local t0=$SECONDS node
    [[ $EUID -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"
    if all_running && nodes_ready; then
        log "already running"
        printf 'export SLURM_CONF=%q\n' "$CONF"
        return 0
    fi
    mkdir -p "$SLURM_DIR/state" "$PID_DIR" "$LOG_DIR" "${NODES[@]/#/$SLURM_DIR/spool/}"
    install_packages
    ensure_hosts
    make_fake_gpus
    # Rewrite the config only while slurmctld is down: a running controller keeps the file it read.
    live_pid "$PID_DIR/slurmctld.pid" >/dev/null || write_config
    start_munge
    start_slurmctld
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
    if ! wait_for "$TIMEOUT" nodes_ready; then
        sinfo -N >&2 || true
        tail -n 5 "$LOG_DIR"/*.log >&2 || true
        die "nodes not idle after ${TIMEOUT}s (see sinfo and logs above, under $LOG_DIR)"
    fi
    log "${#NODES[@]} nodes idle after $((SECONDS - t0)) s; state in $SLURM_DIR"
    printf 'export SLURM_CONF=%q\n' "$CONF"
}

# --- stop -----------------------------------------------------------------------------------------

cmd_stop() {
    local node jobs=()
    # Cancel jobs first: their slurmstepd processes are not children of slurmd and would outlive it.
    if live_pid "$PID_DIR/slurmctld.pid" >/dev/null; then
        mapfile -t jobs < <(squeue -h -o %i 2>/dev/null || true)
        if ((${#jobs[@]} > 0)); then
            log "cancelling jobs: ${jobs[*]}"
            scancel --full "${jobs[@]}" 2>/dev/null || true
            # KillWait=5 bounds the time from SIGTERM to SIGKILL.
            wait_for 20 no_jobs || log "warning: jobs still listed after 20 s: $(squeue -h -o %i | tr '\n' ' ')"
        fi
    fi
    for node in "${NODES[@]}"; do stop_pid_file "$PID_DIR/slurmd-$node.pid"; done
    stop_pid_file "$PID_DIR/slurmctld.pid"
    if live_pid "$OWN_MUNGE_PID_FILE" >/dev/null; then
        stop_pid_file "$OWN_MUNGE_PID_FILE"
        rm -f "$MUNGE_PID_FILE"
    fi
    log "stopped"
}

# --- status ---------------------------------------------------------------------------------------

cmd_status() {
    local name file pid rc=0
    for name in munged slurmctld "${NODES[@]/#/slurmd-}"; do
        file="$PID_DIR/$name.pid"
        [[ $name == munged ]] && file="$MUNGE_PID_FILE"
        if pid="$(live_pid "$file")"; then
            printf '%-12s running (pid %s)\n' "$name" "$pid"
        else
            printf '%-12s stopped\n' "$name"
            rc=3
        fi
    done
    if live_pid "$PID_DIR/slurmctld.pid" >/dev/null; then
        sinfo -N || rc=3
    fi
    printf 'export SLURM_CONF=%q\n' "$CONF"
    return "$rc"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) printf 'usage: %s start|stop|status\n' "$0" >&2; exit 2 ;;
esac
