#!/usr/bin/env bash
# Start a real single-node SLURM cluster (munge, slurmctld, slurmd) with two
# declared GPUs, for tests/test_slurm.py. Needs root and Debian's packages:
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# Daemons are stopped by the PIDs in their pid files (stop_cluster.sh), never by name.
set -euo pipefail

state=${SLURM_TEST_STATE:-/tmp/lora-study-slurm}
host=$(hostname -s)
mkdir -p "$state"/{spool,ctld,log} /etc/slurm /run/munge

# munge: key readable by munge only, socket dir owned by munge.
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown munge:munge /etc/munge/munge.key /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
fi
# Generous waits: daemons start in about a second, slower under load; a wait that ends early fails CI.
for _ in $(seq 300); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done

# Node size from slurmd itself; memory a little below what it reports.
read -r cpus memory < <(slurmd -C | tr ' ' '\n' | awk -F= '/^CPUs=/{c=$2} /^RealMemory=/{m=$2} END{print c, int(m*0.9)}')

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=lorastudy
SlurmctldHost=${host}(127.0.0.1)
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldPidFile=${state}/slurmctld.pid
SlurmdPidFile=${state}/slurmd.pid
SlurmdSpoolDir=${state}/spool
StateSaveLocation=${state}/ctld
SlurmctldLogFile=${state}/log/slurmctld.log
SlurmdLogFile=${state}/log/slurmd.log
MinJobAge=300
ReturnToService=2
SchedulerType=sched/backfill
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1000
CONF
# Two declared (fake) GPUs: a job asking --gpus=1 gets CUDA_VISIBLE_DEVICES=0 (or 1), one asking --gpus=2
# (a sharded run, training.gpus: 2) gets 0,1.
cat > /etc/slurm/gres.conf <<CONF
AutoDetect=off
NodeName=${host} Name=gpu File=/dev/null
NodeName=${host} Name=gpu File=/dev/zero
CONF

slurmctld
slurmd
for _ in $(seq 300); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
for _ in $(seq 300); do
    [[ "$(sinfo -h -N -o %T 2>/dev/null)" == idle ]] && break
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 0.3
done
[[ "$(sinfo -h -N -o %T)" == idle ]] || { echo "slurm node did not become idle" >&2; exit 1; }
echo "slurm cluster up: node $host, $cpus CPUs, ${memory} MB, 2 GPUs"
