#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on this machine, for the SLURM executor test
# (tests/test_slurm.py) and for trying profiles/slurm by hand.  Debian/Ubuntu only; run as root.
#
#   .ci/slurm.sh start    install slurm-wlm + munge if missing, write /etc/slurm/slurm.conf,
#                         start munged, slurmctld and slurmd (on 127.0.0.1: see loopback_host),
#                         wait for the node to be idle
#   .ci/slurm.sh stop     cancel leftover jobs, stop the three daemons by the ids in their
#                         pid files and wait for them to exit
#   .ci/slurm.sh status   show the daemons and `sinfo`
#
# State, logs, the munge key/socket and pid files live in $SLURM_STATE_DIR (default
# /tmp/diffim-slurm).  The config must sit at the compiled-in path /etc/slurm/slurm.conf:
# snakemake-executor-plugin-slurm-jobstep drops SLURM_CONF before its inner `srun`, so a
# config elsewhere is not found inside jobs.  No slurmdbd: `sacct` does not work, so profiles
# must use `slurm-status-command: squeue`; MinJobAge=600 keeps finished jobs visible to squeue.
# Both commands are idempotent.
set -euo pipefail

STATE="${SLURM_STATE_DIR:-/tmp/diffim-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# Written by diffim .ci/slurm.sh"
CTLD_PORT="${SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${SLURM_SLURMD_PORT:-16818}"
PARTITION=debug
TIMEOUT="${SLURM_START_TIMEOUT:-90}"
MUNGE_SOCKET="$STATE/munge/munge.socket"
# Debian installs the daemons under /usr/sbin, which a non-login root shell may lack.
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "== slurm: $*"; }
die() { echo "== slurm: ERROR: $*" >&2; exit 1; }

# The pid recorded in $1 if that process is alive and its command name is one of $2..
live_pid() {
    local file="$1"; shift
    [[ -s "$file" ]] || return 1
    local pid comm name
    pid="$(tr -dc '0-9' < "$file")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    for name in "$@"; do
        if [[ "$comm" == "$name" ]]; then echo "$pid"; return 0; fi
    done
    return 1
}

# First of the given command names found on PATH.
find_cmd() {
    local c
    for c in "$@"; do
        if command -v "$c" >/dev/null 2>&1; then command -v "$c"; return 0; fi
    done
    return 1
}

need_root() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (try: sudo $0 $*)"
}

install_packages() {
    if find_cmd sbatch >/dev/null && find_cmd slurmctld slurmctld-wlm >/dev/null \
        && find_cmd slurmd slurmd-wlm >/dev/null && find_cmd munged >/dev/null; then
        say "slurm-wlm and munge already installed"
        return 0
    fi
    command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and apt-get is not available"
    local policy_out
    policy_out="$(apt-cache policy slurm-wlm munge 2>/dev/null || true)"
    if [[ "$(grep -c 'Candidate: [0-9]' <<< "$policy_out")" != 2 ]]; then
        say "apt-get update"
        apt-get update -qq
    fi
    # Keep the packages' maintainer scripts from starting system-wide munge/slurm services
    # (standard Debian policy-rc.d mechanism; only when the machine has none already).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    say "apt-get install slurm-wlm munge"
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge > "${TMPDIR:-/tmp}/diffim-slurm-apt.log" 2>&1 || rc=$?
    if (( made_policy )); then rm -f "$policy"; trap - EXIT; fi
    if (( rc != 0 )); then
        tail -n 30 "${TMPDIR:-/tmp}/diffim-slurm-apt.log" >&2
        die "apt-get install slurm-wlm munge failed (exit $rc)"
    fi
}

# Whether `hostname -s` resolves to a loopback address.  With
# CommunicationParameters=NoInAddrAny,NoCtldInAddrAny slurmd and slurmctld listen only on the
# address the machine's host name resolves to (not NodeAddr): 127.0.0.1 on machines whose
# /etc/hosts maps the host name there.  Elsewhere (CI runners whose name resolves to the LAN
# address, or not at all) they must listen on all interfaces; clients still use 127.0.0.1.
loopback_host() {
    local addr
    addr="$(getent ahostsv4 "$(hostname -s)" 2>/dev/null | awk 'NR == 1 {print $1}' || true)"
    [[ "$addr" == 127.* ]]
}

