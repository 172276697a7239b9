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
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector import __version__, metrics
from connector.configdoc import render
from connector.errors import ConfigError
from connector.settings import image_defaults, iter_keys, load_settings
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.storage.local import LocalStorage
from tests.support.connector import ROOT, caught_up, wait_until
from tests.support.served import free_port

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
    defaults = image_defaults(env)
    assert defaults["CONNECTOR_LOG_FORMAT"] == "json" and defaults["METRICS_ENABLED"] == "true"
    (volume,) = args_of("VOLUME")
    assert json.loads(volume) == ["/var/lib/opencti-sync"]
    assert defaults["ARCHIVE_URI"].startswith("/var/lib/opencti-sync/")
    assert defaults["OPENCTI_SYNC_WORK_DIR"].startswith("/var/lib/opencti-sync/")
    assert args_of("EXPOSE") == [defaults["METRICS_PORT"]]


def test_image_env_sets_no_configuration_key() -> None:
    """A configuration key in ENV is in every container's environment and so beats the
    operator's config.yml; the image's defaults live in OPENCTI_SYNC_DEFAULTS, below it."""
    keys = {k.env for k in iter_keys()}
    assert not keys & set(env_of()), keys & set(env_of())
    assert set(image_defaults(env_of())) <= keys


def test_image_defaults_yield_to_a_config_file_and_env_to_both(tmp_path: Path) -> None:
    """rv/docker_env_override.py: `docker run ... run --config /config.yml` with archive.uri
    s3://... silently wrote to the local volume, because the image's ENV won."""
    image_env = env_of()
    config = tmp_path / "config.yml"
    config.write_text(
        "opencti: {url: https://opencti.example.org, token: abcd1234}\n"
        "archive: {uri: s3://my-bucket/opencti}\n"
        "connector: {work_dir: /scratch, log_format: text}\n"
        "metrics: {enabled: false, port: 9200}\n",
        encoding="utf-8",
    )
    s = load_settings(config, env=image_env)
    assert s.archive.uri == "s3://my-bucket/opencti"
    assert s.connector.work_dir == "/scratch" and s.connector.log_format == "text"
    assert s.metrics.enabled is False and s.metrics.port == 9200
    # Without a config file (or where it is silent) the image's defaults apply.
    s = load_settings(None, env=image_env)
    assert s.archive.uri == "/var/lib/opencti-sync/archive"
    assert s.connector.work_dir == "/var/lib/opencti-sync/work"
    assert s.connector.log_format == "json" and s.metrics.enabled is True
    config.write_text("archive: {uri: s3://my-bucket/opencti}\n", encoding="utf-8")
    s = load_settings(config, env=image_env)
    assert s.archive.uri == "s3://my-bucket/opencti" and s.metrics.enabled is True
    # docker run -e ... beats both.
    s = load_settings(config, env={**image_env, "ARCHIVE_URI": "/data/a", "METRICS_PORT": "9300"})
    assert s.archive.uri == "/data/a" and s.metrics.port == 9300


def test_bad_defaults_layer_is_a_config_error() -> None:
    for text in ("NOT_A_KEY=1", "ARCHIVE_URI", "OPENCTI_TOKEN=abcd1234", "ARCHIVE_URI='open"):
        with pytest.raises(ConfigError) as err:
            load_settings(None, env={"OPENCTI_SYNC_DEFAULTS": text})
        assert err.value.key == "OPENCTI_SYNC_DEFAULTS" and "abcd1234" not in str(err.value)


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


@pytest.mark.slow
def test_healthcheck_probes_the_metrics_endpoint(image: dict[str, object]) -> None:
    entry, env = str(image["entrypoint"]), dict(image["env"])  # type: ignore[call-overload]
    port = free_port()
    env["METRICS_PORT"] = str(port)

    def probe(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [entry, "healthcheck"], env={**env, **extra}, capture_output=True, text=True
        )

    assert probe().returncode != 0, "nothing listens yet"
    stop = metrics.serve("127.0.0.1", port)
    old = metrics.REGISTRY.get_sample_value("opencti_sync_checkpoint_timestamp_seconds") or 0.0
    try:
        metrics.RECOVER_PROGRESS.set(1.0)  # not recovering: the lag counts
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


