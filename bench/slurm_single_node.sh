#!/usr/bin/env bash
# A single-node SLURM on this machine, a `distillkit build` through it, and the same build without it (issue 24).
#
#     sudo bash bench/slurm_single_node.sh        # as root: it installs packages and starts daemons
#
# It installs Debian's slurm-wlm and munge when absent, starts munged, slurmctld and slurmd with a minimal slurm.conf
# (this host's name, CPUs and memory from `slurmd -C`; proctrack/linuxproc, task/none, no accounting: no cgroups and
# no systemd needed) whose state, spool, sockets and logs all live in one temporary folder, waits for the node to be
# idle, then:
#   1. measures SLURM's job start latency (sbatch -> the job's first line running), JOBS_LATENCY times;
#   2. makes synthetic audio (`distillkit synth audio --size $SIZE`) and builds manifests/demo-audio.toml, ROUNDS
#      times each, in alternating order,
#      a. on the embedded LocalCluster (2 workers, the default),
#      b. with [cluster] kind = "slurm" (SLURM_JOBS jobs of 1 core each: the build submits its own workers);
#   3. verifies every build (`distillkit verify`) and checks the SLURM shards are byte-identical to the local ones;
#   4. interrupts a third SLURM build with Ctrl-C (SIGINT) once its workers joined and checks its jobs are gone;
#      starts one whose sbatch is refused (no such partition: exit 2 at once, sbatch's reason) and one whose jobs
#      are all scancelled once they joined (exit 2, join_timeout = 10 s later: every worker is gone);
#   5. runs tests/test_jobqueue.py's real-SLURM test against this SLURM (PYTEST, default .venv/bin/pytest);
#   6. prints the timings, and tears everything down (trap): jobs cancelled, daemons stopped, folder removed
#      (KEEP=1 keeps it, with the daemons' and jobs' logs).
# Knobs: SIZE (synth size, default demo: 150 files, 15 shards), SLURM_JOBS (2), JOBS_LATENCY (5), ROUNDS (1), PORT (16817; slurmd
# uses PORT+1), DISTILLKIT (the CLI to run, default .venv/bin/distillkit, else distillkit on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SIZE=${SIZE:-demo}
SLURM_JOBS=${SLURM_JOBS:-2}
JOBS_LATENCY=${JOBS_LATENCY:-5}
ROUNDS=${ROUNDS:-1}
PORT=${PORT:-16817}
if [ -z "${DISTILLKIT:-}" ]; then
  if [ -x .venv/bin/distillkit ]; then DISTILLKIT=$ROOT/.venv/bin/distillkit; else DISTILLKIT=distillkit; fi
