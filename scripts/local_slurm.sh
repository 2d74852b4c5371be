#!/usr/bin/env bash
# A real Slurm (Debian's slurm-wlm 22.05) as a one-node cluster on localhost, with accounting (slurmdbd +
# MariaDB) so that sacct and submitit can see how a job ended. Used by the `slurm` tests and by .ci/run.
#
#   scripts/local_slurm.sh up       install what is missing, write the configs, start the daemons, wait until
#                                   the node is idle; prints one line
#   scripts/local_slurm.sh down     stop every daemon it started (by pid file)
#   scripts/local_slurm.sh status   prints whether it is up; exit 0 when up, 1 when down
#
# Needs root (it installs Debian packages and runs the daemons as root: SlurmUser=root). The settings are the
# ones a single-node cluster on localhost was found to need; each is commented below.
# Environment knobs: LOCAL_SLURM_PARTITION (default "debug"), LOCAL_SLURM_TIMEOUT (seconds to wait, default 60).
set -euo pipefail

PARTITION="${LOCAL_SLURM_PARTITION:-debug}"
CLUSTER="posttrain"
WAIT_S="${LOCAL_SLURM_TIMEOUT:-60}"
ETC=/etc/slurm
LOG=/var/log/slurm
SETUP_LOG="$LOG/local_slurm_setup.log"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DB_SOCKET=/run/mysqld/mysqld.sock
DB_PID=/run/mysqld/mysqld.pid
DB_PASS="posttrain-local"   # local, socket-only database; not a secret