def _entrypoint_healthcheck(**env: str) -> subprocess.CompletedProcess[str]:
    """This checkout's entrypoint.sh, run as the HEALTHCHECK runs it (its probe is stdlib only)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin"
    return subprocess.run(
        [str(ROOT / "entrypoint.sh"), "healthcheck"],
        env={"PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def metrics_port() -> Iterator[int]:
    port = free_port()
    stop = metrics.serve("127.0.0.1", port)
    gauges = (
        metrics.CHECKPOINT_TIMESTAMP,
        metrics.RECOVER_PROGRESS,
        metrics.CHECKPOINT_SAVED,
        metrics.STANDBY,
    )
    old = [next(iter(g.collect())).samples[0].value for g in gauges]
    try:
        yield port
    finally:
        for gauge, value in zip(gauges, old, strict=True):
            gauge.set(value)
        stop()


def test_healthcheck_checks_progress_not_lag_during_a_recovery(metrics_port: int) -> None:
    """rv/health_recovery.py: recovered events carry the objects' old timestamps, so the lag
    is years during a recovery; README: the lag check applies once it is done, and until then
    the checkpoint must keep being saved."""
    env = {
        "METRICS_ENABLED": "true",
        "METRICS_PORT": str(metrics_port),
        "HEALTHCHECK_MAX_LAG_SECS": "3600",
    }
    metrics.CHECKPOINT_TIMESTAMP.set(1_431_681_136.432)  # an id seen in a real recovery (2015)
    metrics.RECOVER_PROGRESS.set(0.3)
    metrics.CHECKPOINT_SAVED.set(time.time() - 60)  # the last batch a minute ago
    during = _entrypoint_healthcheck(**env)
    assert during.returncode == 0, during.stderr
    assert during.stdout.startswith("healthy")
    metrics.RECOVER_PROGRESS.set(1.0)  # recovery done: the same lag is a stale checkpoint
    done = _entrypoint_healthcheck(**env)
    assert done.returncode != 0 and "checkpoint lag" in done.stderr
    metrics.RECOVER_PROGRESS.set(0.0)  # a recovery before its first batch (no recovery: 1)
    assert _entrypoint_healthcheck(**env).returncode == 0
    # A recovery (the first, or a retention gap's repair after a restart) that stopped moving:
    # nothing saved for two hours. It said "lag not checked" and stayed healthy for good.
    metrics.RECOVER_PROGRESS.set(0.3)
    metrics.CHECKPOINT_SAVED.set(time.time() - 7200)
    stuck = _entrypoint_healthcheck(**env)
    assert stuck.returncode != 0 and "recovery stuck" in stuck.stderr
    metrics.STANDBY.set(1)  # waiting for the run that holds the archive: nothing to save
    standby = _entrypoint_healthcheck(**env)
    assert standby.returncode == 0 and "standby" in standby.stdout
    metrics.STANDBY.set(0)
    metrics.RECOVER_PROGRESS.set(1.0)
    metrics.CHECKPOINT_TIMESTAMP.set(time.time())
    ok = _entrypoint_healthcheck(**env)
    assert ok.returncode == 0 and ok.stdout.strip() == "healthy", ok.stderr


def test_healthcheck_reads_the_image_defaults(metrics_port: int) -> None:
    defaults = env_of()["OPENCTI_SYNC_DEFAULTS"].replace("METRICS_PORT=9095", "")
    env = {"OPENCTI_SYNC_DEFAULTS": f"{defaults} METRICS_PORT={metrics_port}"}
    ok = _entrypoint_healthcheck(**env)
    assert ok.returncode == 0 and ok.stdout.strip() == "healthy", ok.stderr
    off = _entrypoint_healthcheck(**env, METRICS_ENABLED="false")  # -e beats the image default
    assert off.returncode != 0 and "METRICS_ENABLED" in off.stderr
    empty = _entrypoint_healthcheck(**env, METRICS_ENABLED="", METRICS_PORT="")  # = unset
    assert empty.returncode == 0, empty.stderr


def test_healthcheck_names_a_lag_limit_that_is_not_seconds() -> None:
    """A limit of "30s" was a ValueError traceback; "nan" compared false: always healthy."""
    for value in ("30s", "nan", "inf"):
        bad = _entrypoint_healthcheck(METRICS_ENABLED="true", HEALTHCHECK_MAX_LAG_SECS=value)
        assert bad.returncode != 0
        assert "HEALTHCHECK_MAX_LAG_SECS must be a number of seconds" in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr


def test_entrypoint_runs_the_command_when_the_work_dir_cannot_be_made() -> None:
    """Its mkdir under `set -e` failed every command, those that never use the work dir too."""
    path = f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin"
    proc = subprocess.run(
        [str(ROOT / "entrypoint.sh"), "--version"],
        env={"PATH": path, "OPENCTI_SYNC_WORK_DIR": "/proc/no-such-dir"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"opencti-sync {__version__}"


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
        METRICS_PORT=str(free_port()),
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
