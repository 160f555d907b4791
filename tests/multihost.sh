#!/usr/bin/env bash
# Multi-host test: five network namespaces joined by a bridge act as five hosts. The
# coordinator runs on host 0 and an agent on each of hosts 1 and 2 (hosts 3 and 4 too in
# part 4). Every packet stays inside these namespaces; the hosts share only the filesystem
# (the run folder, as shared storage).
#
#   1. A short job trains across the hosts (one CPU worker per host, one column each).
#   2. The same job again, with host 2's link cut mid-run: the coordinator and the worker on
#      host 1 must name the lost rank within the peer timeout; when the link is back, host 2's
#      agent rejoins, the run resumes from the newest checkpoint and ends with exactly the
#      parameters of run 1 (nothing lost, nothing trained twice differently).
#   3. 2 replicas x 2 columns across the two hosts (two workers each) against the same job on
#      one host (`alexnet launch`): identical parameters after a fixed number of steps.
#   4. Elastic replicas (--replicas 3:4): four hosts, a replica of two workers each. Host 3's
#      link is cut after the first checkpoint and it is lost for good (its agent dies): the
#      job goes on with 3 replicas from that checkpoint (after --rejoin-timeout). The host
#      comes back (link up, a new agent): its workers wait, and the world grows back to 4
#      replicas at the next checkpoint. The final parameters match an
#      uninterrupted 4-replica run within 1e-6 relative (float32 rounding: each replica's
#      share of the batch changed for a few steps).
#
# Needs root (network namespaces) and iproute2. Usage: tests/multihost.sh [ALEXNET_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$(realpath "${1:-${CARGO_TARGET_DIR:-target}/debug/alexnet}")
[[ -x $BIN ]] || { echo "no alexnet binary at $BIN: build it first (cargo build)" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "the multi-host test needs root (network namespaces)" >&2; exit 2; }
command -v ip >/dev/null || { echo "the multi-host test needs iproute2 (ip)" >&2; exit 2; }

PEER_TIMEOUT=6
# Steps and checkpoints of runs 1 and 2: the cut comes after the first checkpoint.
STEPS=30
EVERY=10
NS="axm$$"
SW="$NS-sw"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/alexnet-multihost.XXXXXX")
PIDS=()
export ALEXNET_TOKEN="multihost-test-token-$$"
export RUST_LOG=info

cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    # The workers are the agents' children: they end with them (parent-death signal).
    pkill -9 -f "$WORK" 2>/dev/null || true
    for n in h0 h1 h2 h3 h4 sw; do ip netns del "$NS-$n" 2>/dev/null || true; done
    if [[ $rc != 0 ]]; then
        echo "== multi-host test FAILED; logs:" >&2
        for f in "$WORK"/*.log; do echo "--- $f" >&2; tail -n 25 "$f" >&2; done
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }

# --- five hosts on a bridge --------------------------------------------------------------
ip netns add "$SW"
ip -n "$SW" link add br0 type bridge
ip -n "$SW" link set br0 up
for i in 0 1 2 3 4; do
    H="$NS-h$i"
    ip netns add "$H"
    ip link add eth0 netns "$H" type veth peer name "p$i" netns "$SW"
    ip -n "$SW" link set "p$i" master br0 up
    ip -n "$H" addr add "10.77.0.$((i + 1))/24" dev eth0
    ip -n "$H" link set eth0 up
    ip -n "$H" link set lo up
done
COORD=10.77.0.1:50051
URL="http://$COORD"

# on HOST LOG CMD...: starts CMD in host HOST's namespace, its output in $WORK/LOG.log.
on() {
    local host=$1 log=$2
    shift 2
    ip netns exec "$NS-$host" "$BIN" "$@" >"$WORK/$log.log" 2>&1 &
    PIDS+=($!)
    LAST=$!
}

# wait_for SECONDS FILE PATTERN: until a line of FILE matches PATTERN (extended regex).
wait_for() {
    local deadline=$((SECONDS + $1))
    until grep -Eq "$3" "$2" 2>/dev/null; do
        ((SECONDS < deadline)) || fail "no line matching /$3/ in $(basename "$2") within $1 s"
        sleep 0.2
    done
}

# finish SECONDS PID NAME: waits for PID to exit 0.
finish() {
    local deadline=$((SECONDS + $1))
    while kill -0 "$2" 2>/dev/null; do
        ((SECONDS < deadline)) || fail "$3 still running after $1 s"
        sleep 0.5
    done
    wait "$2" || fail "$3 exited with status $?"
}

# job RUN STEPS EXTRA...: coordinator on h0 and agents on h1, h2 for a job named RUN.
job() {
    local run=$1 steps=$2 workers=$3
    shift 3
    on h0 "$run-coordinator" --log-format text coordinator --listen "$COORD" --job-id "$run" \
        --run-dir "$WORK/$run" --steps "$steps" --checkpoint-every "$EVERY" --log-every 5 \
        --peer-timeout "$PEER_TIMEOUT" --rendezvous-timeout 120 "$@"
    C=$LAST
    on h1 "$run-agent1" agent --coordinator "$URL" --job-id "$run" --node-rank 0 \
        --workers "$workers" --threads 1 --out "$WORK/$run/params" --rejoin-timeout 120 \
        --metrics-listen 9402
    A1=$LAST
    on h2 "$run-agent2" agent --coordinator "$URL" --job-id "$run" --node-rank 1 \
        --workers "$workers" --threads 1 --out "$WORK/$run/params" --rejoin-timeout 120 \
        --metrics-listen 9402
    A2=$LAST
}

# scrape HOST URL: the metrics at URL, fetched from host HOST's namespace.
scrape() {
    ip netns exec "$NS-$1" python3 -c 'import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' "$2"
}

same_params() {
    for f in "$1"/column0.safetensors "$1"/column1.safetensors; do
        [[ -s $f ]] || fail "$f was not written"
        cmp -s "$f" "$2/$(basename "$f")" || fail "$f differs from $2/$(basename "$f")"
    done
}

# --- 1. a job across hosts ------------------------------------------------------------------
echo "== 1. two hosts, one worker each, $STEPS steps"
job plain "$STEPS" 1
finish 240 "$C" "run 1's coordinator"
finish 30 "$A1" "run 1's agent on host 1"
finish 30 "$A2" "run 1's agent on host 2"
grep -q "every worker finished steps=$STEPS" "$WORK/plain-coordinator.log" || fail "run 1 did not finish"
echo "   done"

# --- 2. the same job, host 2 cut off mid-run ----------------------------------------------------
echo "== 2. the same job; host 2's link is cut after the first checkpoint"
job cut "$STEPS" 1 --metrics-listen 10.77.0.1:9401
wait_for 240 "$WORK/cut-coordinator.log" "checkpoint complete step=$EVERY "
ip -n "$NS-h2" link set eth0 down
CUT=$SECONDS
echo "   link of host 2 down"
# Both sides name rank 1 (host 2's worker) within the peer timeout (plus the time to log it).
LIMIT=$((PEER_TIMEOUT + 6))
wait_for "$LIMIT" "$WORK/cut-coordinator.log" "ERROR.*rank 1 .*failed"
echo "   coordinator named rank 1 after $((SECONDS - CUT)) s (peer timeout $PEER_TIMEOUT s)"
wait_for "$LIMIT" "$WORK/cut-agent1.log" "^\[rank 0\].*ERROR.*rank 1"
echo "   the worker on host 1 named rank 1 after $((SECONDS - CUT)) s"
# Keep the link down a while longer: host 2's worker times out too and is restarted; it waits
# for the coordinator until the link is back.
sleep 3
# Prometheus's view meanwhile: the coordinator's across the network (a restart, the next
# generation waiting), and host 1's agent's on its loopback (its worker restarted).
coordinator_metrics=$(scrape h1 http://10.77.0.1:9401/metrics) ||
    fail "host 1 could not read the coordinator's /metrics"
grep -Eq '^alexnet_restarts_total\{job_id="cut"\} [1-9]' <<<"$coordinator_metrics" ||
    fail "the coordinator's /metrics does not count the restart: $coordinator_metrics"
grep -Eq '^alexnet_job_state\{job_id="cut",state="waiting"\} 1' <<<"$coordinator_metrics" ||
    fail "the coordinator's /metrics does not show the next generation waiting"
scrape h1 http://127.0.0.1:9402/metrics |
    grep -Eq '^alexnet_agent_worker_restarts_total\{job_id="cut",host="[^"]*",rank="0"\} [1-9]' ||
    fail "host 1's agent's /metrics does not count its worker's restart"
echo "   /metrics: the coordinator counts the restart, host 1's agent its worker's"
sleep 7
ip -n "$NS-h2" link set eth0 up
echo "   link of host 2 up after $((SECONDS - CUT)) s"
finish 240 "$C" "run 2's coordinator"
finish 30 "$A1" "run 2's agent on host 1"
finish 30 "$A2" "run 2's agent on host 2"
grep -Eq "job started .*generation=1" "$WORK/cut-coordinator.log" || fail "no second generation started"
grep -q "every worker finished steps=$STEPS" "$WORK/cut-coordinator.log" || fail "run 2 did not finish"
grep -q "restarting it to rejoin" "$WORK/cut-agent2.log" || fail "host 2's agent did not restart its worker"
grep -Eq "resuming step=$EVERY|resuming step=$((2 * EVERY))" "$WORK/cut-agent2.log" ||
    fail "host 2's worker did not resume from a checkpoint"
echo "   what they said:"
grep -hE "ERROR|WARN" "$WORK/cut-coordinator.log" "$WORK/cut-agent1.log" "$WORK/cut-agent2.log" |
    grep -v "not on loopback" | cut -c1-300 | sed 's/^/     /'
same_params "$WORK/cut/params" "$WORK/plain/params"
echo "   resumed from the checkpoint; final parameters identical to run 1"

# --- 3. 2 replicas x 2 columns across hosts against one host --------------------------------------
STEPS3=6
echo "== 3. 2 replicas x 2 columns: across two hosts vs one host, $STEPS3 steps"
job wide "$STEPS3" 2 --replicas 2
finish 240 "$C" "run 3's coordinator"
finish 30 "$A1" "run 3's agent on host 1"
finish 30 "$A2" "run 3's agent on host 2"
ip netns exec "$NS-h0" "$BIN" launch --replicas 2 --steps "$STEPS3" --checkpoint-every "$EVERY" \
    --threads 1 --run-dir "$WORK/one-host" >"$WORK/one-host.log" 2>&1 || fail "the one-host run failed"
same_params "$WORK/wide/params" "$WORK/one-host/params"
echo "   identical parameters"

# --- 4. elastic replicas: a host lost for good, then back ---------------------------------------
STEPS4=10
EVERY4=2
echo "== 4. elastic replicas 3:4 on four hosts; host 3 is cut after the first checkpoint, then comes back"
on h0 elastic-coordinator --log-format text coordinator --listen "$COORD" --job-id elastic \
    --run-dir "$WORK/elastic" --steps "$STEPS4" --checkpoint-every "$EVERY4" --log-every 5 \
    --peer-timeout "$PEER_TIMEOUT" --rendezvous-timeout 120 --replicas 3:4 --batch 48 \
    --rejoin-timeout 5
C=$LAST
AGENTS=()
for i in 1 2 3 4; do
    on "h$i" "elastic-agent$i" agent --coordinator "$URL" --job-id elastic --node-rank $((i - 1)) \
        --workers 2 --threads 1 --out "$WORK/elastic/params" --rejoin-timeout 120
    AGENTS+=("$LAST")
done
LOG4="$WORK/elastic-coordinator.log"
wait_for 240 "$LOG4" "checkpoint complete step=$EVERY4 "
ip -n "$NS-h3" link set eth0 down
echo "   link of host 3 down"
wait_for 60 "$LOG4" "the world shrinks: 3 of 4 replicas: replica slot 2 \(ranks 4..5\) did not come whole"
wait_for 30 "$LOG4" "job started .*generation=1 workers=6 replicas=3"
echo "   generation 1 goes on with 3 replicas from step $(grep -oE 'generation=1 from_step=[0-9]+' "$LOG4" | cut -d= -f3)"
# The host was lost for good: its agent and workers (which end with it) are gone. It comes
# back as a rebooted host does: the link up, a new agent.
kill -9 "${AGENTS[2]}"
ip -n "$NS-h3" link set eth0 up
on h3 elastic-agent3-back agent --coordinator "$URL" --job-id elastic --node-rank 2 \
    --workers 2 --threads 1 --out "$WORK/elastic/params" --rejoin-timeout 120
AGENTS[2]=$LAST
echo "   host 3 back (link up, a new agent)"
finish 240 "$C" "run 4's coordinator"
for i in 0 1 2 3; do finish 30 "${AGENTS[$i]}" "run 4's agent on host $((i + 1))"; done
grep -Eq "replica slot 2 \([^)]*\) is back: the world grows from 3 to 4 replicas from the checkpoint at step [0-9]+" "$LOG4" ||
    fail "host 3's replica did not rejoin at a checkpoint"
grep -Eq "job started .*generation=2 workers=8 replicas=4" "$LOG4" || fail "no 4-replica generation after the return"
grep -q "every worker finished steps=$STEPS4" "$LOG4" || fail "run 4 did not finish"
for slot in 4 5; do
    grep -q "the worker of slot $slot waits for the next generation" "$LOG4" ||
        fail "host 3's worker of slot $slot did not wait for the next generation"
done
# The regroup is no failure: the other hosts' agents restart their workers without counting
# it (each counted one restart per worker, for the cut).
for i in 1 2 4; do
    grep -q "the job regroups at a checkpoint" "$WORK/elastic-agent$i.log" ||
        fail "host $i's agent did not restart its workers for the regroup"
    counted=$(grep -c "restarting it to rejoin the job" "$WORK/elastic-agent$i.log" || true)
    ((counted <= 2)) || fail "host $i's agent counted $counted restarts (the regroup counted)"
done
grep -Eq "assigned job=elastic generation=2 world=8" "$WORK/elastic-agent3-back.log" ||
    fail "host 3's workers did not join generation 2"
echo "   what the coordinator said of the world:"
grep -hE "the world|waits for the next|generation [0-9]+ failed|job started" "$LOG4" |
    cut -c1-300 | sed 's/^/     /'
ip netns exec "$NS-h0" "$BIN" launch --replicas 4 --batch 48 --steps "$STEPS4" \
    --checkpoint-every "$EVERY4" --threads 1 --run-dir "$WORK/elastic-one-host" \
    >"$WORK/elastic-one-host.log" 2>&1 || fail "the uninterrupted 4-replica run failed"
close=$(python3 scripts/params-close.py "$WORK/elastic/params" "$WORK/elastic-one-host/params" 1e-6) ||
    fail "the elastic run's parameters are not within 1e-6 of the uninterrupted run's: $close"
echo "   against an uninterrupted 4-replica run: $close"
echo "== multi-host test passed"