die() { echo "local_slurm: $*" >&2; exit 1; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

proc_alive() {  # proc_alive PID: running and not a zombie (PID 1 here may reap exited daemons late)
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

pid_alive() {  # pid_alive PIDFILE
    [[ -s "$1" ]] && proc_alive "$(cat "$1")"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    local end=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        (( $(date +%s) < end )) || die "timed out after ${limit}s waiting for $what (logs: $LOG/)"
        sleep 0.2
    done
}

node_name() { hostname -s; }

# ---------------------------------------------------------------- install
install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    (( ${#missing[@]} == 0 )) && return 0
    [[ $EUID -eq 0 ]] || die "needs root to install ${missing[*]}"
    mkdir -p "$LOG"
    # Keep package scripts from starting daemons themselves (no init system here; we start them below).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold "${missing[@]}")
    if ! "${apt[@]}" >>"$SETUP_LOG" 2>&1; then
        apt-get update -q >>"$SETUP_LOG" 2>&1 || true
        "${apt[@]}" >>"$SETUP_LOG" 2>&1 || { (( created_policy )) && rm -f "$policy"; tail -20 "$SETUP_LOG" >&2;
                                             die "apt-get install ${missing[*]} failed (log: $SETUP_LOG)"; }
    fi
    (( created_policy )) && rm -f "$policy"
    return 0
}

# ---------------------------------------------------------------- configuration
write_configs() {
    mkdir -p "$ETC" "$LOG" /var/spool/slurmctld /var/spool/slurmd /run/slurm
    local node hw
    node=$(node_name)
    # The real hardware as slurmd sees it ("CPUs=2 Boards=1 SocketsPerBoard=... RealMemory=24105").
    hw=$(slurmd -C 2>/dev/null | head -1 | sed -E 's/^NodeName=[^ ]+ //')
    [[ $hw == *CPUs=* && $hw == *RealMemory=* ]] || die "slurmd -C gave no hardware line: '$hw'"

    local conf
    conf=$(cat <<EOF
# Written by scripts/local_slurm.sh: a one-node cluster on localhost for tests. Do not edit; rerun 'up'.
ClusterName=$CLUSTER
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job otherwise waits minutes for its old credential to expire.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in this container: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
# Schedule within a second; refuse (rather than pend forever) a request the partition can never satisfy.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
EnforcePartLimits=ALL
KillWait=5
MinJobAge=300
ReturnToService=2
MpiDefault=none
# Accounting through slurmdbd, so that sacct (and submitit) know how a job ended.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
NodeName=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
# FORCE:4: up to 4 small jobs share each CPU, so a handful of 1-CPU test jobs run at once on 2 cores.
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
)
    # Rewrite only when something changed, so a warm 'up' keeps a running cluster untouched.
    CONF_CHANGED=0
    if [[ ! -f $ETC/slurm.conf ]] || [[ "$(cat "$ETC/slurm.conf")" != "$conf" ]]; then
        printf '%s\n' "$conf" >"$ETC/slurm.conf"; CONF_CHANGED=1
    fi

    # cgroup.conf: no cgroup plugin is in use (proctrack/linuxproc, task/none); constrain nothing.
    printf '%s\n' "# Written by scripts/local_slurm.sh: cgroups are not used (proctrack/linuxproc, task/none)." \
        "ConstrainCores=no" "ConstrainRAMSpace=no" "ConstrainDevices=no" >"$ETC/cgroup.conf"

    local dbd
    dbd=$(cat <<EOF
# Written by scripts/local_slurm.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=/run/slurm/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)
    if [[ ! -f $ETC/slurmdbd.conf ]] || [[ "$(cat "$ETC/slurmdbd.conf")" != "$dbd" ]]; then
        printf '%s\n' "$dbd" >"$ETC/slurmdbd.conf"; CONF_CHANGED=1
    fi
    chown root:root "$ETC/slurmdbd.conf"; chmod 600 "$ETC/slurmdbd.conf"   # slurmdbd refuses anything looser
}

# ---------------------------------------------------------------- daemons
start_munge() {
    pid_alive /run/munge/munged.pid && return 0
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    fi
    chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge; chmod 0755 /run/munge; chmod 0400 /etc/munge/munge.key
    rm -f /run/munge/munged.pid
    su -s /bin/sh munge -c "/usr/sbin/munged --force" >>"$LOG/munged.out" 2>&1 || die "munged did not start"
    wait_for 10 munge sh -c 'munge -n | unmunge'
}

db_ping() { mysqladmin --socket="$DB_SOCKET" -u root ping; }

start_mariadb() {
    if ! db_ping >/dev/null 2>&1; then
        mkdir -p /run/mysqld /var/log/mysql; chown mysql:mysql /run/mysqld /var/log/mysql
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$SETUP_LOG" 2>&1 || die "mariadb-install-db failed"
        fi
        # Socket only (slurmdbd connects via localhost); small buffer pool (this is a tiny accounting db).
        setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket="$DB_SOCKET" --pid-file="$DB_PID" \
            --skip-networking --innodb-buffer-pool-size=32M --log-error=/var/log/mysql/error.log \
            </dev/null >/dev/null 2>&1 &
        wait_for 30 mariadb db_ping
    fi
    mysql --socket="$DB_SOCKET" -u root >>"$SETUP_LOG" 2>&1 <<EOF || die "could not create the accounting database"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
    if (( CONF_CHANGED )) && pid_alive /run/slurm/slurmdbd.pid; then stop_pidfile /run/slurm/slurmdbd.pid; fi
    pid_alive /run/slurm/slurmdbd.pid && return 0
    /usr/sbin/slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1 || die "slurmdbd did not start (log: $LOG/slurmdbd.log)"
    wait_for 30 slurmdbd sacctmgr -n list cluster
    # slurmctld registers the cluster itself; adding it here first makes that independent of timing.
    sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER" \
        || sacctmgr -i add cluster "$CLUSTER" >>"$SETUP_LOG" 2>&1 || true
}

start_slurm() {
    if (( CONF_CHANGED )); then
        pid_alive /run/slurm/slurmd.pid && stop_pidfile /run/slurm/slurmd.pid
        pid_alive /run/slurm/slurmctld.pid && stop_pidfile /run/slurm/slurmctld.pid
    fi
    if ! pid_alive /run/slurm/slurmctld.pid; then
        /usr/sbin/slurmctld </dev/null >>"$LOG/slurmctld.out" 2>&1 || die "slurmctld did not start (log: $LOG/slurmctld.log)"
    fi
    wait_for 30 slurmctld scontrol ping
    if ! pid_alive /run/slurm/slurmd.pid; then
        /usr/sbin/slurmd </dev/null >>"$LOG/slurmd.out" 2>&1 || die "slurmd did not start (log: $LOG/slurmd.log)"
    fi
}

node_state() { sinfo -h -N -p "$PARTITION" -o %T 2>/dev/null | head -1; }

node_ready() {
    local state; state=$(node_state)
    [[ $state == idle* || $state == mixed* || $state == allocated* ]]
}

wait_node() {
    local end=$(( $(date +%s) + WAIT_S )) state
    while :; do
        state=$(node_state)
        case "$state" in
            idle*|mixed*|allocated*) return 0 ;;
            down*|drain*|fail*|inval*)
                # e.g. left DOWN by an earlier unclean stop: bring it back.
                scontrol update nodename="$(node_name)" state=resume >/dev/null 2>&1 || true ;;
        esac
        (( $(date +%s) < end )) || die "node not idle after ${WAIT_S}s (state '${state:-none}'; logs: $LOG/)"
        sleep 0.3
    done
}

stop_pidfiles() {  # stop_pidfiles PIDFILE...: TERM them together, wait up to 15 s, then KILL
    local pids=() f pid i
    for f in "$@"; do
        pid_alive "$f" && pids+=("$(cat "$f")")
    done
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for i in $(seq 75); do
        local left=0
        for pid in "${pids[@]}"; do proc_alive "$pid" && left=1; done
        (( left )) || break
        sleep 0.2
    done
    for pid in "${pids[@]}"; do proc_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
    rm -f "$@"
}

stop_pidfile() { stop_pidfiles "$1"; }

# ---------------------------------------------------------------- commands
cmd_up() {
    local t0; t0=$(now_ms)
    [[ $EUID -eq 0 ]] || die "must run as root (SlurmUser=root, daemons, packages)"
    mkdir -p "$LOG"
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurm
    wait_node
    local cpus mem
    cpus=$(sinfo -h -N -p "$PARTITION" -o %c | head -1); mem=$(sinfo -h -N -p "$PARTITION" -o %m | head -1)
    local ms=$(( $(now_ms) - t0 ))
    printf 'local_slurm: up in %d.%01ds: node %s (%s CPUs, %s MB), partition %s, %s\n' \
        $(( ms / 1000 )) $(( ms % 1000 / 100 )) "$(node_name)" "$cpus" "$mem" "$PARTITION" "$(node_state)"
}

cmd_down() {
    local any=0 f
    for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/slurm/slurmdbd.pid "$DB_PID" /run/munge/munged.pid; do
        pid_alive "$f" && any=1
    done
    # In dependency order: slurm daemons (slurmctld flushes to slurmdbd), slurmdbd, then its database and munge.
    stop_pidfiles /run/slurm/slurmd.pid /run/slurm/slurmctld.pid
    stop_pidfiles /run/slurm/slurmdbd.pid
    stop_pidfiles "$DB_PID" /run/munge/munged.pid
    if (( any )); then echo "local_slurm: down"; else echo "local_slurm: down (nothing was running)"; fi
}

cmd_status() {
    if command -v sinfo >/dev/null && pid_alive /run/slurm/slurmctld.pid && pid_alive /run/slurm/slurmd.pid \
            && node_ready; then
        local acct="no accounting"
        pid_alive /run/slurm/slurmdbd.pid && acct="accounting up"
        echo "local_slurm: up: node $(node_name) $(node_state), partition $PARTITION, $acct"
        return 0
    fi
    echo "local_slurm: down"
    return 1
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
