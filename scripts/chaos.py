#!/usr/bin/env python3
"""Faults on a seeded schedule against a real `alexnet launch`, ending with the parameters of
an uninterrupted run of the same job, byte for byte.

Usage: scripts/chaos.sh [--minutes M] [--seed S] [--multihost] [--faults K,...] [--alexnet BIN]
                        [--keep]

The job is the demo network, long enough to outlast the schedule. While it trains, faults
drawn from the seed are injected one after another, each once the run trains again after the
previous one:

  kill-worker        SIGKILL of a worker: the launcher restarts the generation
  stop-worker        SIGSTOP of a worker for two peer timeouts, then SIGCONT: found silent
  pause-coordinator  SIGSTOP of the launcher (the coordinator) for three peer timeouts, then
                     SIGCONT: nobody is to blame and nothing restarts
  kill-coordinator   SIGKILL of the launcher (its workers go with it); the operator then runs
                     `alexnet launch --resume`
  damage-checkpoint  the newest complete checkpoint's shard truncated or altered, then a
                     worker killed: the restart must skip the damaged checkpoint
  disk-full          the run folder's file system (a small tmpfs this script mounts; needs
                     root) filled up: the run stops for an operator, who frees the space and
                     resumes
  kill-agent         (--multihost) SIGKILL of a host's agent (its workers go with it); the
                     operator (or systemd) starts it again
  cut-link           (--multihost) a host's link down for two peer timeouts, then up again

--multihost runs the job as tests/multihost.sh does: three network namespaces as hosts (needs
root and iproute2), `alexnet coordinator` on the first, an agent with one worker on each of
the others; the run folder is shared storage. After `kill-coordinator` (and `disk-full`) the
operator starts `alexnet coordinator --resume` and any agent that gave up.

When the schedule is over the run goes on to its end; then the same job runs once without
faults, and the final checkpoints are compared. A table gives, per fault, the time to
detection (the log line that reports it) and to recovery (the next training step), whether
the log blamed the right process, and the restarts used. The exit status is 0 only when the
parameters are byte-identical and every blame was right.
"""

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PEER_TIMEOUT = 3
CHECKPOINT_EVERY = 10
MAX_RESTARTS = 1000
HOSTS = ["10.78.0.1", "10.78.0.2", "10.78.0.3"]
KINDS = [
    "kill-worker",
    "stop-worker",
    "pause-coordinator",
    "kill-coordinator",
    "damage-checkpoint",
    "disk-full",
]
MULTIHOST_KINDS = ["kill-agent", "cut-link"]


class Proc:
    """One alexnet process (`launch`, `coordinator` or `agent`); its log lines, timed, as
    they come."""

    def __init__(self, cmd, log_path, env):
        self.log = open(log_path, "a")
        self.lines = []  # (monotonic time, line)
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.log.write(line + "\n")
            self.log.flush()
            with self.cond:
                self.lines.append((time.monotonic(), line))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_line(self, pred, start=0, timeout=120.0):
        """The first (index, time, line) from index `start` that satisfies `pred`, or None
        when the process ends or the timeout passes first."""
        deadline = time.monotonic() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    if pred(line):
                        return i, t, line
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and i >= len(self.lines)):
                    if self.proc.poll() is not None:
                        # The reader may still be draining the pipe.
                        self.cond.wait(0.5)
                        if i < len(self.lines):
                            continue
                    return None
                self.cond.wait(min(left, 0.5))

    def mark(self):
        with self.cond:
            return len(self.lines)

    def worker_pid(self, rank):
        """The pid of `rank` in the newest generation (from the coordinator's join lines)."""
        with self.cond:
            for _, line in reversed(self.lines):
                if "worker joined" in line and f"rank={rank} " in line:
                    m = re.search(r"pid=(\d+)", line)
                    if m:
                        return int(m.group(1))
        return None

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def is_step(line):
    return " train " in line and "step=" in line and "loss=" in line


def step_of(line):
    m = re.search(r"\bstep=(\d+)", line)
    return int(m.group(1)) if m else None


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone too.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def newest_complete(run):
    found = sorted(
        (int(d.name[5:]), d)
        for d in (run / "checkpoints").glob("step-*")
        if (d / "manifest.json").exists()
    )
    return found


