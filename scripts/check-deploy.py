#!/usr/bin/env python3
"""Keeps the deployment recipes in deploy/ in step with the alexnet command line.

    scripts/check-deploy.py [--alexnet PATH] [--skip-missing-linters] [--kubernetes-version V]

PATH defaults to target/debug/alexnet. Needs Python 3.11+ and PyYAML (yamllint brings it).

1. Finds every alexnet command line in deploy/: in shell scripts (*.sbatch, *.sh), systemd units
   (Exec* lines), Dockerfiles (ENTRYPOINT + CMD, RUN), Compose files (entrypoint + command) and
   Kubernetes workloads (command + args; the image's ENTRYPOINT when command is absent), looking
   into `sh -c SCRIPT` / `bash -c SCRIPT` wherever they appear. A recipe file that yields no
   command, or a file in deploy/ of a kind this script does not know, is an error: a refactor
   cannot silently drop a recipe from the check.
2. Substitutes variables (shell $VAR, ${VAR:-default}, $(cmd); Kubernetes $(VAR); systemd
   ${VAR}, $VAR and %i-style specifiers; Compose ${VAR:-default}) from the recipe's own
   environment (a systemd unit's EnvironmentFile example, a container's env, a script's
   assignments) and from SAMPLES below. A variable with no value is an error: add new ones to
   SAMPLES on purpose.
3. Runs `alexnet --dry-run ARGS...` for each, with an environment of PATH plus the ALEXNET_*
   variables the recipe sets, and validates the job files that ConfigMaps carry with
   `alexnet --dry-run coordinator --config FILE`.
4. Cross-checks what must agree between files (job ids, world size and replicas, the
   coordinator's Service, Kustomize's resource list, the Dockerfile's build stage and the files
   the build reads) and that no recipe holds a literal token.
5. Runs the batch scripts (*.sbatch) as Slurm would, with srun and alexnet stood in for, and
   checks what they start: the replicas, one agent per node rank, the token file, a requeue.
6. Checks the monitoring: the Prometheus configuration (deploy/prometheus/prometheus.yml: its
   rule_files must exist and load every rule file beside it, its alexnet targets use the
   recipes' metrics ports), the Grafana dashboards (deploy/grafana/*.json: JSON, unique panel
   ids, a datasource and PromQL targets on every panel, template variables that exist, the
   job_id variable), and that every metric name in these files and in the alert rules is one the
   exporter serves (METRICS). In the recipes: --metrics-listen on every coordinator (agent)
   command line of a file or on none, at the conventional port; in Kubernetes, the scrape
   annotations and metrics port of each pod that serves metrics, off loopback, and the
   Prometheus operator's monitors (kept out of kustomization.yaml) against the Services, pods
   and ports they select.
7. Runs shellcheck (on the scripts in deploy/ and scripts/, and on the scripts embedded in
   units, containers and services), yamllint, kubernetes-validate, check-jsonschema's Compose
   schema and promtool (`check config`, `check rules`, `test rules`; a missing one is an error
   unless --skip-missing-linters), and hadolint, `systemd-analyze verify` and `kubectl
   kustomize` where they are installed.

Shell parsing is deliberately simple (one command per logical line, shlex quoting): the
launcher in front of alexnet (exec, srun, env, ...) must take its options in the --opt=value
form, and heredocs are not understood.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# Sample values for variables that recipes take from outside: what Slurm, Kubernetes or the
# user set, and what a script computes in ways this checker does not evaluate (arithmetic).
SAMPLES = {
    # Slurm (deploy/slurm/alexnet.sbatch)
    "SLURM_JOB_ID": "123456",
    "SLURM_NODEID": "1",
    # computed by deploy/slurm/alexnet.sbatch with $((...)) or nested expansions
    "PORT": "23456",
    "GPUS_PER_NODE": "4",
    "REPLICAS": "4",
    # Kubernetes: the Indexed Job's completion index, and the token from its Secret
    "JOB_COMPLETION_INDEX": "0",
    "ALEXNET_TOKEN": "0123456789abcdef-sample-token",
}
# Command substitutions $(...) by their text.
COMMAND_SAMPLES = {
    "hostname": "node001",
    "hostname -f": "node001.cluster.example",
}
# systemd specifiers: %i the instance (an agent's node rank), %H the host name.
SYSTEMD_SPECIFIERS = {
    "i": "1",
    "I": "1",
    "H": "node001",
    "l": "node001",
    "%": "%",
}
# Linters are run against this Kubernetes version's schemas.
KUBERNETES_VERSION = "1.30.0"

# Every metric the exporter serves (--metrics-listen): the alert rules, the scrape configuration
# and the dashboards may name no other. tests/ checks the same list against a live exporter:
# change both together.
METRICS = {
    # The coordinator; every series has the label job_id.
    "alexnet_info",
    "alexnet_job_state",
    "alexnet_step",
    "alexnet_total_steps",
    "alexnet_epoch",
    "alexnet_train_loss",
    "alexnet_train_top1_error_ratio",
    "alexnet_train_top5_error_ratio",
    "alexnet_validation_loss",
    "alexnet_validation_top1_error_ratio",
    "alexnet_validation_top5_error_ratio",
    "alexnet_images_per_second",
    "alexnet_learning_rate",
    "alexnet_eta_seconds",
    "alexnet_generation",
    "alexnet_restarts_total",
    "alexnet_restarts_left",
    "alexnet_workers_expected",
    "alexnet_replicas",
    "alexnet_replicas_max",
    "alexnet_workers_joined",
    "alexnet_workers_lost",
    "alexnet_last_checkpoint_step",
    "alexnet_checkpoint_age_seconds",
    # The coordinator, per rank (job_id, rank, replica, column, host).
    "alexnet_worker_heartbeat_age_seconds",
    "alexnet_worker_step",
    "alexnet_worker_images_per_second",
    "alexnet_worker_column_exchange_share_ratio",
    "alexnet_worker_replica_exchange_share_ratio",
    "alexnet_worker_column_exchange_sent_bytes_total",
    "alexnet_worker_replica_exchange_sent_bytes_total",
    "alexnet_worker_resident_memory_bytes",
    "alexnet_worker_up",
    # An agent (job_id, host; per worker also rank).
    "alexnet_agent_workers",
    "alexnet_agent_worker_running",
    "alexnet_agent_worker_restarts_total",
    "alexnet_agent_restarts_left",
}
# The recipes' --metrics-listen ports, which deploy/prometheus and the alerts' texts assume.
METRICS_PORTS = {"coordinator": 9401, "agent": 9402}

SHELLS = {"sh", "bash", "dash"}
# Words that run the command after their options (options as --opt=value).
LAUNCHERS = {"exec", "srun", "env", "nohup", "setsid", "stdbuf", "numactl", "taskset", "time", "tini", "dumb-init"}
SHELL_OPS = {";", "&", "&&", "||", "|", "|&", ";;", ";&", ";;&"}
REDIRECTS = {">", ">>", "<", "<<", "<<<", ">&", "<&", ">|", "&>", "&>>", "<>"}
KEYWORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "{", "}", "time"}
ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
WORKLOADS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
TOKEN_VARS = {"ALEXNET_TOKEN"}


class CheckError(Exception):
    pass


class Unresolved(Exception):
    pass


@dataclass
class Command:
    where: str
    argv: list[str]
    env: dict[str, str]


@dataclass
class Report:
    commands: list[Command] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    manifests_valid: int = 0
    notes: list[str] = field(default_factory=list)
    # (shell, where, text) of scripts embedded in units, containers and compose services
    embedded_scripts: list[tuple[str, str, str]] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        print(f"FAIL {msg}")


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def basename(word: str) -> str:
    return word.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------
# Shell


class Scope:
    """A shell's variables: the environment it starts with, and its own assignments (a value of
    None: assigned in a way this checker does not evaluate)."""

    def __init__(self, env: dict[str, str] | None = None):
        self.vars: dict[str, str | None] = dict(env or {})
        self.exported: set[str] = set(env or {})
        # Assigned but not exported by the parent shell: unset in a child shell.
        self.hidden: set[str] = set()

    def child(self) -> "Scope":
        s = Scope({k: v for k, v in self.vars.items() if k in self.exported and v is not None})
        s.hidden = {k for k in self.vars if k not in self.exported}
        return s

    def lookup(self, name: str, default: str | None, colon: bool) -> str:
        if name in self.hidden:
            raise CheckError(f"${name} is set by the outer script but not exported to this one")
        v = self.vars.get(name)
        if v is not None and not (colon and v == "" and default is not None):
            return v
        if default is not None:
            return self.subst(default)
        if name in SAMPLES:
            return SAMPLES[name]
        raise Unresolved(f"${name}")

    def subst(self, word: str) -> str:
        """Expands $VAR, ${VAR}, ${VAR:-default}, ${VAR-default} and $(cmd) in one word."""
        out, i = [], 0
        while i < len(word):
            c = word[i]
            if c != "$" or i + 1 == len(word):
                out.append(c)
                i += 1
                continue
            nxt = word[i + 1]
            if nxt == "{":
                depth, j = 1, i + 2
                while j < len(word) and depth:
                    depth += {"{": 1, "}": -1}.get(word[j], 0)
                    j += 1
                if depth:
                    raise Unresolved(word[i:])
                inner = word[i + 2 : j - 1]
                m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?)-(.*))?", inner, re.S)
                if not m:
                    raise Unresolved(f"${{{inner}}}")
                out.append(self.lookup(m.group(1), m.group(3), bool(m.group(2))))
                i = j
            elif word.startswith("$((", i):
                raise Unresolved("$((...)) arithmetic")
            elif nxt == "(":
                depth, j = 1, i + 2
                while j < len(word) and depth:
                    depth += {"(": 1, ")": -1}.get(word[j], 0)
                    j += 1
                cmd = word[i + 2 : j - 1].strip()
                if cmd not in COMMAND_SAMPLES:
                    raise Unresolved(f"$({cmd})")
                out.append(COMMAND_SAMPLES[cmd])
                i = j
            else:
                m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", word[i + 1 :])
                if not m:
                    raise Unresolved(f"${nxt}")
                out.append(self.lookup(m.group(0), None, False))
                i += 1 + m.end()
        return "".join(out)

    def try_subst(self, word: str) -> str | None:
        try:
            return self.subst(word)
        except (Unresolved, CheckError):
            return None

    def strict(self, word: str, where: str) -> str:
        try:
            return self.subst(word)
        except Unresolved as e:
            raise CheckError(
                f"{where}: no value for {e} in `{word}`: give it one in the recipe, or add a sample "
                f"to SAMPLES / COMMAND_SAMPLES in scripts/check-deploy.py"
            ) from None
        except CheckError as e:
            raise CheckError(f"{where}: {e}") from None

    def assign(self, name: str, value: str) -> None:
        self.vars[name] = self.try_subst(value)


def tokenize(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def logical_lines(text: str, where: str):
    """(line number, tokens) per logical line: backslash continuations and quotes spanning lines
    joined."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        start, buf = i, lines[i]
        while True:
            trailing = len(buf) - len(buf.rstrip("\\"))
            if trailing % 2 == 1 and not buf.lstrip().startswith("#") and i + 1 < len(lines):
                buf = buf[:-1] + " " + lines[i + 1]
                i += 1
                continue
            try:
                tokens = tokenize(buf)
                break
            except ValueError:
                if i + 1 >= len(lines):
                    raise CheckError(f"{where}:{start + 1}: unbalanced quotes") from None
                buf += "\n" + lines[i + 1]
                i += 1
        yield start + 1, tokens
        i += 1


