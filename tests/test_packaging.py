"""The Docker image without a container engine: lint the Dockerfile by hand, then run its install
commands and its entrypoint in a fresh venv (Python 3.12 when available, like the base image)."""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector import __version__, metrics
from connector.configdoc import render
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.storage.local import LocalStorage
from tests.support.connector import ROOT, caught_up, wait_until

Instruction = tuple[str, str]


def parse_dockerfile(path: Path) -> list[Instruction]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


DOCKERFILE = parse_dockerfile(ROOT / "Dockerfile")


def args_of(name: str) -> list[str]:
    return [a for i, a in DOCKERFILE if i == name]


def env_of() -> dict[str, str]:
    env: dict[str, str] = {}
    for arg in args_of("ENV"):
        for item in shlex.split(arg):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def dockerignore_allows(rel: str) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    allowed = True
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        pat = line.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        pat = pat[3:] if pat.startswith("**/") else pat
        parts = rel.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))] + parts
        if any(fnmatch.fnmatch(c, pat) for c in candidates):
            allowed = negate
    return allowed


# -- hadolint-style rules, by hand ------------------------------------------------------------


def test_base_image_is_pinned() -> None:
    froms = args_of("FROM")
    assert len(froms) == 1
    image = froms[0].split()[0]
    name, _, tag = image.partition(":")
    assert name == "python" and tag, "DL3006: tag the base image"
    assert tag != "latest" and "latest" not in image, "DL3007: no latest"
    assert re.match(r"^3\.12(\.\d+)?-slim", tag), tag


def test_runs_as_a_non_root_user() -> None:
    users = args_of("USER")
    assert users, "DL3002: set a USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    last_user = max(i for i, (ins, _) in enumerate(DOCKERFILE) if ins == "USER")
    assert all(ins != "RUN" for ins, _ in DOCKERFILE[last_user:]), "nothing runs as root later"


def test_exec_form_entrypoint_and_cmd() -> None:
    (entry,) = args_of("ENTRYPOINT")
    (cmd,) = args_of("CMD")
    assert json.loads(entry) == ["/entrypoint.sh"]
    assert json.loads(cmd) == ["run"]
    (health,) = args_of("HEALTHCHECK")
    assert "--interval=" in health and json.loads(health.split("CMD", 1)[1]) == [
        "/entrypoint.sh",
        "healthcheck",
    ]


def test_run_lines_follow_the_rules() -> None:
    runs = args_of("RUN")
    for run in runs:
        for part in run.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                assert "--no-cache-dir" in words, f"DL3042: {part}"
            assert words[:1] != ["cd"], "DL3003: use WORKDIR"
            assert "sudo" not in words, "DL3004"
            if words[:2] == ["apt-get", "install"]:
                assert "--no-install-recommends" in words, "DL3015"
    assert any("-r requirements.lock" in r for r in runs), "the lock file is installed"
    assert any(re.search(r"pip install .*--no-deps \.", r) for r in runs)
    assert not args_of("ADD"), "DL3020: COPY, not ADD"
    assert all(w.startswith(("/", "$")) for w in args_of("WORKDIR")), "DL3000"


def test_no_secrets_in_env_and_state_on_a_volume() -> None:
    env = env_of()
    for key in env:
        assert not re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY", key), f"secret in ENV: {key}"
    assert env["CONNECTOR_LOG_FORMAT"] == "json" and env["METRICS_ENABLED"] == "true"
    (volume,) = args_of("VOLUME")
    assert json.loads(volume) == ["/var/lib/opencti-sync"]
    assert env["ARCHIVE_URI"].startswith("/var/lib/opencti-sync/")
    assert env["OPENCTI_SYNC_WORK_DIR"].startswith("/var/lib/opencti-sync/")
    assert args_of("EXPOSE") == [env["METRICS_PORT"]]