def final_shards(run):
    found = newest_complete(run)
    if not found:
        return None, None
    step, d = found[-1]
    return step, [(d / f"column{c}.safetensors").read_bytes() for c in range(2)]


class Chaos:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        self.work = Path(a.work or tempfile.mkdtemp(prefix="alexnet-chaos-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, NO_COLOR="1", RUST_LOG="info")
        self.mounted = None
        self.results = []
        self.launches = 0
        self.running = []
        self.resumes = 0
        self.restarts = 0
        self.failures = []

    # --- the run folder, on a small file system when this process may mount one ------------
    def make_run_folder(self, checkpoint_bytes):
        disk = self.work / "disk"
        disk.mkdir(exist_ok=True)
        size = max(16 << 20, 8 * checkpoint_bytes + (8 << 20))
        if os.geteuid() == 0 and shutil.which("mount"):
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "alexnet-chaos", str(disk)],
                capture_output=True,
                text=True,
            )
            if r.returncode == 0:
                self.mounted = disk
            else:
                print(f"chaos: no small file system ({r.stderr.strip()}): disk-full left out")
        else:
            print("chaos: mounting a small file system needs root: disk-full left out")
        return disk / "run"

    def cleanup(self):
        # Whatever still runs (a failed schedule): the workers end with their launcher.
        for l in self.running:
            if l.proc.poll() is None:
                l.proc.kill()
                l.wait_exit(30)
        for n in getattr(self, "namespaces", []):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.mounted)], capture_output=True)
        if not self.a.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # --- runs ---------------------------------------------------------------------------------
    def job_args(self, steps):
        return [
            "--steps", str(steps),
            # The steps, not the demo job's epochs, say how long it runs.
            "--epochs", "100000",
            "--checkpoint-every", str(CHECKPOINT_EVERY),
        ] + self.launch_args()

    @staticmethod
    def launch_args():
        """How the launcher watches its workers: not part of the job, so given on resume too."""
        return [
            "--peer-timeout", str(PEER_TIMEOUT),
            "--max-restarts", str(MAX_RESTARTS),
            "--log-every", "1",
        ]

    def spawn(self, name, cmd):
        self.launches += 1
        p = Proc(cmd, self.work / f"{self.launches:02d}-{name}.log", self.env)
        self.running.append(p)
        return p

    def start(self, args):
        """A single-host run: `alexnet launch ARGS`."""
        return self.spawn("launch", [self.a.alexnet, "--log-format", "text", "launch", *args])

    def start_run(self, steps):
        """The run under faults; returns the process whose log has the coordinator's lines."""
        if not self.a.multihost:
            return self.start(self.job_args(steps) + ["--run-dir", str(self.run)])
        self.agents = [None, None]
        c = self.start_coordinator(["--run-dir", str(self.run)] + self.job_args(steps))
        for i in range(2):
            self.start_agent(i)
        return c

    def on(self, host, name, args):
        return self.spawn(
            name,
            ["ip", "netns", "exec", f"{self.ns}-{host}", self.a.alexnet, "--log-format", "text",
             *args],
        )

    def start_coordinator(self, args):
        return self.on(
            "h0",
            "coordinator",
            ["coordinator", "--listen", f"{HOSTS[0]}:50051", "--job-id", "chaos",
             "--rendezvous-timeout", "120", *args],
        )

    def start_agent(self, i):
        self.agents[i] = self.on(
            f"h{i + 1}",
            f"agent{i + 1}",
            ["agent", "--coordinator", f"http://{HOSTS[0]}:50051", "--job-id", "chaos",
             "--node-rank", str(i), "--workers", "1", "--threads", "1",
             "--out", str(self.run / "params"), "--rejoin-timeout", "120",
             "--max-restarts", str(MAX_RESTARTS)],
        )

    def resume(self, wait_agents=False):
        """What an operator does after the launcher or coordinator died or stopped: resume
        the run (and, across hosts, start again any agent that gave up)."""
        self.resumes += 1
        if not self.a.multihost:
            return self.start(["--resume", str(self.run)] + self.launch_args())
        if wait_agents:
            # An agent whose workers heard that the job is over ends; one whose worker failed
            # first (its peer gone) restarts it, and the worker waits for a coordinator to
            # come back (--rejoin-timeout): it rejoins the resumed run by itself.
            deadline = time.monotonic() + 5
            for a in self.agents:
                a.wait_exit(max(deadline - time.monotonic(), 0.1))
        c = self.start_coordinator(["--resume", str(self.run)] + self.launch_args())
        for i, a in enumerate(self.agents):
            if a.proc.poll() is not None:
                self.start_agent(i)
        return c

    @property
    def restart_line(self):
        """The coordinator's line when it starts the next generation."""
        return "waiting for the workers to rejoin" if self.a.multihost else "restarting the workers"

    # --- hosts: network namespaces on a bridge, as tests/multihost.sh --------------------------
    def make_hosts(self):
        if os.geteuid() != 0 or not shutil.which("ip"):
            sys.exit("chaos: --multihost needs root and iproute2 (network namespaces)")
        self.ns = f"axc{os.getpid()}"
        sw = f"{self.ns}-sw"
        ip = lambda *a: subprocess.run(["ip", *a], check=True)
        ip("netns", "add", sw)
        self.namespaces = [sw]
        ip("-n", sw, "link", "add", "br0", "type", "bridge")
        ip("-n", sw, "link", "set", "br0", "up")
        for i, addr in enumerate(HOSTS):
            h = f"{self.ns}-h{i}"
            ip("netns", "add", h)
            self.namespaces.append(h)
            ip("link", "add", "eth0", "netns", h, "type", "veth", "peer", "name", f"p{i}",
               "netns", sw)
            ip("-n", sw, "link", "set", f"p{i}", "master", "br0", "up")
            ip("-n", h, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", h, "link", "set", "eth0", "up")
            ip("-n", h, "link", "set", "lo", "up")

    def calibrate(self):
        """Seconds per step of the demo job on this machine, and one checkpoint's bytes."""
        run = self.work / "calibrate"
        t = time.monotonic()
        l = self.start(self.job_args(2 * CHECKPOINT_EVERY) + ["--run-dir", str(run)])
        first = l.wait_line(is_step, timeout=300)
        if first is None or l.wait_exit(300) != 0:
            sys.exit(f"chaos: the calibration run failed; see {self.work}")
        last = l.wait_line(lambda s: is_step(s) and step_of(s) == 2 * CHECKPOINT_EVERY)
        per_step = max((last[1] - first[1]) / (2 * CHECKPOINT_EVERY - 1), 1e-3)
        _, shards = final_shards(run)
        size = sum(len(s) for s in shards)
        shutil.rmtree(run, ignore_errors=True)
        return per_step, size, time.monotonic() - t

    # --- faults ---------------------------------------------------------------------------
    def draw(self, kinds):
        kind = self.rng.choice(kinds)
        rank = self.rng.randrange(2)
        delay = self.rng.uniform(2.0, 8.0)
        return kind, rank, delay

    def record(self, kind, target, t0, detected, recovered, blame, outcome):
        self.results.append(
            dict(
                kind=kind,
                target=target,
                at=t0 - self.t_start,
                detected=None if detected is None else detected - t0,
                recovered=None if recovered is None else recovered - t0,
                blame=blame,
                outcome=outcome,
            )
        )

    def wait_training(self, l, start):
        """Waits until `l` trains (a step line from index `start`); the line's time."""
        hit = l.wait_line(is_step, start=start, timeout=180)
        return None if hit is None else hit[1]

    def restarted(self, l, mark, rank, t0, kind):
        """After a worker fault: the coordinator's report, the restart, the next step."""
        hit = l.wait_line(lambda s: "aborting generation" in s, start=mark, timeout=60)
        if hit is not None and l.wait_line(
            lambda s: "no restarts left" in s, start=hit[0], timeout=2
        ):
            # More failures than --max-restarts: the job fails by design; the operator resumes.
            l.wait_exit(60)
            self.record(
                kind, f"rank {rank}", t0, hit[1], None, "-",
                "beyond --max-restarts (by design): resumed by the operator",
            )
            return self.resume()
        if hit is None and l.proc.poll() == 0:
            self.record(kind, f"rank {rank}", t0, None, None, "-", "missed: the run had ended")
            return l
        if hit is None:
            self.record(kind, f"rank {rank}", t0, None, None, "-", "not detected")
            self.failures.append(f"{kind} of rank {rank} was not detected")
            return l
        i, t_det, line = hit
        blame = "right" if f"rank {rank} (" in line else "WRONG"
        if blame == "WRONG":
            self.failures.append(f"{kind} of rank {rank} blamed: {line}")
        r = l.wait_line(lambda s: self.restart_line in s, start=i, timeout=60)
        if r is None:
            self.record(kind, f"rank {rank}", t0, t_det, None, blame, "no restart")
            self.failures.append(f"{kind} of rank {rank}: no restart followed")
            return l
        self.restarts += 1
        rec = l.wait_line(is_step, start=r[0], timeout=180)
        self.record(
            kind, f"rank {rank}", t0, t_det, rec and rec[1], blame, "restarted"
        )
        return l

    def inject(self, l, kind, rank, steps):
        mark = l.mark()
        t0 = time.monotonic()
        run = self.run
        if kind == "kill-worker":
            os.kill(l.worker_pid(rank), signal.SIGKILL)
            l = self.restarted(l, mark, rank, t0, kind)
        elif kind == "stop-worker":
            pid = l.worker_pid(rank)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(2 * PEER_TIMEOUT)
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            l = self.restarted(l, mark, rank, t0, kind)
        elif kind == "pause-coordinator":
            os.kill(l.proc.pid, signal.SIGSTOP)
            time.sleep(3 * PEER_TIMEOUT)
            os.kill(l.proc.pid, signal.SIGCONT)
            hit = l.wait_line(
                lambda s: "the coordinator itself was not running" in s, start=mark, timeout=30
            )
            rec = l.wait_line(is_step, start=hit[0] if hit else mark, timeout=60)
            aborted = l.wait_line(lambda s: "aborting generation" in s, start=mark, timeout=0)
            blame = "right" if aborted is None else "WRONG"
            if aborted is not None:
                self.failures.append(f"pause-coordinator blamed: {aborted[2]}")
            self.record(
                kind, "coordinator", t0, hit and hit[1], rec and rec[1], blame,
                "no one blamed" if aborted is None else "generation aborted",
            )
        elif kind == "kill-coordinator":
            pids = [l.worker_pid(r) for r in range(2)]
            os.kill(l.proc.pid, signal.SIGKILL)
            l.wait_exit(30)
            # The workers end with their launcher (parent-death signal); across hosts their
            # agents restart them, and they wait for the coordinator to come back.
            deadline = time.monotonic() + 30
            while not self.a.multihost and not all(p is None or gone(p) for p in pids):
                if time.monotonic() > deadline:
                    self.failures.append(f"workers {pids} outlived their launcher")
                    break
                time.sleep(0.1)
            t_det = time.monotonic()
            l = self.resume()
            rec = self.wait_training(l, 0)
            self.record(kind, "coordinator", t0, t_det, rec, "-", "resumed by the operator")
        elif kind == "damage-checkpoint":
            complete = newest_complete(run)
            if len(complete) < 2:
                return l, False
            step, d = complete[-1]
            shard = d / f"column{rank}.safetensors"
            data = shard.read_bytes()
            if self.rng.random() < 0.5:
                shard.write_bytes(data[: len(data) // 2])
                how = "truncated"
            else:
                b = bytearray(data)
                b[-1] ^= 0xFF
                shard.write_bytes(bytes(b))
                how = "altered"
            os.kill(l.worker_pid(1 - rank), signal.SIGKILL)
            hit = l.wait_line(
                lambda s: self.restart_line in s, start=mark, timeout=60
            )
            if hit is None:
                self.record(kind, f"step {step}", t0, None, None, "-", "not detected")
                self.failures.append(f"damage-checkpoint at step {step}: no restart")
                return l, True
            self.restarts += 1
            m = re.search(r"from_step=(\d+)", hit[2])
            from_step = int(m.group(1)) if m else None
            skipped = l.wait_line(
                lambda s: "skipping checkpoint" in s and f"step-{step:09d}" in s,
                start=mark,
                timeout=0,
            )
            rec = l.wait_line(is_step, start=hit[0], timeout=180)
            if from_step is not None and from_step < step:
                blame = "right" if skipped else "WRONG"
                outcome = f"{how} shard skipped, resumed at {from_step}"
            else:
                # A newer checkpoint completed before the restart: the damage was never read.
                blame, outcome = "-", f"{how} shard unread (newer checkpoint at {from_step})"
            if blame == "WRONG":
                self.failures.append(f"damage-checkpoint at step {step}: no warning named it")
            self.record(
                kind, f"step {step} col {rank}", t0, skipped and skipped[1],
                rec and rec[1], blame, outcome,
            )
        elif kind == "disk-full":
            filler = self.mounted / "filler"
            keep = self.checkpoint_bytes // 4
            # The run writes checkpoints meanwhile: a fill sized from a stale look at the free
            # space fails as a whole (fallocate reserves all or nothing), so look again.
            for _ in range(50):
                st = os.statvfs(run)
                free = st.f_bavail * st.f_frsize
                r = subprocess.run(
                    ["fallocate", "-l", str(max(free - keep, 1)), str(filler)],
                    capture_output=True,
                )
                if r.returncode == 0:
                    break
                time.sleep(0.02)
            else:
                self.failures.append("disk-full: the run folder could not be filled")
            hit = l.wait_line(
                lambda s: "the disk of the run folder" in s and "needs" in s,
                start=mark,
                timeout=120,
            )
            code = l.wait_exit(60)
            restarted = l.wait_line(lambda s: self.restart_line in s, start=mark, timeout=0)
            blame = "right" if hit and restarted is None and code not in (None, 0) else "WRONG"
            if blame == "WRONG":
                self.failures.append(
                    f"disk-full: message={bool(hit)} restarted={bool(restarted)} exit={code}"
                )
            filler.unlink()
            t_det = hit[1] if hit else None
            if code is None:
                l.proc.kill()
                l.wait_exit(30)
            l = self.resume(wait_agents=True)
            rec = self.wait_training(l, 0)
            self.record(
                kind, "run folder", t0, t_det, rec, blame,
                "stopped for the operator, resumed" if blame == "right" else "see the log",
            )
        elif kind == "kill-agent":
            agent = self.agents[rank]
            os.kill(agent.proc.pid, signal.SIGKILL)
            agent.wait_exit(30)
            # The operator (or systemd's Restart=) starts it again.
            time.sleep(1)
            self.start_agent(rank)
            l = self.restarted(l, mark, rank, t0, kind)
        elif kind == "cut-link":
            host = f"{self.ns}-h{rank + 1}"
            subprocess.run(["ip", "-n", host, "link", "set", "eth0", "down"], check=True)
            time.sleep(2 * PEER_TIMEOUT + 2)
            subprocess.run(["ip", "-n", host, "link", "set", "eth0", "up"], check=True)
            l = self.restarted(l, mark, rank, t0, kind)
        return l, True

    # --- the whole thing ------------------------------------------------------------------------
    def go(self):
        a = self.a
        per_step, ckpt_bytes, calib_s = self.calibrate()
        self.checkpoint_bytes = ckpt_bytes
        # The schedule lasts `minutes`; the job is sized to outlast it (faults cost time too).
        steps = max(3 * CHECKPOINT_EVERY, int(a.minutes * 60 / per_step * 0.6))
        steps = (steps // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
        print(
            f"chaos: seed {a.seed}, {a.minutes} min of faults; the demo job at "
            f"{per_step * 1000:.0f} ms/step runs {steps} steps; work folder {self.work}",
            flush=True,
        )
        self.run = self.make_run_folder(ckpt_bytes)
        if a.multihost:
            self.make_hosts()
            self.env["ALEXNET_TOKEN"] = f"chaos-token-{os.getpid()}"
        kinds = [k for k in a.faults.split(",") if k != "disk-full" or self.mounted]
        if not kinds:
            sys.exit("chaos: no fault left to inject")
        self.t_start = time.monotonic()
        end = self.t_start + a.minutes * 60
        # The same job, undisturbed, beside it (on this machine's other cores, or sharing
        # them: only the bits are compared).
        quiet_run = self.work / "quiet"
        quiet = self.start(self.job_args(steps) + ["--run-dir", str(quiet_run)])
        l = self.start_run(steps)
        if self.wait_training(l, 0) is None:
            sys.exit(f"chaos: the run did not start; see {self.work}")
        n = 0
        while time.monotonic() < end and l.proc.poll() is None:
            kind, rank, delay = self.draw(kinds)
            time.sleep(delay)
            if time.monotonic() >= end or l.proc.poll() is not None:
                break
            # Faults only while the run trains, not while it restarts, and not in its last
            # steps (a fault on a run that has just ended finds nothing to hit).
            mark = l.mark()
            t = self.wait_training(l, mark)
            if t is None:
                break
            last = l.wait_line(is_step, start=l.mark() - 1, timeout=5)
            if last is not None and step_of(last[2]) > steps - 3 * CHECKPOINT_EVERY:
                break
            n += 1
            print(f"chaos: fault {n}: {kind} (rank {rank})", flush=True)
            try:
                l, _ = self.inject(l, kind, rank, steps)
            except (ProcessLookupError, TypeError):
                # The process was gone already (the run had just ended): nothing injected.
                print(f"chaos: fault {n} missed: the run had ended", flush=True)
        code = l.wait_exit(max(600, 4 * steps * per_step))
        wall = time.monotonic() - self.t_start
        if code != 0:
            self.failures.append(f"the run ended with exit status {code}")
        got_step, got = final_shards(self.run)
        if quiet.wait_exit(max(600, 4 * steps * per_step)) != 0:
            self.failures.append("the quiet run failed")
        ref_step, ref = final_shards(quiet_run)
        identical = got is not None and got_step == ref_step and got == ref
        if not identical:
            self.failures.append(
                f"final parameters differ (step {got_step} against the quiet run's {ref_step})"
            )
        self.report(steps, wall, identical)
        return not self.failures

    def report(self, steps, wall, identical):
        fmt = lambda v: "-" if v is None else f"{v:.1f}"
        print()
        print(f"{'fault':<19} {'at s':>6}  {'target':<16} {'detect s':>8} {'recover s':>9}  {'blame':<6} outcome")
        for r in self.results:
            print(
                f"{r['kind']:<19} {r['at']:>6.1f}  {r['target']:<16} {fmt(r['detected']):>8} "
                f"{fmt(r['recovered']):>9}  {r['blame']:<6} {r['outcome']}"
            )
        counts = {}
        for r in self.results:
            counts[r["kind"]] = counts.get(r["kind"], 0) + 1
        print()
        print("faults by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        print(f"restarts used: {self.restarts} (of --max-restarts {MAX_RESTARTS})")
        print(f"operator resumes: {self.resumes}")
        print(f"wall time of the run under faults: {wall:.0f} s ({steps} steps)")
        print(
            "final parameters against an uninterrupted run: "
            + ("byte-identical" if identical else "DIFFERENT")
        )
        for f in self.failures:
            print(f"FAIL: {f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="how long faults are injected")
    ap.add_argument("--seed", type=int, default=1, help="the schedule's seed")
    ap.add_argument(
        "--alexnet",
        default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "alexnet"),
        help="the binary (default: target/release/alexnet)",
    )
    ap.add_argument(
        "--faults",
        help="the kinds to draw from, comma-separated (default: all; kill-agent and cut-link "
        "with --multihost)",
    )
    ap.add_argument("--work", help="work folder (default: a new one under $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder and its logs")
    ap.add_argument(
        "--multihost",
        action="store_true",
        help="hosts in network namespaces: a coordinator and two agents (needs root)",
    )
    a = ap.parse_args()
    known = KINDS + (MULTIHOST_KINDS if a.multihost else [])
    if a.faults is None:
        a.faults = ",".join(known)
    unknown = set(a.faults.split(",")) - set(known)
    if unknown:
        sys.exit(f"chaos: unknown fault(s) {sorted(unknown)}: the kinds are {', '.join(known)}")
    if not os.access(a.alexnet, os.X_OK):
        sys.exit(f"chaos: no alexnet binary at {a.alexnet}: build it first, or pass --alexnet")
    c = Chaos(a)
    ok = False
    try:
        ok = c.go()
    finally:
        if not ok:
            c.a.keep = True
            print(f"chaos: logs kept in {c.work}")
        c.cleanup()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