def strip_redirections(words: list[str]) -> list[str]:
    out, k = [], 0
    while k < len(words):
        if words[k] in REDIRECTS:
            if out and out[-1].isdigit():
                out.pop()  # an fd number: 2>&1
            k += 2
            continue
        out.append(words[k])
        k += 1
    return out


def shell_script(text: str, where: str, line0: int, scope: Scope, report: Report) -> list[Command]:
    """Every alexnet command line of a shell script."""
    found: list[Command] = []
    for line, tokens in logical_lines(text, where):
        loc = f"{where}:{line0 + line - 1}" if line0 else f"{where} (script line {line})"
        words: list[str] = []
        for t in tokens + [";"]:
            if t in SHELL_OPS:
                found += simple_command(words, loc, scope, report)
                words = []
            elif not words and t in KEYWORDS:
                continue
            else:
                words.append(t)
    return found


def simple_command(words: list[str], loc: str, scope: Scope, report: Report) -> list[Command]:
    if not words:
        return []
    k, inline = 0, {}
    while k < len(words) and ASSIGN.match(words[k]):
        k += 1
    assignments = [ASSIGN.match(w).groups() for w in words[:k]]
    if k == len(words):  # NAME=value ...: the shell's own variables
        for name, value in assignments:
            scope.assign(name, value)
        return []
    inline = {n: v for n, v in assignments}
    cmd = words[k]
    if cmd in ("export", "declare", "readonly", "local"):
        for w in words[k + 1 :]:
            m = ASSIGN.match(w)
            if m:
                scope.assign(*m.groups())
                if cmd == "export":
                    scope.exported.add(m.group(1))
            elif cmd == "export" and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", w):
                scope.exported.add(w)
        return []
    while basename(cmd) in LAUNCHERS:
        launcher = basename(cmd)
        k += 1
        while k < len(words) and (
            words[k].startswith("-") or (launcher == "env" and ASSIGN.match(words[k]))
        ):
            if launcher == "env" and ASSIGN.match(words[k]):
                n, v = ASSIGN.match(words[k]).groups()
                inline[n] = v
            k += 1
        if k == len(words):
            return []
        cmd = words[k]
    resolved = scope.try_subst(cmd) or cmd
    if basename(resolved) == "alexnet":
        args = [scope.strict(w, loc) for w in strip_redirections(words[k + 1 :])]
        env = {
            n: scope.strict(f"${n}", loc)
            for n in sorted(scope.exported)
            if n.startswith("ALEXNET_") and n in scope.vars
        }
        env.update({n: scope.strict(v, loc) for n, v in inline.items() if n.startswith("ALEXNET_")})
        return [Command(loc, args, env)]
    if basename(resolved) in SHELLS:
        rest = words[k + 1 :]
        for j, w in enumerate(rest):
            if re.fullmatch(r"-[a-z]*c[a-z]*", w) and j + 1 < len(rest):
                child = scope.child()
                for n, v in inline.items():
                    child.vars[n] = child.try_subst(v)
                    child.exported.add(n)
                report.embedded_scripts.append((basename(resolved), loc, rest[j + 1]))
                return shell_script(rest[j + 1], loc, 0, child, report)
    return []


def run_argv(
    argv: list[str], loc: str, env: dict[str, str], report: Report, entry: str = "command"
) -> list[Command]:
    """A process's argv (already substituted): alexnet itself, or a shell running a script."""
    while argv and basename(argv[0]) in LAUNCHERS:
        argv = argv[1:]
        while argv and argv[0].startswith("-"):
            argv = argv[1:]
    if not argv:
        raise CheckError(f"{loc}: empty {entry}")
    if basename(argv[0]) == "alexnet":
        return [Command(loc, argv[1:], {k: v for k, v in env.items() if k.startswith("ALEXNET_")})]
    if basename(argv[0]) in SHELLS:
        for j, w in enumerate(argv[1:], 1):
            if re.fullmatch(r"-[a-z]*c[a-z]*", w) and j + 1 < len(argv):
                report.embedded_scripts.append((basename(argv[0]), loc, argv[j + 1]))
                return shell_script(argv[j + 1], loc, 0, Scope(env), report)
    return []


# ---------------------------------------------------------------------------------------------
# systemd


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = ASSIGN.match(line.removeprefix("export "))
        if not m:
            raise CheckError(f"{rel(path)}: not NAME=value: {raw}")
        name, value = m.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[name] = value
    return env