def test_copied_files_exist_and_pass_dockerignore() -> None:
    for arg in args_of("COPY"):
        *sources, _dest = shlex.split(arg)
        for src in sources:
            assert not src.startswith("--from"), "single-stage image"
            assert (ROOT / src).exists(), src
            assert dockerignore_allows(src), f".dockerignore drops {src}"
    assert not dockerignore_allows("tests/test_packaging.py")
    assert not dockerignore_allows(".venv/bin/python")
    assert not dockerignore_allows("connector/__pycache__/x.pyc")


def test_entrypoint_execs_the_connector() -> None:
    script = (ROOT / "entrypoint.sh").read_text(encoding="utf-8")
    assert script.startswith("#!/bin/sh\n")
    lines = [ln.strip() for ln in script.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[-1] == 'exec opencti-sync "$@"', "exec: SIGTERM must reach the connector"
    assert os.access(ROOT / "entrypoint.sh", os.X_OK)
    assert subprocess.run(["sh", "-n", str(ROOT / "entrypoint.sh")]).returncode == 0


def test_compose_example() -> None:
    import yaml

    from connector.settings import iter_keys

    doc = yaml.safe_load((ROOT / "docs" / "docker-compose.example.yml").read_text())
    services = doc["services"]
    assert {"opencti", "worker", "redis", "elasticsearch", "minio", "rabbitmq"} <= set(services)
    for name, svc in services.items():
        if "image" in svc:
            assert re.search(r":\$\{[A-Z_]+:-[^}]+\}$", svc["image"]), f"{name}: tag as a variable"
    sync = services["opencti-sync"]
    env = dict(item.split("=", 1) for item in sync["environment"])
    known = {k.env: k for k in iter_keys()}
    assert set(env) <= set(known), set(env) - set(known)
    for key, value in env.items():
        if known[key].secret:
            assert value.startswith("${"), f"{key}: secrets come from .env"
    assert env["ARCHIVE_URI"].startswith("s3://") and env["S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["METRICS_ENABLED"] == "true"
    assert sync["volumes"] == ["opencti-sync-state:/var/lib/opencti-sync"]
    assert sync["build"] == ".." and (ROOT / "docs" / ".." / "Dockerfile").is_file()


# -- the same install line and entrypoint, in a fresh venv ------------------------------------


def python312() -> str:
    """The base image's Python when this machine has it, else the running interpreter."""
    found = [shutil.which("python3.12")] + sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))
    )
    for exe in found:
        if exe and subprocess.run([exe, "--version"], capture_output=True).returncode == 0:
            return exe
    return sys.executable


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A fresh venv built by the Dockerfile's COPY and ``pip install`` steps, run in order."""
    tmp = tmp_path_factory.mktemp("image")
    venv, context = tmp / "venv", tmp / "opt"
    context.mkdir()
    subprocess.run([python312(), "-m", "venv", str(venv)], check=True)
    path = f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"
    run_env = {**os.environ, "PATH": path, **env_of(), "OPENCTI_SYNC_WORK_DIR": str(tmp / "w")}
    run_env.pop("PYTHONPATH", None)
    for ins, arg in DOCKERFILE:
        if ins == "COPY":
            *sources, dest = shlex.split(arg)
            for src in sources:
                target = context / dest if not dest.startswith("/") else tmp / dest.lstrip("/")
                if (ROOT / src).is_dir():
                    shutil.copytree(
                        ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / src, target if not dest.endswith("/") else context)
        elif ins == "RUN" and arg.startswith("pip "):
            # The exact command, by the venv's pip (first on PATH, as in the image).
            out = subprocess.run(
                arg, shell=True, cwd=context, env=run_env, capture_output=True, text=True
            )
            assert out.returncode == 0, f"{arg}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    yield {
        "entrypoint": str(tmp / "entrypoint.sh"),
        "env": run_env,
        "tmp": tmp,
        "python": str(venv / "bin" / "python"),
    }