write_conf() {
    local host cpus mem_kb mem_mb comm
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem_kb="$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)"
    # Leave 20 % (at least 512 MB) of the available memory to the system.
    mem_mb=$(( mem_kb / 1024 ))
    mem_mb=$(( mem_mb - (mem_mb / 5 > 512 ? mem_mb / 5 : 512) ))
    (( mem_mb >= 512 )) || die "only $((mem_kb / 1024)) MB of memory available"
    if loopback_host; then
        comm="CommunicationParameters=NoInAddrAny,NoCtldInAddrAny"
    else
        comm="# (no CommunicationParameters: $host does not resolve to 127.0.0.1, listen on all)"
        say "note: $host does not resolve to a loopback address; daemons listen on all interfaces"
    fi
    if [[ -e "$CONF" ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away first"
    fi
    mkdir -p "$(dirname "$CONF")"
    cat > "$CONF" <<EOF
$MARK for a throw-away single-node test cluster.
# State and logs: $STATE.  Remove this file when done (.ci/slurm.sh leaves it in place).
ClusterName=diffimci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# Listen only on the address the host name resolves to (127.0.0.1 where /etc/hosts says so).
$comm
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    say "wrote $CONF (node $host, $cpus CPUs, $mem_mb MB)"
}

start_munge() {
    if live_pid "$STATE/munged.pid" munged >/dev/null; then return 0; fi
    local key="$STATE/munge/munge.key"
    mkdir -p "$STATE/munge"
    # Clients of other users (CI run through sudo) need the socket; the key stays 0600.
    chmod 755 "$STATE" "$STATE/munge"
    if [[ ! -s "$key" ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$key"
        else
            dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        fi
        chmod 600 "$key"
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # --force: the state dir may sit under a world-writable /tmp.
    munged --force --socket="$MUNGE_SOCKET" --key-file="$key" \
        --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munge.seed"
    local i
    for i in $(seq 50); do
        if munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
            say "munged running (pid $(cat "$STATE/munged.pid"))"
            return 0
        fi
        sleep 0.2
    done
    tail -n 20 "$STATE/log/munged.log" >&2 || true
    die "munged did not come up (log: $STATE/log/munged.log)"
}

node_state() {
    sinfo -h -N -o '%t' 2>/dev/null | head -n 1 || true
}

cmd_start() {
    need_root start
    install_packages
    local ctld slurmd
    ctld="$(find_cmd slurmctld slurmctld-wlm)" || die "slurmctld not found after install"
    slurmd="$(find_cmd slurmd slurmd-wlm)" || die "slurmd not found after install"

    if live_pid "$STATE/munged.pid" munged >/dev/null \
        && live_pid "$STATE/slurmctld.pid" slurmctld slurmctld-wlm >/dev/null \
        && live_pid "$STATE/slurmd.pid" slurmd slurmd-wlm >/dev/null \
        && [[ "$(node_state)" == idle || "$(node_state)" == mix || "$(node_state)" == alloc ]]; then
        say "already running: $(sinfo -h -o '%P %a %D %t %N')"
        return 0
    fi
    # Partly running (or stale pid files): start from scratch.
    cmd_stop quiet

    mkdir -p "$STATE/log" "$STATE/ctld" "$STATE/spool"
    write_conf
    start_munge

    local stepd=()
    if ! command -v slurmstepd >/dev/null && command -v slurmstepd-wlm >/dev/null; then
        stepd=(-d "$(command -v slurmstepd-wlm)")
    fi
    # -c: forget jobs of an earlier run.  Both daemonize and write their pid files.
    if ! "$ctld" -c -f "$CONF"; then
        tail -n 20 "$STATE/log/slurmctld.log" >&2 || true
        die "slurmctld did not start (log: $STATE/log/slurmctld.log)"
    fi
    if ! "$slurmd" -f "$CONF" -N "$(hostname -s)" "${stepd[@]}"; then
        tail -n 20 "$STATE/log/slurmd.log" >&2 || true
        die "slurmd did not start (log: $STATE/log/slurmd.log)"
    fi

    local t=0 st=""
    while (( t < TIMEOUT * 2 )); do
        st="$(node_state)"
        if [[ "$st" == idle ]]; then break; fi
        sleep 0.5; t=$(( t + 1 ))
    done
    if [[ "$st" != idle ]]; then
        echo "--- sinfo:" >&2; sinfo -N -l >&2 || true
        echo "--- slurmctld.log:" >&2; tail -n 20 "$STATE/log/slurmctld.log" >&2 || true
        echo "--- slurmd.log:" >&2; tail -n 20 "$STATE/log/slurmd.log" >&2 || true
        die "node not idle after ${TIMEOUT}s (state: '${st:-no answer}'); logs in $STATE/log"
    fi
    say "slurmctld pid $(cat "$STATE/slurmctld.pid"), slurmd pid $(cat "$STATE/slurmd.pid")"
    say "ready: $(sinfo -h -o 'partition %P %a, %D node %N %t, %c CPUs, %m MB')"
}

# Stop one daemon: TERM, wait up to 30 s, then KILL.
stop_daemon() {
    local name="$1" file="$2"; shift 2
    local pid i
    if ! pid="$(live_pid "$file" "$@")"; then
        rm -f "$file"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$file"
    say "stopped $name (pid $pid)"
}

cmd_stop() {
    local quiet="${1:-}"
    if live_pid "$STATE/slurmctld.pid" slurmctld slurmctld-wlm >/dev/null; then
        # Leftover jobs of this private test cluster only.
        local jobs
        jobs="$(squeue -h -o '%i' 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            say "cancelling leftover jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            sleep 2
        fi
    fi
    stop_daemon slurmd "$STATE/slurmd.pid" slurmd slurmd-wlm
    stop_daemon slurmctld "$STATE/slurmctld.pid" slurmctld slurmctld-wlm
    stop_daemon munged "$STATE/munged.pid" munged
    [[ -n "$quiet" ]] || say "stopped (state kept in $STATE)"
}

cmd_status() {
    local rc=0 pid
    for d in munged:munged slurmctld:slurmctld,slurmctld-wlm slurmd:slurmd,slurmd-wlm; do
        local name="${d%%:*}" names
        IFS=, read -r -a names <<< "${d#*:}"
        if pid="$(live_pid "$STATE/$name.pid" "${names[@]}")"; then
            say "$name running (pid $pid)"
        else
            say "$name not running"; rc=1
        fi
    done
    if (( rc == 0 )); then sinfo; fi
    return "$rc"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