def systemd_subst(text: str, env: dict[str, str], loc: str) -> str:
    def spec(m):
        if m.group(1) not in SYSTEMD_SPECIFIERS:
            raise CheckError(f"{loc}: no sample for the specifier %{m.group(1)} (SYSTEMD_SPECIFIERS)")
        return SYSTEMD_SPECIFIERS[m.group(1)]

    text = re.sub(r"%(.)", spec, text)

    def var(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(2)
        if name in env:
            return env[name]
        raise CheckError(
            f"{loc}: ${name} is not set by the unit's Environment=/EnvironmentFile= example "
            f"(systemd would expand it to nothing)"
        )

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", var, text)


def systemd_unit(path: Path, report: Report) -> list[Command]:
    lines, buf, start = [], "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if not buf and raw.lstrip()[:1] in ("#", ";"):
            continue
        if not buf:
            start = n
        if raw.endswith("\\"):
            buf += raw[:-1] + " "
            continue
        lines.append((start, buf + raw))
        buf = ""
    env: dict[str, str] = {}
    execs = []
    section = ""
    for n, line in lines:
        line = line.strip()
        if line.startswith("["):
            section = line
            continue
        if "=" not in line or section != "[Service]":
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        if key == "EnvironmentFile":
            target = Path(value.lstrip("-"))
            example = path.parent / target.name
            if not example.exists():
                raise CheckError(
                    f"{rel(path)}:{n}: EnvironmentFile={value} has no example {rel(example)} beside it"
                )
            env.update(read_env_file(example))
        elif key == "Environment":
            for w in shlex.split(value):
                m = ASSIGN.match(w)
                if m:
                    env[m.group(1)] = m.group(2)
        elif key.startswith("Exec"):
            execs.append((n, key, value))
    for name in TOKEN_VARS & env.keys():
        report.fail(f"{rel(path)}: {name} has a literal value: use ALEXNET_TOKEN_FILE")
    found = []
    for n, key, value in execs:
        loc = f"{rel(path)}:{n}"
        value = value.lstrip("-@:+!")
        argv = shlex.split(systemd_subst(value, env, loc))
        cmds = run_argv(argv, loc, env, report, key)
        if key == "ExecStart" and not cmds:
            raise CheckError(f"{loc}: ExecStart runs no alexnet command line")
        found += cmds
    return found


# ---------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Image:
    entrypoint: list[str]
    cmd: list[str]


def dockerfile(path: Path, report: Report) -> tuple[list[Command], Image]:
    instructions, buf, start = [], "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.lstrip().startswith("#"):
            continue
        if not buf:
            if not raw.strip():
                continue
            start = n
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        instructions.append((start, buf + raw))
        buf = ""
    found: list[Command] = []
    image = Image([], [])
    for n, line in instructions:
        instr, _, rest = line.strip().partition(" ")
        instr = instr.upper()
        rest = rest.strip()
        if instr == "FROM":
            image = Image([], [])
        elif instr in ("ENTRYPOINT", "CMD"):
            argv = yaml.safe_load(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
            if instr == "ENTRYPOINT":
                image.entrypoint, image.cmd = argv, []
            else:
                image.cmd = argv
        elif instr == "RUN" and not rest.startswith("["):
            script = re.sub(r"^(--\S+\s+)+", "", rest)
            found += shell_script(script, rel(path), n, Scope(), report)
    argv = image.entrypoint + image.cmd
    default = run_argv(argv, f"{rel(path)}: ENTRYPOINT + CMD", {}, report)
    if not default:
        raise CheckError(f"{rel(path)}: the image's ENTRYPOINT + CMD runs no alexnet command line")
    return found + default, image


def build_context(path: Path, report: Report) -> None:
    """The build stage (the one that runs cargo build) must copy every file the build reads: the
    sources' include_str!/include_bytes! targets and build.rs's rerun-if-changed paths. The
    context is the repository root."""
    stages: list[dict] = []
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        instr, _, rest = line.strip().partition(" ")
        if instr.upper() == "FROM":
            stages.append({"copies": [], "cargo": False})
        elif stages and instr.upper() == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            if not any(w.startswith("--from") for w in shlex.split(rest)):
                stages[-1]["copies"] += words[:-1]
        elif stages and instr.upper() == "RUN" and "cargo build" in rest:
            stages[-1]["cargo"] = True
    build = [st for st in stages if st["cargo"]]
    if not build:
        return
    copied = [(ROOT / c).resolve() for c in build[0]["copies"]]
    needed = {ROOT / "Cargo.toml", ROOT / "Cargo.lock", ROOT / "src"}
    sources = list((ROOT / "src").rglob("*.rs"))
    if (ROOT / "build.rs").exists():
        sources.append(ROOT / "build.rs")
        needed.add(ROOT / "build.rs")
        for m in re.finditer(r"rerun-if-changed=([^\"\s]+)", (ROOT / "build.rs").read_text()):
            needed.add(ROOT / m.group(1))
    for src in sources:
        for m in re.finditer(r"include_(?:str|bytes)!\(\s*\"([^\"]+)\"", src.read_text()):
            needed.add(src.parent / m.group(1))
    for n in sorted({p.resolve() for p in needed}):
        if not any(n == c or c in n.parents for c in copied):
            report.fail(f"{rel(path)}: the build stage does not COPY {rel(n)}, which the build reads")


def image_runs_alexnet(image: str) -> bool:
    repo = image.split("@", 1)[0]
    if ":" in repo.rsplit("/", 1)[-1]:
        repo = repo.rsplit(":", 1)[0]
    return basename(repo) == "alexnet"


# ---------------------------------------------------------------------------------------------
# Compose


def compose_subst(text: str, loc: str) -> str:
    def var(m):
        if m.group(0) == "$$":
            return "$"
        inner = m.group(1) or m.group(2)
        mm = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?", inner, re.S)
        if not mm:
            raise CheckError(f"{loc}: cannot interpolate ${{{inner}}}")
        name, op, arg = mm.groups()
        if op in (":-", "-"):
            return arg
        if name in SAMPLES:
            return SAMPLES[name]
        raise CheckError(f"{loc}: no value for ${{{inner}}}: give it a default, or add a sample to SAMPLES")

    return re.sub(r"\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", var, text)


def compose_file(path: Path, image: Image | None, report: Report) -> tuple[list[Command], dict]:
    doc = yaml.safe_load(path.read_text())
    found: list[Command] = []
    info: dict = {"services": {}}
    for name, svc in (doc.get("services") or {}).items():
        loc = f"{rel(path)}: service {name}"
        env: dict[str, str] = {}
        for f in svc.get("env_file", []) if isinstance(svc.get("env_file"), list) else [svc.get("env_file")]:
            if f:
                env.update(read_env_file(path.parent / (f if isinstance(f, str) else f["path"])))
        raw_env = svc.get("environment") or {}
        if isinstance(raw_env, list):
            raw_env = dict(e.split("=", 1) if "=" in e else (e, None) for e in raw_env)
        for k, v in raw_env.items():
            if v is not None:
                env[k] = compose_subst(str(v), loc)
        for t in TOKEN_VARS & env.keys():
            report.fail(f"{loc}: {t} has a literal value: use a secret and ALEXNET_TOKEN_FILE")
        if not image_runs_alexnet(str(svc.get("image", ""))) and "build" not in svc:
            raise CheckError(
                f"{loc}: image {svc.get('image')!r} is not the alexnet image: teach scripts/check-deploy.py"
            )
        if image is None:
            raise CheckError(f"{loc}: the alexnet image's Dockerfile in deploy/ is missing or could not be read")

        def words(v):
            if isinstance(v, str):
                return shlex.split(compose_subst(v, loc))
            return [compose_subst(str(x), loc) for x in v]

        entry = words(svc["entrypoint"]) if "entrypoint" in svc else image.entrypoint
        cmd = words(svc["command"]) if "command" in svc else (image.cmd if "entrypoint" not in svc else [])
        cmds = run_argv(entry + cmd, loc, env, report)
        if not cmds:
            raise CheckError(f"{loc}: runs the alexnet image but no alexnet command line was found")
        found += cmds
        info["services"][name] = {"env": env, "commands": cmds}
    return found, info


# ---------------------------------------------------------------------------------------------
# Kubernetes


def pod_spec(obj: dict) -> dict | None:
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    return spec.get("template", {}).get("spec")


def k8s_subst(text: str, env: dict[str, str], loc: str) -> str:
    def var(m):
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        if m.group(1) in env:
            return env[m.group(1)]
        raise CheckError(
            f"{loc}: $({m.group(1)}) is not in the container's env: Kubernetes would leave it as it is"
        )

    return re.sub(r"\$\$\([A-Za-z_][A-Za-z0-9_]*\)|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", var, text)


def container_env(c: dict, configmaps: dict[str, dict], loc: str, report: Report) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        ref = src.get("configMapRef")
        if not ref or ref.get("name") not in configmaps:
            raise CheckError(f"{loc}: envFrom {src}: only ConfigMaps defined in deploy/k8s are understood")
        prefix = src.get("prefix", "")
        env.update({prefix + k: str(v) for k, v in (configmaps[ref["name"]].get("data") or {}).items()})
    for e in c.get("env") or []:
        name = e["name"]
        if "value" in e:
            if name in TOKEN_VARS:
                report.fail(f"{loc}: env {name} has a literal value: take it from a Secret (secretKeyRef)")
            env[name] = k8s_subst(str(e["value"]), env, loc)
        elif name in SAMPLES:
            env[name] = SAMPLES[name]
        else:
            raise CheckError(f"{loc}: env {name} comes from valueFrom: add a sample value to SAMPLES")
    return env


def k8s_dir(files: list[Path], image: Image | None, report: Report) -> tuple[list[Command], dict]:
    docs = []
    for path in files:
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                docs.append((path, obj))
    configmaps = {o["metadata"]["name"]: o for _, o in docs if o.get("kind") == "ConfigMap"}
    found: list[Command] = []
    info: dict = {"docs": docs, "containers": [], "files_with_commands": set()}
    for path, obj in docs:
        if obj.get("kind") not in WORKLOADS:
            continue
        spec = pod_spec(obj) or {}
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            loc = f"{rel(path)}: {obj['kind']}/{obj['metadata']['name']} container {c['name']}"
            env = container_env(c, configmaps, loc, report)
            if not image_runs_alexnet(str(c.get("image", ""))):
                raise CheckError(
                    f"{loc}: image {c.get('image')!r} is not the alexnet image: teach scripts/check-deploy.py"
                )
            if image is None:
                raise CheckError(f"{loc}: the alexnet image's Dockerfile in deploy/ is missing or could not be read")
            if "command" in c:
                argv = list(c["command"]) + list(c.get("args") or [])
            else:
                argv = image.entrypoint + (list(c["args"]) if "args" in c else image.cmd)
            argv = [k8s_subst(str(a), env, loc) for a in argv]
            cmds = run_argv(argv, loc, env, report)
            if not cmds:
                raise CheckError(f"{loc}: runs the alexnet image but no alexnet command line was found")
            found += cmds
            info["containers"].append({"obj": obj, "container": c, "env": env, "commands": cmds})
            info["files_with_commands"].add(path)
    return found, info


def k8s_consistency(info: dict, report: Report) -> None:
    docs = info["docs"]
    job_ids = {}
    world, replicas, columns = 0, None, 1
    coordinator_urls = set()
    for c in info["containers"]:
        name = f"{c['obj']['kind']}/{c['obj']['metadata']['name']}"
        for cmd in c["commands"]:
            a = cmd.argv
            opt = lambda flag: a[a.index(flag) + 1] if flag in a and a.index(flag) + 1 < len(a) else None
            jid = opt("--job-id") or cmd.env.get("ALEXNET_JOB_ID")
            if jid:
                job_ids.setdefault(jid, []).append(name)
            if a and a[0] == "agent":
                spec = c["obj"].get("spec", {})
                if c["obj"]["kind"] == "Job":
                    if spec.get("completions") != spec.get("parallelism"):
                        report.fail(f"{name}: completions != parallelism: every agent must run at once")
                    if spec.get("completionMode") != "Indexed" and "--node-rank" in a:
                        report.fail(f"{name}: --node-rank needs an Indexed Job")
                pods = spec.get("completions") or spec.get("replicas") or 1
                workers = opt("--workers") or cmd.env.get("ALEXNET_WORKERS") or "1"
                world += pods * int(workers)
                coordinator_urls.add(opt("--coordinator") or cmd.env.get("ALEXNET_COORDINATOR"))
            if a and a[0] == "coordinator":
                r = opt("--replicas") or cmd.env.get("ALEXNET_REPLICAS")
                if r:
                    replicas = int(r)
                cfg = opt("--config")
                if cfg and replicas is None:
                    for _, o in docs:
                        if o.get("kind") == "ConfigMap":
                            for key, text in (o.get("data") or {}).items():
                                if cfg.endswith("/" + key):
                                    topo = tomllib.loads(text).get("topology", {})
                                    replicas = topo.get("replicas", 1)
                                    columns = topo.get("columns_per_worker", 1)
    if len(job_ids) > 1:
        report.fail(f"deploy/k8s: different job ids: {job_ids}")
    if world and replicas is not None and world != replicas * 2 // columns:
        report.fail(
            f"deploy/k8s: {world} workers in all, but the job has {replicas} replicas x "
            f"{2 // columns} workers each"
        )
    services = {
        (o["metadata"]["name"], p["port"])
        for _, o in docs
        if o.get("kind") == "Service"
        for p in o["spec"].get("ports", [])
    }
    for url in coordinator_urls - {None}:
        m = re.fullmatch(r"https?://([^:/]+):(\d+)/?", url)
        if not m or (m.group(1).split(".")[0], int(m.group(2))) not in services:
            report.fail(f"deploy/k8s: the agents' coordinator {url} is no Service port in deploy/k8s")


def kustomization(path: Path, manifests: list[Path], report: Report) -> None:
    doc = yaml.safe_load(path.read_text())
    listed = {(path.parent / r).resolve() for r in doc.get("resources", [])}
    for r in listed:
        if not r.exists():
            report.fail(f"{rel(path)}: lists {rel(r)}, which does not exist")
    for m in manifests:
        optional = operator_only(m)
        if optional and m.resolve() in listed:
            report.fail(f"{rel(path)}: lists {rel(m)}, whose kinds exist only where the Prometheus operator "
                        f"is installed: leave it out (it is applied on its own)")
        elif not optional and m.resolve() not in listed:
            report.fail(f"{rel(path)}: does not list {rel(m)}")


def validate_job_files(info: dict, binary: Path, report: Report) -> int:
    n = 0
    for path, obj in info["docs"]:
        if obj.get("kind") != "ConfigMap":
            continue
        for key, text in (obj.get("data") or {}).items():
            if not key.endswith(".toml"):
                continue
            with tempfile.TemporaryDirectory() as d:
                f = Path(d) / key
                f.write_text(text)
                n += 1
                dry_run(
                    binary,
                    Command(f"{rel(path)}: ConfigMap/{obj['metadata']['name']} {key}",
                            ["coordinator", "--config", str(f)], {}),
                    report,
                    expect=f"job `{f}`: valid",
                )
    return n


# ---------------------------------------------------------------------------------------------
# Monitoring: --metrics-listen in the recipes, Prometheus, Grafana


def metrics_listen(cmd: Command) -> str | None:
    a = cmd.argv
    for i, w in enumerate(a):
        if w == "--metrics-listen" and i + 1 < len(a):
            return a[i + 1]
        if w.startswith("--metrics-listen="):
            return w.split("=", 1)[1]
    return cmd.env.get("ALEXNET_METRICS_LISTEN")


def split_addr(addr: str) -> tuple[str, int | None]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else None


def loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def metrics_flags(per_file: dict[Path, list[Command]], containers: list[Path], report: Report) -> None:
    """In a recipe, the coordinator's (agent's) command lines serve metrics all or none: a resume
    branch without --metrics-listen loses them after a restart. At the conventional port, and in
    a container (Compose) off loopback."""
    for path, cmds in per_file.items():
        for role, port in METRICS_PORTS.items():
            mine = [(c, metrics_listen(c)) for c in cmds if c.argv[:1] == [role]]
            if any(a for _, a in mine):
                for c, a in mine:
                    if not a:
                        report.fail(f"{c.where}: `alexnet {role}` without --metrics-listen, unlike the other "
                                    f"{role} command lines of the recipe")
            for c, a in mine:
                if a and path in containers and loopback(split_addr(a)[0]):
                    report.fail(f"{c.where}: --metrics-listen {a} is the container's loopback, which a published "
                                f"port does not reach: listen on 0.0.0.0")
                if a and split_addr(a)[1] != port:
                    report.fail(f"{c.where}: --metrics-listen {a}: the recipes serve the {role}'s metrics on "
                                f"port {port}, which deploy/prometheus assumes")


def pod_template_meta(obj: dict) -> dict:
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return obj.get("metadata") or {}
    if kind == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    return spec.get("template", {}).get("metadata") or {}


def operator_only(path: Path) -> bool:
    """A manifest of the Prometheus operator's kinds only: optional, outside kustomization.yaml."""
    docs = [o for o in yaml.safe_load_all(path.read_text()) if o]
    return bool(docs) and all(str(o.get("apiVersion", "")).startswith("monitoring.coreos.com/") for o in docs)


def k8s_metrics(info: dict, report: Report) -> None:
    """A pod that serves metrics says so in the annotations that Prometheus' pod discovery reads,
    declares the port, and listens off loopback; a pod that does not serve them does not ask."""
    for c in info["containers"]:
        obj, ctr = c["obj"], c["container"]
        name = f"{obj['kind']}/{obj['metadata']['name']} container {ctr['name']}"
        ann = pod_template_meta(obj).get("annotations") or {}
        addrs = {metrics_listen(cmd) for cmd in c["commands"]}
        if addrs == {None}:
            if "prometheus.io/scrape" in ann:
                report.fail(f"deploy/k8s: {name}: prometheus.io/scrape, but no --metrics-listen")
            continue
        if len(addrs - {None}) > 1:  # (one without: metrics_flags says so)
            report.fail(f"deploy/k8s: {name}: its command lines differ in --metrics-listen: {sorted(addrs - {None})}")
        for addr in sorted(addrs - {None}):
            host, port = split_addr(addr)
            if loopback(host):
                report.fail(f"deploy/k8s: {name}: --metrics-listen {addr} is the pod's loopback, which Prometheus "
                            f"cannot reach: listen on 0.0.0.0")
            want = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
            for k, v in want.items():
                if ann.get(k) != v:
                    report.fail(f"deploy/k8s: {name}: pod annotation {k} is {ann.get(k)!r}, not {v!r} "
                                f"(--metrics-listen {addr})")
            if port not in [p.get("containerPort") for p in ctr.get("ports") or []]:
                report.fail(f"deploy/k8s: {name}: no containerPort {port} (--metrics-listen {addr})")


# The Prometheus operator's monitoring.coreos.com/v1 fields that a spelling mistake would
# otherwise hide (the operator drops unknown fields).
MONITOR_ENDPOINTS = {"ServiceMonitor": "endpoints", "PodMonitor": "podMetricsEndpoints"}
MONITOR_SPEC_KEYS = {
    "selector", "endpoints", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "targetLabels",
    "podTargetLabels", "sampleLimit", "targetLimit", "labelLimit", "labelNameLengthLimit",
    "labelValueLengthLimit", "keepDroppedTargets", "attachMetadata", "scrapeClass", "scrapeProtocols",
    "fallbackScrapeProtocol", "bodySizeLimit", "selectorMechanism",
}
MONITOR_ENDPOINT_KEYS = {
    "port", "portNumber", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
    "honorLabels", "honorTimestamps", "trackTimestampsStaleness", "relabelings", "metricRelabelings",
    "tlsConfig", "bearerTokenFile", "bearerTokenSecret", "authorization", "basicAuth", "oauth2",
    "proxyUrl", "noProxy", "proxyFromEnvironment", "proxyConnectHeader", "followRedirects",
    "enableHttp2", "filterRunning",
}


def k8s_monitors(info: dict, report: Report) -> int:
    """ServiceMonitors and PodMonitors (kubernetes-validate has no schema for them): known
    fields, and a selector that finds this folder's Services or pods, whose port leads to a
    container's --metrics-listen."""
    docs = info["docs"]
    workloads: dict[int, tuple[dict, list[dict]]] = {}
    for c in info["containers"]:
        workloads.setdefault(id(c["obj"]), (c["obj"], []))[1].append(c)

    def pods(selector: dict) -> list[tuple[dict, list[dict]]]:
        return [(o, cs) for o, cs in workloads.values()
                if selector and selector.items() <= (pod_template_meta(o).get("labels") or {}).items()]

    def to_container(where: str, port, selected) -> None:
        for o, cs in selected:
            hits = [(c, p) for c in cs for p in c["container"].get("ports") or []
                    if port in (p.get("name"), p.get("containerPort"))]
            if not hits:
                report.fail(f"{where}: {o['kind']}/{o['metadata']['name']} has no container port {port!r}")
                continue
            c, p = hits[0]
            addrs = {metrics_listen(cmd) for cmd in c["commands"]}
            if {split_addr(a)[1] for a in addrs if a} != {p["containerPort"]} or None in addrs:
                report.fail(f"{where}: port {port!r} is {p['containerPort']} in {o['kind']}/{o['metadata']['name']}, "
                            f"but its --metrics-listen is {sorted(map(str, addrs))}")

    n = 0
    for path, obj in docs:
        if not str(obj.get("apiVersion", "")).startswith("monitoring.coreos.com/"):
            continue
        n += 1
        kind = obj.get("kind")
        where = f"{rel(path)}: {kind}/{(obj.get('metadata') or {}).get('name')}"
        if obj["apiVersion"] != "monitoring.coreos.com/v1" or kind not in MONITOR_ENDPOINTS:
            report.fail(f"{where}: only monitoring.coreos.com/v1 ServiceMonitor and PodMonitor are understood: "
                        f"teach scripts/check-deploy.py")
            continue
        spec = obj.get("spec") or {}
        for k in sorted(set(spec) - MONITOR_SPEC_KEYS):
            report.fail(f"{where}: unknown field spec.{k}")
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        if not selector:
            report.fail(f"{where}: no spec.selector.matchLabels")
            continue
        endpoints = spec.get(MONITOR_ENDPOINTS[kind]) or []
        if not endpoints:
            report.fail(f"{where}: no spec.{MONITOR_ENDPOINTS[kind]}")
        for ep in endpoints:
            for k in sorted(set(ep) - MONITOR_ENDPOINT_KEYS):
                report.fail(f"{where}: unknown field {k} in spec.{MONITOR_ENDPOINTS[kind]}")
            if ep.get("path", "/metrics") != "/metrics":
                report.fail(f"{where}: path {ep.get('path')!r}: the exporter serves /metrics")
            port = ep.get("port")
            if kind == "PodMonitor":
                selected = pods(selector)
                if not selected:
                    report.fail(f"{where}: its selector {selector} matches no pod template in deploy/k8s")
                to_container(where, port, selected)
                continue
            services = [o for _, o in docs if o.get("kind") == "Service"
                        and selector.items() <= (o["metadata"].get("labels") or {}).items()]
            if not services:
                report.fail(f"{where}: its selector {selector} matches no Service's labels in deploy/k8s")
            for svc in services:
                sp = [p for p in svc["spec"].get("ports") or [] if p.get("name") == port]
                if not sp:
                    report.fail(f"{where}: Service/{svc['metadata']['name']} has no port named {port!r}")
                    continue
                selected = pods(svc["spec"].get("selector") or {})
                if not selected:
                    report.fail(f"{where}: Service/{svc['metadata']['name']} selects no pod template in deploy/k8s")
                to_container(where, sp[0].get("targetPort", sp[0]["port"]), selected)
    return n


PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "inf", "nan"}
METRIC_WORD = re.compile(r"\balexnet_[A-Za-z0-9_:]*")


def promql_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana's $variables allowed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"#[^\n]*", " ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]", " ", s)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.start() and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # 5m, 1e3
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in PROMQL_KEYWORDS:
            continue  # a function or aggregation
        names.add(m.group(0))
    return names


def grafana_query_names(query: str) -> set[str]:
    """The metric names of a Prometheus template variable's query."""
    m = re.fullmatch(r"\s*(?:label_values\((.*),\s*\w+\s*\)|query_result\((.*)\))\s*", query, re.S)
    return promql_names(m.group(1) or m.group(2)) if m else set()


def metric_names(where: str, names: set[str], report: Report) -> None:
    for n in sorted(names - METRICS):
        report.fail(f"{where}: `{n}` is no metric of the exporter (METRICS in scripts/check-deploy.py)")


def prometheus_files(kinds: dict[str, list[Path]], report: Report) -> None:
    """rule_files load every rule file in deploy/prometheus; the alexnet scrape jobs' targets use
    the recipes' ports; the metric names are the exporter's."""
    loaded: set[Path] = set()
    for cfg in kinds.get("prometheus-config", []):
        try:
            doc = yaml.safe_load(cfg.read_text()) or {}
        except yaml.YAMLError as e:
            report.fail(f"{rel(cfg)}: {e}")
            continue
        for pattern in doc.get("rule_files") or []:
            found = glob.glob(os.path.join(cfg.parent, pattern))
            if not found:
                report.fail(f"{rel(cfg)}: rule_files {pattern!r} matches no file (relative to {rel(cfg.parent)})")
            loaded |= {Path(f).resolve() for f in found}
        for sc in doc.get("scrape_configs") or []:
            if sc.get("metrics_path", "/metrics") != "/metrics":
                report.fail(f"{rel(cfg)}: job {sc.get('job_name')}: metrics_path {sc['metrics_path']!r}, "
                            f"not /metrics")
            for role, port in METRICS_PORTS.items():
                if sc.get("job_name") != f"alexnet-{role}":
                    continue
                for target in [t for st in sc.get("static_configs") or [] for t in st.get("targets") or []]:
                    if split_addr(str(target))[1] != port:
                        report.fail(f"{rel(cfg)}: job alexnet-{role}: target {target} is not at port {port}, "
                                    f"where the recipes serve the {role}'s metrics")
        metric_names(rel(cfg), set(METRIC_WORD.findall(cfg.read_text())), report)
    for r in kinds.get("prometheus-rules", []):
        if r.resolve() not in loaded:
            report.fail(f"{rel(r)}: no prometheus.yml in deploy/ loads it (rule_files)")
        names = set(METRIC_WORD.findall(r.read_text()))
        try:
            doc = yaml.safe_load(r.read_text()) or {}
        except yaml.YAMLError as e:
            report.fail(f"{rel(r)}: {e}")
            continue
        for g in doc.get("groups") or []:
            for rule in g.get("rules") or []:
                names |= promql_names(str(rule.get("expr", "")))
        metric_names(rel(r), names, report)
    for t in kinds.get("prometheus-tests", []):
        names = set(METRIC_WORD.findall(t.read_text()))
        try:
            doc = yaml.safe_load(t.read_text()) or {}
        except yaml.YAMLError as e:
            report.fail(f"{rel(t)}: {e}")
            continue
        for case in doc.get("tests") or []:
            for series in case.get("input_series") or []:
                names |= promql_names(str(series.get("series", "")))
        metric_names(rel(t), names, report)


GRAFANA_BUILTINS = {"__interval", "__interval_ms", "__rate_interval", "__rate_interval_ms", "__range", "__range_s",
                    "__range_ms", "__from", "__to", "__dashboard", "__org", "__user", "timeFilter"}


def grafana_dashboard(path: Path, report: Report) -> None:
    """Imports as it is: JSON, panel ids unique, every panel on a datasource with PromQL targets,
    every $variable defined, and the job_id variable the panels filter on."""
    where = rel(path)
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        report.fail(f"{where}: not JSON: {e}")
        return
    if not isinstance(dash, dict) or not isinstance(dash.get("panels"), list):
        report.fail(f"{where}: not a dashboard (no panels)")
        return
    if not isinstance(dash.get("schemaVersion"), int):
        report.fail(f"{where}: no schemaVersion")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    inputs = {i.get("name") for i in dash.get("__inputs") or []}
    names = set(METRIC_WORD.findall(path.read_text()))

    def refs(text: str) -> set[str]:
        return {a or b or c for a, b, c in re.findall(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", text)}

    def datasource(ds, what: str) -> None:
        if not ds:
            report.fail(f"{where}: {what}: no datasource")
            return
        if isinstance(ds, dict) and ds.get("type") not in (None, "prometheus"):
            report.fail(f"{where}: {what}: datasource type {ds.get('type')!r}, not prometheus")
        for v in refs(str(ds.get("uid") if isinstance(ds, dict) else ds)):
            if v not in inputs and (variables.get(v) or {}).get("type") != "datasource":
                report.fail(f"{where}: {what}: datasource ${{{v}}} is neither a datasource variable nor in __inputs")

    def expr(text: str, what: str) -> None:
        for v in sorted(refs(text) - GRAFANA_BUILTINS - variables.keys()):
            report.fail(f"{where}: {what}: ${v} is no template variable")
        names.update(promql_names(text))

    job = variables.get("job_id")
    query = (job or {}).get("query")
    query = query.get("query") if isinstance(query, dict) else query
    if not job or job.get("type") != "query" or not re.search(r"label_values\(.+,\s*job_id\s*\)", str(query)):
        report.fail(f"{where}: no job_id variable (type query, label_values(alexnet_step, job_id))")
    for v in variables.values():
        if v.get("type") == "query":
            datasource(v.get("datasource"), f"variable {v.get('name')}")
            q = v.get("query")
            names.update(grafana_query_names(str(q.get("query", "") if isinstance(q, dict) else q)))

    panels = [q for p in dash["panels"] for q in [p, *(p.get("panels") or [])]]
    ids = [p.get("id") for p in panels]
    for i in sorted({i for i in ids if ids.count(i) > 1}, key=str):
        report.fail(f"{where}: panel id {i} is used {ids.count(i)} times")
    for p in panels:
        what = f"panel {p.get('id')} {p.get('title')!r}"
        if not isinstance(p.get("id"), int):
            report.fail(f"{where}: {what}: no numeric id")
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in "xywh") or g["x"] + g["w"] > 24:
            report.fail(f"{where}: {what}: gridPos {g} is not within the 24 columns")
        if p.get("type") == "row":
            continue
        datasource(p.get("datasource"), what)
        targets = p.get("targets") or []
        if not targets:
            report.fail(f"{where}: {what}: no targets")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids):
            report.fail(f"{where}: {what}: refIds repeat: {ref_ids}")
        for t in targets:
            if not str(t.get("expr") or "").strip():
                report.fail(f"{where}: {what}: target {t.get('refId')} has no expr")
                continue
            if "datasource" in t:
                datasource(t["datasource"], f"{what} target {t.get('refId')}")
            expr(t["expr"], f"{what} target {t.get('refId')}")
    for a in (dash.get("annotations") or {}).get("list") or []:
        if a.get("expr"):
            datasource(a.get("datasource"), f"annotation {a.get('name')!r}")
            expr(a["expr"], f"annotation {a.get('name')!r}")
    metric_names(where, names, report)


# ---------------------------------------------------------------------------------------------
# Slurm: the batch script run for real, with srun and the binary stood in for


SRUN_STUB = """#!/usr/bin/env bash
# srun for the check: runs the step's command once per node, as task 0 of that node.
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
status=0
for ((n = 0; n < SLURM_JOB_NUM_NODES; n++)); do
    SLURM_NODEID=$n SLURM_PROCID=$n "$@" || status=$?
done
exit "$status"
"""
ALEXNET_STUB = """#!/usr/bin/env bash
# alexnet for the check: records the command line, then checks it with --dry-run.
printf '%s\\n' "$*" >>"$CHECK_LOG"
exec "$CHECK_ALEXNET" --dry-run "$@"
"""


def smoke_sbatch(path: Path, binary: Path, report: Report) -> None:
    """Runs the batch script as Slurm would on its first node (srun replaced by a loop over the
    nodes, alexnet by --dry-run): the replicas it computes, one agent per node rank, the token
    file's mode, and the resume of a requeued job."""
    text = path.read_text()
    opt = lambda name, default: int(
        (re.search(rf"^#SBATCH\s+--{name}=(?:[A-Za-z0-9_]+:)?(\d+)", text, re.M) or [None, default])[1]
    )
    nodes, gpus = opt("nodes", 2), opt("gpus-per-node", 2)
    where = f"{rel(path)} (run with {nodes} nodes x {gpus} GPUs)"
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "bin").mkdir()
        for name, body in (("srun", SRUN_STUB), ("alexnet-check", ALEXNET_STUB)):
            (d / "bin" / name).write_text(body)
            (d / "bin" / name).chmod(0o755)
        env = {
            "PATH": f"{d / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(d),
            "SLURM_JOB_ID": SAMPLES["SLURM_JOB_ID"],
            "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NNODES": str(nodes),
            "SLURM_GPUS_PER_NODE": f"gpu:{gpus}",
            "SLURM_NODEID": "0",
            "RUNS": str(d / "runs"),
            "ALEXNET": str(d / "bin" / "alexnet-check"),
            "CHECK_ALEXNET": str(binary),
        }

        def run(log: Path) -> list[list[str]] | None:
            p = subprocess.run(["bash", str(path)], env={**env, "CHECK_LOG": str(log)}, cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
            if p.returncode != 0:
                report.fail(f"{where}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[-600:]}")
                return None
            return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []

        calls = run(d / "first.log")
        if calls is None:
            return
        coord = [c for c in calls if c[:1] == ["coordinator"]]
        agents = [c for c in calls if c[:1] == ["agent"]]
        arg = lambda c, f: c[c.index(f) + 1] if f in c and c.index(f) + 1 < len(c) else None
        problems = []
        if len(coord) != 1 or arg(coord[0], "--replicas") != str(nodes * gpus // 2):
            problems.append(f"expected one coordinator with --replicas {nodes * gpus // 2}, got {coord}")
        if sorted(arg(a, "--node-rank") for a in agents) != [str(n) for n in range(nodes)]:
            problems.append(f"expected one agent per node rank 0..{nodes - 1}, got {agents}")
        if any(arg(a, "--workers") != str(gpus) for a in agents):
            problems.append(f"expected --workers {gpus} on every agent, got {agents}")
        run_dir = Path(arg(coord[0], "--run-dir") or "/nonexistent") if coord else Path("/nonexistent")
        token = run_dir / "token"
        if not token.exists() or token.stat().st_mode & 0o777 != 0o600 or len(token.read_text()) < 32:
            problems.append(f"expected a token of 32+ characters in {token}, mode 600")
        if not problems:
            # Requeued: the run folder holds the job; the coordinator must continue it.
            (run_dir / "job.json").write_text("{}")
            before = token.read_text()
            calls = run(d / "requeued.log") or []
            coord = [c for c in calls if c[:1] == ["coordinator"]]
            if len(coord) != 1 or arg(coord[0], "--resume") != str(run_dir):
                problems.append(f"requeued: expected one coordinator with --resume {run_dir}, got {coord}")
            if token.read_text() != before:
                problems.append("requeued: the token changed (running workers would be refused)")
        for pr in problems:
            report.fail(f"{where}: {pr}")
        print(f"{'ok  ' if not problems else 'FAIL'} {where}: coordinator + {nodes} agents, then requeued")


# ---------------------------------------------------------------------------------------------


def dry_run(binary: Path, cmd: Command, report: Report, expect: str | None = None) -> bool:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **cmd.env}
    shown = " ".join(shlex.quote(a) for a in ["alexnet", *cmd.argv])
    envs = " ".join(f"{k}=..." for k in sorted(cmd.env))
    p = subprocess.run(
        [str(binary), "--dry-run", *cmd.argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    ok = p.returncode == 0 and (expect is None or expect in p.stdout)
    print(f"{'ok  ' if ok else 'FAIL'} {cmd.where}\n       {envs + ' ' if envs else ''}{shown}")
    if not ok:
        detail = (p.stderr.strip() or p.stdout.strip()).splitlines()
        why = " | ".join(d.strip() for d in detail if d.strip()) or f"exit {p.returncode}"
        report.failures.append(f"{cmd.where}: `{shown}`: " + (why if len(why) < 400 else why[:400] + " ..."))
        for d in detail[:8]:
            print(f"       | {d}")
    return ok


def linters(args, report: Report, k8s_manifests: list[Path], dockerfiles: list[Path], units: list[Path],
            compose_files: list[Path], binary: Path, kinds: dict[str, list[Path]]) -> None:
    def need(tool: str) -> bool:
        if shutil.which(tool):
            return True
        if args.skip_missing_linters:
            report.notes.append(f"{tool} not installed: skipped")
            print(f"skip {tool}: not installed")
        else:
            report.fail(f"{tool} is not installed (or pass --skip-missing-linters)")
        return False

    def run(what: str, argv: list[str], stdin: str | None = None) -> None:
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, input=stdin)
        print(f"{'ok  ' if p.returncode == 0 else 'FAIL'} {what}")
        if p.returncode != 0:
            out = (p.stdout + p.stderr).strip()
            report.failures.append(f"{what}:\n{out}")
            print("\n".join("       | " + line for line in out.splitlines()[:40]))

    if need("shellcheck"):
        for group in (sorted(set(DEPLOY.rglob("*.sbatch")) | set(DEPLOY.rglob("*.sh"))),
                      sorted((ROOT / "scripts").glob("*.sh"))):
            if group:
                run("shellcheck " + " ".join(rel(s) for s in group), ["shellcheck", *map(str, group)])
        for shell, where, text in report.embedded_scripts:
            run(f"shellcheck -s {shell} ({where}, embedded)", ["shellcheck", "-s", shell, "-"], text)
    if need("yamllint"):
        run("yamllint deploy/", ["yamllint", "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)])
    if need("kubernetes-validate"):
        for m in k8s_manifests:
            argv = ["kubernetes-validate", "-k", args.kubernetes_version, "--strict", "--quiet", str(m)]
            p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
            ok = p.returncode == 0
            print(f"{'ok  ' if ok else 'FAIL'} kubernetes-validate -k {args.kubernetes_version} --strict {rel(m)}")
            if ok:
                report.manifests_valid += 1
            else:
                out = (p.stdout + p.stderr).strip()
                report.failures.append(f"kubernetes-validate {rel(m)}:\n{out}")
                print("\n".join("       | " + line for line in out.splitlines()[:40]))
    if compose_files and need("check-jsonschema"):
        for c in compose_files:
            run(f"check-jsonschema --builtin-schema vendor.compose-spec {rel(c)}",
                ["check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(c)])
    prometheus = [kinds.get(k, []) for k in ("prometheus-config", "prometheus-rules", "prometheus-tests")]
    if any(prometheus) and need("promtool"):
        # check config also checks the rule files it loads, with their paths resolved from its folder.
        for verb, files in zip((["check", "config"], ["check", "rules"], ["test", "rules"]), prometheus):
            for f in files:
                run(f"promtool {' '.join(verb)} {rel(f)}", ["promtool", *verb, str(f)])
    # Optional: run where installed.
    if shutil.which("hadolint"):
        for d in dockerfiles:
            run(f"hadolint {rel(d)}", ["hadolint", str(d)])
    if shutil.which("kubectl") and (DEPLOY / "k8s" / "kustomization.yaml").exists():
        run("kubectl kustomize deploy/k8s", ["kubectl", "kustomize", str(DEPLOY / "k8s")])
    if shutil.which("systemd-analyze") and units:
        with tempfile.TemporaryDirectory() as d:
            paths = []
            for u in units:
                text = u.read_text().replace("/usr/local/bin/alexnet", str(binary))
                name = u.name.replace("@.", "@1.")  # a template is verified as an instance
                (Path(d) / name).write_text(text)
                paths.append(str(Path(d) / name))
            run("systemd-analyze verify " + " ".join(rel(u) for u in units),
                ["systemd-analyze", "verify", *paths])


def classify(path: Path) -> str:
    name = path.name
    if name in ("README.md", ".yamllint.yaml") or name.endswith(".dockerignore"):
        return "other"
    if path.parent.name == "prometheus" and name.endswith((".yaml", ".yml")):
        if name in ("prometheus.yml", "prometheus.yaml"):
            return "prometheus-config"
        return "prometheus-tests" if name.endswith((".test.yml", ".test.yaml")) else "prometheus-rules"
    if path.parent.name == "grafana" and name.endswith(".json"):
        return "grafana-dashboard"
    if name.endswith((".sbatch", ".sh")):
        return "shell"
    if name.endswith(".service"):
        return "systemd"
    if name.endswith(".env"):
        return "envfile"
    if name == "Dockerfile" or name.endswith(".Dockerfile"):
        return "dockerfile"
    if re.fullmatch(r"(docker-)?compose(\..*)?\.ya?ml", name):
        return "compose"
    if name in ("kustomization.yaml", "kustomization.yml"):
        return "kustomization"
    if name.endswith((".yaml", ".yml")):
        return "k8s"
    return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alexnet", default="target/debug/alexnet", help="the binary to check against")
    ap.add_argument("--skip-missing-linters", action="store_true")
    ap.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    args = ap.parse_args()
    binary = Path(args.alexnet)
    binary = binary if binary.is_absolute() else (Path.cwd() / binary)
    if not binary.exists() and (ROOT / args.alexnet).exists():
        binary = ROOT / args.alexnet
    if not os.access(binary, os.X_OK):
        print(f"no alexnet binary at {args.alexnet}: build it (cargo build) or pass --alexnet PATH")
        return 2

    report = Report()
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    kinds: dict[str, list[Path]] = {}
    for f in files:
        kinds.setdefault(classify(f), []).append(f)
    for f in kinds.get("unknown", []):
        report.fail(f"{rel(f)}: a file of a kind scripts/check-deploy.py does not know: teach it")

    per_file: dict[Path, list[Command]] = {}

    def collect(path: Path, fn):
        try:
            per_file[path] = fn()
        except CheckError as e:
            per_file[path] = []
            report.fail(str(e))

    image = None
    for d in kinds.get("dockerfile", []):
        def df(d=d):
            nonlocal image
            cmds, img = dockerfile(d, report)
            image = img
            build_context(d, report)
            return cmds
        collect(d, df)
    for s in kinds.get("shell", []):
        collect(s, lambda s=s: shell_script(s.read_text(), rel(s), 1, Scope(), report))
    for u in kinds.get("systemd", []):
        collect(u, lambda u=u: systemd_unit(u, report))
    compose_info = {}
    for c in kinds.get("compose", []):
        def cf(c=c):
            cmds, info = compose_file(c, image, report)
            compose_info[c] = info
            return cmds
        collect(c, cf)
    k8s_files = kinds.get("k8s", [])
    k8s_info = None
    if k8s_files:
        try:
            cmds, k8s_info = k8s_dir(k8s_files, image, report)
            for c in cmds:
                per_file.setdefault(Path(ROOT / c.where.split(":")[0]), []).append(c)
        except CheckError as e:
            report.fail(str(e))

    # A recipe that yields no command line was not understood: fail rather than skip it.
    must_yield = kinds.get("shell", []) + kinds.get("systemd", []) + kinds.get("dockerfile", []) + kinds.get(
        "compose", []
    )
    if k8s_info:
        for path, obj in k8s_info["docs"]:
            if obj.get("kind") in WORKLOADS:
                must_yield.append(path)
    for f in sorted(set(must_yield)):
        if not per_file.get(f) and not any(m.startswith(rel(f)) for m in report.failures):
            report.fail(f"{rel(f)}: no alexnet command line found in it")

    print(f"== alexnet --dry-run on every command line ({binary})")
    commands = [c for f in sorted(per_file) for c in per_file[f]]
    for c in commands:
        dry_run(binary, c, report)

    if kinds.get("shell"):
        print("== batch scripts run with srun and alexnet stood in for")
        for sb in kinds["shell"]:
            if sb.suffix == ".sbatch":
                try:
                    smoke_sbatch(sb, binary, report)
                except (subprocess.TimeoutExpired, OSError) as e:
                    report.fail(f"{rel(sb)}: {e}")

    job_files = 0
    if k8s_info:
        print("== job files in ConfigMaps")
        job_files = validate_job_files(k8s_info, binary, report)
        k8s_consistency(k8s_info, report)

    print("== monitoring: --metrics-listen, Prometheus, Grafana")
    before = len(report.failures)
    metrics_flags(per_file, kinds.get("compose", []), report)
    monitors = 0
    if k8s_info:
        k8s_metrics(k8s_info, report)
        monitors = k8s_monitors(k8s_info, report)
    prometheus_files(kinds, report)
    for d in kinds.get("grafana-dashboard", []):
        grafana_dashboard(d, report)
    if len(report.failures) == before:
        print("ok   metrics ports and scrape wiring, metric names, dashboards")
    for path, info in compose_info.items():
        replicas, workers = None, []
        for svc in info["services"].values():
            for cmd in svc["commands"]:
                a = cmd.argv
                if a[:1] == ["coordinator"] and "--replicas" in a:
                    replicas = int(a[a.index("--replicas") + 1])
                if a[:1] == ["agent"] and "--workers" in a:
                    workers.append(int(a[a.index("--workers") + 1]))
        if replicas is not None:
            for w in workers:
                if w != 2 * replicas:
                    report.fail(f"{rel(path)}: an agent runs {w} workers, but the job has {replicas} replicas")
    for k in kinds.get("kustomization", []):
        kustomization(k, [f for f in k8s_files if f.parent == k.parent], report)
    for e in kinds.get("envfile", []):
        try:
            env = read_env_file(e)
            for t in TOKEN_VARS & env.keys():
                report.fail(f"{rel(e)}: {t} has a literal value: use ALEXNET_TOKEN_FILE")
        except CheckError as err:
            report.fail(str(err))

    print("== linters")
    # The Prometheus operator's kinds have no schema there: k8s_monitors checks them.
    k8s_manifests = [f for f in k8s_files if not operator_only(f)]
    linters(args, report, k8s_manifests, kinds.get("dockerfile", []), kinds.get("systemd", []),
            kinds.get("compose", []), binary, kinds)

    print("== summary")
    print(
        f"{len(commands)} command lines parsed from {len([f for f in per_file if per_file[f]])} files "
        f"and checked with --dry-run, {job_files} job file(s) validated, "
        f"{report.manifests_valid} of {len(k8s_manifests)} Kubernetes manifests valid "
        f"(kubernetes {args.kubernetes_version}), {monitors} Prometheus operator monitor(s), "
        f"{sum(len(kinds.get(k, [])) for k in ('prometheus-config', 'prometheus-rules', 'prometheus-tests'))} "
        f"Prometheus file(s) and {len(kinds.get('grafana-dashboard', []))} Grafana dashboard(s) checked"
    )
    for n in report.notes:
        print(f"note: {n}")
    if report.failures:
        print(f"{len(report.failures)} failure(s):")
        for f in report.failures:
            print(f"  - {f.splitlines()[0]}")
        return 1
    print("all recipes agree with the command line")
    return 0


if __name__ == "__main__":
    sys.exit(main())