fi
[ "$(id -u)" = 0 ] || { echo "run as root: it installs slurm-wlm and munge and starts their daemons"; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "== installing slurm-wlm and munge"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
[ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 2>/dev/null;
                                 chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }

D=$(mktemp -d /tmp/slurm-single-node.XXXXXX)
chmod 755 "$D"
export SLURM_CONF=$D/slurm.conf
teardown() {
  set +e
  scancel --user=root >/dev/null 2>&1
  for pidfile in "$D/slurmd.pid" "$D/slurmctld.pid" "$D/munge/munged.pid"; do
    [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
  done
  sleep 1
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $D (logs: slurmctld.log slurmd.log jobs/)"; else rm -rf "$D"; fi
}
trap teardown EXIT
trap 'exit 130' INT TERM

echo "== starting munged, slurmctld, slurmd in $D"
# munged: its own socket under $D (the socket's folder must be world-executable, munged checks it); not as root
mkdir -p "$D/munge" "$D/state" "$D/spool" "$D/jobs"
chown munge:munge "$D/munge"
chmod 755 "$D/munge"
runuser -u munge -- munged --socket="$D/munge/munge.sock" --pid-file="$D/munge/munged.pid" \
  --log-file="$D/munge/munged.log" --seed-file="$D/munge/seed"
# NodeName=... CPUs=... RealMemory=... of this machine, as slurmd itself sees it
NODE_LINE=$(slurmd -C | head -1)
NODE=$(sed -E 's/.*NodeName=([^ ]+).*/\1/' <<<"$NODE_LINE")
CPUS=$(sed -E 's/.*CPUs=([0-9]+).*/\1/' <<<"$NODE_LINE")
MEM=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$NODE_LINE")
cat > "$SLURM_CONF" <<EOF
ClusterName=distillkit
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.sock
CredType=cred/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/slurmctld.log
SlurmdLogFile=$D/slurmd.log
# No cgroups, no systemd: processes tracked by /proc, no task confinement, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld
slurmd
for _ in $(seq 60); do
  [ "$(sinfo -h -n "$NODE" -o %t 2>/dev/null)" = idle ] && break
  sleep 0.5
done
[ "$(sinfo -h -n "$NODE" -o %t)" = idle ] || { echo "node $NODE not idle:"; sinfo; tail -5 "$D"/slurm*.log; exit 1; }
echo "node $NODE idle: CPUs=$CPUS RealMemory=${MEM}MB ($(sinfo -V))"

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

echo "== SLURM job start latency ($JOBS_LATENCY jobs, one at a time)"
LAT=()
for i in $(seq "$JOBS_LATENCY"); do
  t0=$(now)
  id=$(sbatch --parsable -c 1 --mem=100M -o /dev/null --wrap "date +%s.%N > $D/jobs/started-$i")
  while squeue -h -j "$id" 2>/dev/null | grep -q .; do sleep 0.05; done
  LAT+=("$(secs "$t0" "$(cat "$D/jobs/started-$i")")")
done
echo "sbatch -> job running (s): ${LAT[*]}"

echo "== synthetic audio ($SIZE)"
"$DISTILLKIT" synth audio "$D/audio" --size "$SIZE"
SETS=(--set "source.root=$D/audio")
SLURM_SETS=(--set cluster.kind=slurm --set cluster.walltime=00:30:00 --set "cluster.jobs=$SLURM_JOBS"
            --set cluster.cores=1 --set cluster.memory=2GiB --set cluster.join_timeout=120)

echo "== the job script the SLURM build submits"
"$DISTILLKIT" build manifests/demo-audio.toml "${SETS[@]}" "${SLURM_SETS[@]}" --set "cluster.log_directory=$D/jobs/1" \
  --print-job-script

# ROUNDS pairs of builds, the order alternating (local first in odd rounds), so a warm cache or a busy neighbour
# does not always favour the same one.
build_local() {
  local t0; t0=$(now)
  "$DISTILLKIT" build manifests/demo-audio.toml "${SETS[@]}" --set "output.dir=$D/local-$1" --quiet
  T_LOCAL+=("$(secs "$t0" "$(now)")")
}
build_slurm() {
  local t0; t0=$(now)
  "$DISTILLKIT" build manifests/demo-audio.toml "${SETS[@]}" "${SLURM_SETS[@]}" --set "output.dir=$D/slurm-$1" \
    --set "cluster.log_directory=$D/jobs/$1" --quiet 2>&1 | tee "$D/slurm-build-$1.log"
  T_SLURM+=("$(secs "$t0" "$(now)")")
  ls "$D/jobs/$1"/*.err >/dev/null 2>&1 || { echo "FAIL: no SLURM job ran (no worker log in $D/jobs/$1)"; exit 1; }
  JOINED+=("$(grep -Eo 'joined in [0-9.]+ s' "$D/slurm-build-$1.log" | grep -Eo '[0-9.]+' || echo '?')")
}
T_LOCAL=(); T_SLURM=(); JOINED=(); SAME="byte-identical"
for r in $(seq "$ROUNDS"); do
  echo "== round $r: build on the embedded LocalCluster (2 workers) and through SLURM ($SLURM_JOBS jobs x 1 core)"
  if [ $((r % 2)) = 1 ]; then build_local "$r"; build_slurm "$r"; else build_slurm "$r"; build_local "$r"; fi
  for kind in local slurm; do
    "$DISTILLKIT" verify "$D/$kind-$r" >/dev/null
    (cd "$D/$kind-$r" && sha256sum ./*.tar) > "$D/$kind-$r.sha"
  done
  cmp -s "$D/local-$r.sha" "$D/slurm-$r.sha" || SAME="DIFFERENT"
done
sleep 1
LEFT=$(squeue -h | wc -l)

echo "== Ctrl-C during a SLURM build cancels its jobs"
# job control on: a background command of a script otherwise starts with SIGINT ignored, and Python would never
# see the Ctrl-C
set -m
"$DISTILLKIT" build manifests/demo-audio.toml "${SETS[@]}" "${SLURM_SETS[@]}" --set "output.dir=$D/interrupted" \
  --set "cluster.log_directory=$D/jobs/interrupted" --quiet > "$D/interrupted.log" 2>&1 &
BUILD=$!
set +m
for _ in $(seq 600); do grep -q "joined in" "$D/interrupted.log" && break; sleep 0.1; done
sleep 2
RUNNING=$(squeue -h | wc -l)
t0=$(now)
kill -INT "$BUILD"
wait "$BUILD" && RC=0 || RC=$?
for _ in $(seq 100); do [ "$(squeue -h | wc -l)" = 0 ] && break; sleep 0.1; done
T_CANCEL=$(secs "$t0" "$(now)")
LEFT_INT=$(squeue -h | wc -l)
echo "jobs running at the Ctrl-C: $RUNNING; build exit $RC; jobs left $LEFT_INT after ${T_CANCEL} s"

echo "== a job sbatch refuses (no such partition) stops the build at once"
t0=$(now)
"$DISTILLKIT" build manifests/demo-audio.toml "${SETS[@]}" "${SLURM_SETS[@]}" --set "output.dir=$D/refused" \
  --set cluster.queue=nosuchpartition --quiet > "$D/refused.log" 2>&1 && RC_REF=0 || RC_REF=$?
T_REF=$(secs "$t0" "$(now)")
echo "exit $RC_REF after $T_REF s: $(tail -1 "$D/refused.log")"

echo "== scancel of every job during a build: the build stops join_timeout (10 s) later"
"$DISTILLKIT" build manifests/demo-audio.toml "${SETS[@]}" "${SLURM_SETS[@]}" --set "output.dir=$D/scancelled" \
  --set "cluster.log_directory=$D/jobs/scancelled" --set cluster.join_timeout=10 --quiet > "$D/scancelled.log" 2>&1 &
BUILD=$!
for _ in $(seq 600); do grep -q "joined in" "$D/scancelled.log" && break; sleep 0.1; done
t0=$(now)
scancel --name distillkit
wait "$BUILD" && RC_GONE=0 || RC_GONE=$?
T_GONE=$(secs "$t0" "$(now)")
echo "exit $RC_GONE ${T_GONE} s after the scancel: $(tail -1 "$D/scancelled.log")"

REAL_TEST="skipped (no pytest)"
if [ -n "${PYTEST:-}" ] || [ -x .venv/bin/pytest ]; then
  echo "== tests/test_jobqueue.py against this SLURM"
  ${PYTEST:-.venv/bin/pytest} -q -p no:cacheprovider tests/test_jobqueue.py -k real_slurm 2>&1 | tail -3 \
    | tee "$D/pytest.log"
  REAL_TEST=$(tail -1 "$D/pytest.log")
fi

echo "== results ($NODE, $CPUS CPUs, load before: $LOAD0; synth audio $SIZE: $(ls "$D/audio" -R | grep -c '^clip_') files, $(wc -l < "$D/local-1.sha") shards)"
echo "SLURM job start latency (sbatch -> running), s: ${LAT[*]}"
echo "build, embedded LocalCluster (2 workers), s:  ${T_LOCAL[*]}"
echo "build, SLURM ($SLURM_JOBS jobs x 1 core), s:         ${T_SLURM[*]}"
echo "  of which until every SLURM worker joined, s: ${JOINED[*]}"
echo "jobs left in the queue after the builds:      $LEFT"
echo "shards of every round: $SAME (SLURM vs local); all pass distillkit verify"
echo "Ctrl-C after the workers joined: $RUNNING job(s) running, build exit $RC ($(tail -1 "$D/interrupted.log")), $LEFT_INT left after ${T_CANCEL} s"
echo "refused job (cluster.queue=nosuchpartition): exit $RC_REF after $T_REF s: $(tail -1 "$D/refused.log")"
echo "scancel of every job after joining: exit $RC_GONE ${T_GONE} s later: $(tail -1 "$D/scancelled.log")"
echo "real-SLURM test: $REAL_TEST"
# the interrupted build must say so (exit 1, "Aborted!"), not 0
[ "$SAME" = byte-identical ] && [ "$LEFT" = 0 ] && [ "$LEFT_INT" = 0 ] && [ "$RC" != 0 ] && [ "$RC_REF" = 2 ] && \
  [ "$RC_GONE" = 2 ]