@pytest.mark.slow
def test_installed_image_runs_the_cli(image: dict[str, object]) -> None:
    entry, env = str(image["entrypoint"]), dict(image["env"])  # type: ignore[call-overload]
    tmp = str(image["tmp"])
    out = subprocess.run([entry, "--version"], env=env, cwd=tmp, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"opencti-sync {__version__}"
    out = subprocess.run([entry, "config-doc"], env=env, cwd=tmp, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == render("markdown")
    # Installed from the lock, not from this checkout: the venv imports its own copy.
    where = subprocess.run(
        [str(image["python"]), "-c", "import connector; print(connector.__file__)"],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
    )
    assert str(ROOT) not in where.stdout and "site-packages" in where.stdout
    freeze = subprocess.run(
        [str(image["python"]), "-m", "pip", "freeze"], capture_output=True, text=True
    ).stdout
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            assert line.lower().replace("_", "-") in freeze.lower().replace("_", "-"), line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_healthcheck_probes_the_metrics_endpoint(image: dict[str, object]) -> None:
    entry, env = str(image["entrypoint"]), dict(image["env"])  # type: ignore[call-overload]
    port = _free_port()
    env["METRICS_PORT"] = str(port)

    def probe(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [entry, "healthcheck"], env={**env, **extra}, capture_output=True, text=True
        )

    assert probe().returncode != 0, "nothing listens yet"
    stop = metrics.serve("127.0.0.1", port)
    old = metrics.REGISTRY.get_sample_value("opencti_sync_checkpoint_timestamp_seconds") or 0.0
    try:
        metrics.CHECKPOINT_TIMESTAMP.set(0)
        ok = probe()
        assert ok.returncode == 0 and ok.stdout.strip() == "healthy", ok.stderr
        metrics.CHECKPOINT_TIMESTAMP.set(1_000_000)  # an event from 1970: far behind
        assert probe().returncode == 0, "lag is not checked by default"
        late = probe(HEALTHCHECK_MAX_LAG_SECS="600")
        assert late.returncode != 0 and "checkpoint lag" in late.stderr
        assert probe(METRICS_ENABLED="false").returncode != 0
    finally:
        metrics.CHECKPOINT_TIMESTAMP.set(old)
        stop()
    assert probe().returncode != 0


@pytest.mark.slow
def test_sigterm_reaches_the_connector_through_the_entrypoint(image: dict[str, object]) -> None:
    entry, env = str(image["entrypoint"]), dict(image["env"])  # type: ignore[call-overload]
    tmp = Path(str(image["tmp"]))
    store = SimStore()
    generate(store, 30, seed=5, mix="creates")
    sim = SimServer(token="tok-image", heartbeat_secs=0.2, store=store).start()
    archive = tmp / "archive"
    env.update(
        OPENCTI_URL=sim.url,
        OPENCTI_TOKEN="tok-image",
        ARCHIVE_URI=str(archive),
        ARCHIVE_MAX_AGE_SECS="0.3",
        METRICS_PORT=str(_free_port()),
        METRICS_HOST="127.0.0.1",
    )
    log = tmp / "run.log"
    try:
        with open(log, "wb") as out:
            # ENTRYPOINT + CMD, as the container runtime joins them.
            argv = [entry, *json.loads(args_of("CMD")[0])]
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, cwd=tmp)
            try:
                wait_until(
                    lambda: (
                        proc.poll() is not None
                        or caught_up(LocalStorage(archive), store.last_event_id)
                    ),
                    what="the archive",
                )
                assert proc.poll() is None, log.read_text()[-2000:]
            finally:
                proc.send_signal(signal.SIGTERM)  # to the entrypoint's pid: exec made it ours
                rc = proc.wait(60)
    finally:
        sim.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert rc == 0, log.read_text()[-2000:]
    assert [r["message"] for r in lines][-1] == "Stopped."
    assert any(r["message"] == "Stop requested; draining." for r in lines)
    assert (tmp / "w").is_dir(), "the entrypoint prepared the work dir"
