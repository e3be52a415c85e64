"""The daemon's container image, as far as it can be checked without a container engine.

The Dockerfile is read instruction by instruction; its builder stage is replayed for real: the build context that
.dockerignore lets through, copied as its COPY lines say, built into a wheel the way `pip wheel` in the image does.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from monitor.cli import build_parser
from monitor.daemon.app import DaemonConfig
from tests.helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# What only training processes need; none of it may reach the daemon's image.
TRAINING_ONLY = {"torch", "transformers", "accelerate", "lightning", "pytorch-lightning", "deepspeed", "numpy",
                 "nvidia-ml-py", "triton"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) from a Dockerfile: continuation lines joined, comments dropped."""
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages and op == "ARG":
            k, _, v = rest.partition("=")
            args[k] = v
        elif stages:
            stages[-1].instructions.append((op, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def test_two_stages_and_a_slim_python_runtime(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    builder, runtime = stages[0], stages[-1]
    assert builder.name == "builder"
    assert runtime.base == "python:3.11-slim"
    assert any("pip wheel" in r for r in builder.all("RUN"))
    # The runtime gets no source tree: only the builder's wheels, through a bind mount that leaves no layer.
    assert runtime.all("COPY") == [] and runtime.all("ADD") == []
    assert all("from=builder" in r for r in runtime.all("RUN") if "/wheels" in r)


def pip_installs(run: str) -> list[list[str]]:
    """The package arguments of every `pip install` in one RUN line."""
    words = [w for w in shlex.split(run) if not w.startswith("--mount=")]
    commands: list[list[str]] = [[]]
    for w in words:
        if w in ("&&", "||", ";"):
            commands.append([])
        else:
            commands[-1].append(w)
    out = []
    for cmd in commands:
        if cmd[:2] == ["pip", "install"]:
            pkgs, skip = [], False
            for w in cmd[2:]:
                if skip:
                    skip = False
                elif w.startswith("-"):
                    skip = w in ("--find-links", "-f", "-c", "-r", "--constraint")
                else:
                    pkgs.append(w)
            out.append(pkgs)
    return out


def test_runtime_installs_the_base_package_alone_offline(stages: list[Stage]) -> None:
    runs = stages[-1].all("RUN")
    installs = [p for r in runs for p in pip_installs(r)]
    # trainguard without extras: the extras are what pull torch in.
    assert installs == [["trainguard"]]
    install_run = next(r for r in runs if pip_installs(r))
    assert "--no-index" in install_run and "--find-links /wheels" in install_run


def test_runs_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    users = stages[-1].all("USER")
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0)
    # The store's directory belongs to that user, and it is the uid the chart runs as.
    assert any(f"chown {users[-1]} /data" in r for r in stages[-1].all("RUN"))
    values = (ROOT / "helm" / "trainguard" / "values.yaml").read_text()
    assert f"runAsUser: {uid}" in values


def test_entrypoint_serves_on_every_interface_with_the_store_in_data(stages: list[Stage]) -> None:
    (entry,) = stages[-1].all("ENTRYPOINT")
    argv = json.loads(entry)  # exec form: signals reach the daemon, which shuts down gracefully on SIGTERM
    assert argv[0] == "trainguard"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.host == "0.0.0.0" and args.db == "/data/trainguard.db"
    assert stages[-1].all("VOLUME") == ['["/data"]']
    exposed = {int(p) for e in stages[-1].all("EXPOSE") for p in e.split()}
    defaults = DaemonConfig()
    assert exposed == {defaults.grpc_port, defaults.http_port}
    (health,) = stages[-1].all("HEALTHCHECK")
    assert f"127.0.0.1:{defaults.http_port}/healthz" in health


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (relative, with /) out of the context: the last matching pattern wins,
    and a pattern that matches a parent folder matches what is inside it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pat in patterns:
        negate = pat.startswith("!")
        body = pat[1:] if negate else pat
        rx = re.escape(body.strip("/")).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, p) for p in prefixes):
            result = not negate
    return result


def test_builder_stage_builds_a_wheel_without_training_dependencies(stages: list[Stage], tmp_path: Path) -> None:
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    context = tmp_path / "context"
    for rel in tracked:
        if not ignored(rel, patterns) and (ROOT / rel).is_file():
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, context / rel)
    assert not (context / "tests").exists() and not (context / "helm").exists()
    # The builder's COPY lines, from that context into its WORKDIR.
    src = tmp_path / "src"
    src.mkdir()
    for copy in stages[0].all("COPY"):
        *sources, dest = copy.split()
        d = src / dest
        for s in sources:
            p = context / s
            assert p.exists(), f"COPY {s}: not in the build context (see .dockerignore)"
            if p.is_dir():  # a folder's contents go into dest
                shutil.copytree(p, d, dirs_exist_ok=True)
            elif dest.endswith("/"):
                d.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, d / p.name)
            else:
                d.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, d)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("trainguard-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = Parser().parsestr(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    # The daemon's code, the generated protobuf modules it imports, and the probes package are all in the wheel.
    for module in ("monitor/cli.py", "monitor/daemon/app.py", "monitor/daemon/http.py", "probes/__init__.py"):
        assert module in names
    assert any(n.startswith("monitor/_pb/") and n.endswith("_pb2.py") for n in names)
    base = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    base = [r for r in base if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert base and not {r.name.lower() for r in base} & TRAINING_ONLY
    # ... nor anywhere below them, as installed here.
    assert not closure([r.name for r in base]) & TRAINING_ONLY


def closure(names: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen
