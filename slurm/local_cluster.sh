#!/usr/bin/env bash
# A single-node Slurm (Debian slurm-wlm + munge) bound to 127.0.0.1, to try the submitit launcher and for CI.
#
#   bash slurm/local_cluster.sh start     # installs the packages if missing (root, apt), starts munged/slurmctld/slurmd
#   source .slurm/env.sh                  # SLURM_CONF and the sacct stand-in, in every shell that submits
#   bash slurm/local_cluster.sh stop      # stops the daemons this script started (by their pid files)
#   bash slurm/local_cluster.sh status
#
# Everything (config, keys, state, logs, job output) lives in $COMPBENCH_SLURM_BASE (default: .slurm/ at the repo
# root, git-ignored); nothing under /etc is written. `start` is idempotent: daemons already up are left alone.
# One partition `debug` with all the machine's CPUs and half its memory; jobs get 1 GiB per CPU unless they ask.
# Accounting is off, so .slurm/bin/sacct answers submitit's `sacct` polls from `scontrol show job` (which knows a
# job for MinJobAge=600 s after it ends); without it the launcher never notices a job that died without a result.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=$(realpath -m "${COMPBENCH_SLURM_BASE:-$ROOT/.slurm}")
CTLD_PORT=${COMPBENCH_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${COMPBENCH_SLURMD_PORT:-6818}
SOCK="$BASE/munge-sock/munge.socket.2"
export SLURM_CONF="$BASE/slurm.conf"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_up() { sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; }

write_conf() {
  local mem_mb=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 / 2 ))  # below what slurmd detects
  cat > "$SLURM_CONF" <<CONF
ClusterName=compbench-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again cred_expire + 1 s later (default 120)
AuthInfo=socket=$SOCK,cred_expire=10
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
# look at pending jobs every 2 s (default 60 s), so a requeued job starts soon after it is eligible
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=5
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
}

write_sacct() {
  cat > "$BASE/bin/sacct" <<'PY'
#!/usr/bin/env python3
"""`sacct -o JobID,State,... --parsable2 -j ID[,ID]` answered from `scontrol show job -o` when the real sacct fails
(accounting storage is off on this cluster). Array tasks are listed as <array job>_<task>."""
import subprocess
import sys

args = sys.argv[1:]
real = subprocess.run(["/usr/bin/sacct", *args], capture_output=True, text=True)
if real.returncode == 0:
    sys.stdout.write(real.stdout)
    sys.exit(0)
fields, ids = ["JobID", "State", "NodeList"], []
for i, arg in enumerate(args):
    if arg in ("-o", "--format") and i + 1 < len(args):
        fields = args[i + 1].split(",")
    if arg in ("-j", "--jobs") and i + 1 < len(args):
        ids += args[i + 1].split(",")
print("|".join(fields))
for jid in ids:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    for line in out.splitlines():
        kv = dict(t.split("=", 1) for t in line.split() if "=" in t)
        array, task = kv.get("ArrayJobId"), kv.get("ArrayTaskId")
        kv["JobID"] = f"{array}_{task}" if array and task else kv.get("JobId", jid)
        kv["State"] = kv.get("JobState", "UNKNOWN")
        print("|".join(kv.get(f, "") for f in fields))
PY
  chmod +x "$BASE/bin/sacct"
}

start() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "slurm-wlm and munge are not installed; install them as root (apt-get)" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  mkdir -p "$BASE"/{munge-key,munge-sock,state,spool,log,bin,jobs}
  chmod 700 "$BASE/munge-key"
  chmod 755 "$BASE" "$BASE/munge-sock"  # munged: private key folder, world-executable socket folder
  if ! alive "$BASE/munge-sock/munged.pid"; then
    if [ ! -s "$BASE/munge-key/munge.key" ]; then
      dd if=/dev/urandom of="$BASE/munge-key/munge.key" bs=1024 count=1 status=none
      chmod 400 "$BASE/munge-key/munge.key"
    fi
    rm -f "$SOCK" "$SOCK.lock"
    munged --socket="$SOCK" --key-file="$BASE/munge-key/munge.key" --pid-file="$BASE/munge-sock/munged.pid" \
      --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge-key/munged.seed"
  fi
  munge --socket="$SOCK" -n | unmunge --socket="$SOCK" >/dev/null
  if ! alive "$BASE/slurmctld.pid" || ! alive "$BASE/slurmd.pid"; then
    write_conf
  fi
  write_sacct
  printf 'export SLURM_CONF=%q\nexport PATH=%q:"$PATH"\n' "$SLURM_CONF" "$BASE/bin" > "$BASE/env.sh"
  alive "$BASE/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
  alive "$BASE/slurmd.pid" || slurmd -f "$SLURM_CONF" -N localhost  # the host name need not be "localhost"
  for _ in $(seq 1 60); do node_up && break; sleep 0.5; done
  node_up || { echo "slurm did not come up; logs in $BASE/log" >&2; exit 1; }
  echo "slurm up (partition debug, $(nproc) CPUs): source $BASE/env.sh"
}

stop() {
  local f
  for f in "$BASE/slurmd.pid" "$BASE/slurmctld.pid"; do
    alive "$f" && kill "$(cat "$f")" && echo "stopped $(basename "$f" .pid)"
  done
  for _ in $(seq 1 40); do  # slurmctld saves its state and exits before munged goes
    alive "$BASE/slurmctld.pid" || alive "$BASE/slurmd.pid" || break
    sleep 0.25
  done
  alive "$BASE/munge-sock/munged.pid" && kill "$(cat "$BASE/munge-sock/munged.pid")" && echo "stopped munged"
  true
}

status() {
  local f
  for f in "$BASE/munge-sock/munged.pid" "$BASE/slurmctld.pid" "$BASE/slurmd.pid"; do
    if alive "$f"; then
      echo "$(basename "$f" .pid): running (pid $(cat "$f"))"
    else
      echo "$(basename "$f" .pid): stopped"
    fi
  done
  node_up && sinfo
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
