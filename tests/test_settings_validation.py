"""Settings validation: secrets cleaned at load, empty typed values, dates, numbers, schedules.

Every bad value is a ConfigError naming the key (the CLI exits 2), caught at load, so `check`
refuses what `run` would refuse and nothing crashes later with a traceback.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from connector.errors import ConfigError
from connector.settings import KeyDoc, iter_keys, load_settings
from connector.sim.generator import generate
from connector.sim.server import SimServer
from tests.support.connector import ROOT
from tests.support.served import free_port

TOKEN = "tok-SETTINGS-7d1e2f3a4b5c"
SECRET_ENVS = [k.env for k in iter_keys() if k.secret]
TYPED = [k for k in iter_keys() if k.type in ("bool", "int", "float")]


def _key(env: str) -> KeyDoc:
    return next(k for k in iter_keys() if k.env == env)


def _cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(cwd)}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


# -- 1. secrets: surrounding whitespace stripped, control characters refused ------------------


@pytest.mark.parametrize("env_name", SECRET_ENVS)
@pytest.mark.parametrize("raw", [TOKEN + "\n", f"  {TOKEN}\r\n", f"\t{TOKEN} "])
def test_secret_surrounding_whitespace_is_stripped(env_name: str, raw: str) -> None:
    env = {env_name: raw}
    if env_name == "TARGET_OPENCTI_TOKEN":
        env["TARGET_OPENCTI_URL"] = "http://target.example.org"
    key = _key(env_name)
    settings = load_settings(None, env=env)
    section, name = key.path.split(".", 1)
    assert getattr(getattr(settings, section), name) == TOKEN
    assert TOKEN in settings.secrets()


def test_secret_from_a_yaml_block_scalar_is_stripped(tmp_path: Path) -> None:
    # `token: |` keeps the final newline, like a value pasted from a secret file.
    path = tmp_path / "config.yml"
    path.write_text(f"opencti:\n  token: |\n    {TOKEN}\n", encoding="utf-8")
    assert load_settings(path, env={}).opencti.token == TOKEN


@pytest.mark.parametrize("env_name", SECRET_ENVS)
@pytest.mark.parametrize("bad", ["tok-abc\ndef", "tok\x00abcd", "tok\x1b[31mabcd", "tok\x7fabcd"])
def test_secret_with_control_characters_is_refused_without_showing_it(
    env_name: str, bad: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={env_name: bad})
    assert err.value.key == _key(env_name).path
    assert env_name in str(err.value)
    assert "abcd" not in str(err.value) and bad not in str(err.value)


def test_token_read_with_a_newline_still_works_and_never_leaks(tmp_path: Path) -> None:
    """rv/token_newline_leak.sh: httpx refused 'Bearer <token>\\n' and its error, with the token
    escaped, was printed unredacted. Now the token is stripped at load and `check` passes."""
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 5, seed=3, mix="creates")
        env = {
            "OPENCTI_URL": sim.url,
            "OPENCTI_TOKEN": TOKEN + "\n",
            "ARCHIVE_URI": str(tmp_path / "a"),
            "OPENCTI_SYNC_WORK_DIR": str(tmp_path / "w"),
            "CONNECTOR_REGISTER": "false",
            "CONNECTOR_LOG_FORMAT": "json",
        }
        done = _cli(env, tmp_path, "check")
    assert done.returncode == 0, done.stderr[-2000:]
    assert TOKEN not in done.stdout + done.stderr
    assert "Illegal header" not in done.stdout + done.stderr


@pytest.mark.parametrize("failing", ["source", "unreachable", "archive"])
def test_check_exits_1_when_a_check_fails(tmp_path: Path, failing: str) -> None:
    """`check` is what an operator (or a deployment's probe) runs before `run`: a FAIL line
    alone, exit code 0, would pass that probe."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 5, seed=3, mix="creates")
        env = {
            "OPENCTI_URL": f"http://127.0.0.1:{free_port()}"
            if failing == "unreachable"
            else sim.url,
            "OPENCTI_TOKEN": "wrong-token-0123" if failing == "source" else TOKEN,
            "ARCHIVE_URI": str(blocker / "a" if failing == "archive" else tmp_path / "a"),
            "CONNECTOR_REGISTER": "false",
        }
        done = _cli(env, tmp_path, "check")
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["source", "OK" if failing == "archive" else "FAIL"],
        ["archive", "FAIL" if failing == "archive" else "OK"],
    ], lines


def test_check_asks_the_raw_stream_at_its_own_path(tmp_path: Path) -> None:
    """CONNECTOR_LIVE_STREAM_ID=raw follows /stream, not a collection named "raw"."""
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 5, seed=3, mix="creates")  # an empty raw stream is a 500
        env = {
            "OPENCTI_URL": sim.url,
            "OPENCTI_TOKEN": TOKEN,
            "ARCHIVE_URI": str(tmp_path / "a"),
            "CONNECTOR_LIVE_STREAM_ID": "raw",
        }
        done = _cli(env, tmp_path, "check")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert done.stdout.splitlines()[0].split() == ["source", "OK", f"{sim.url}/stream"]


def test_control_character_in_a_token_exits_2_naming_the_key(tmp_path: Path) -> None:
    done = _cli(
        {"OPENCTI_URL": "http://127.0.0.1:9", "OPENCTI_TOKEN": f"{TOKEN}\nX-Evil: 1"},
        tmp_path,
        "check",
    )
    assert done.returncode == 2, done.stderr
    assert "opencti.token" in done.stderr and "OPENCTI_TOKEN" in done.stderr
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.parametrize("env_name", SECRET_ENVS)
def test_a_non_ascii_secret_is_refused_without_showing_it(env_name: str) -> None:
    """It goes into an HTTP header or a signature: httpx failed on it deep inside a request,
    and `run` retried that for ever as a transient error."""
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={env_name: "tok-€uro-abcd"})
    assert err.value.key == _key(env_name).path and "non-ASCII" in str(err.value)
    assert "abcd" not in str(err.value)


@pytest.mark.parametrize("command", ["restore", "verify"])
def test_a_platform_url_given_on_the_command_line_carries_no_credentials(
    tmp_path: Path, command: str
) -> None:
    """As for the configured URLs: a restore stored it in its progress file and logged it."""
    flag = "--opencti" if command == "restore" else "--against-opencti"
    url = "http://admin:PASS-9876@127.0.0.1:9"
    args = [command, "--archive", str(tmp_path / "a"), flag, url, "--token", TOKEN]
    done = _cli({}, tmp_path, *args)
    assert done.returncode == 2, done.stderr
    assert flag in done.stderr and "credentials" in done.stderr
    assert "PASS-9876" not in done.stdout + done.stderr
    assert not list(tmp_path.rglob("restore-progress.json"))


def test_a_config_file_yaml_error_does_not_print_the_line(tmp_path: Path) -> None:
    """PyYAML's message quotes the offending line, which can be the token's."""
    path = tmp_path / "config.yml"
    path.write_text(f'opencti:\n  url: http://127.0.0.1:9\n  token: "{TOKEN}\n', encoding="utf-8")
    done = _cli({}, tmp_path, "check", "--config", str(path))
    assert done.returncode == 2, done.stderr
    assert "not valid YAML" in done.stderr and "line " in done.stderr
    assert TOKEN not in done.stdout + done.stderr


# -- 2. an empty value of a typed key means "not set" ----------------------------------------


@pytest.mark.parametrize("key", TYPED, ids=lambda k: k.env)
@pytest.mark.parametrize("empty", ["", "  "])
def test_empty_typed_value_is_the_default(key: KeyDoc, empty: str) -> None:
    section, name = key.path.split(".", 1)
    settings = load_settings(None, env={key.env: empty})
    assert getattr(getattr(settings, section), name) == key.default


def test_empty_env_never_turns_tls_or_deletes_off() -> None:
    # docker compose `- S3_VERIFY=${S3_VERIFY}` with the variable unset gives S3_VERIFY="".
    env = {
        "OPENCTI_SSL_VERIFY": "",
        "S3_VERIFY": "",
        "TARGET_SSL_VERIFY": "",
        "CONNECTOR_LIVE_STREAM_LISTEN_DELETE": "",
    }
    s = load_settings(None, env=env)
    assert s.opencti.ssl_verify is True and s.s3.verify is True and s.target.ssl_verify is True
    assert s.connector.live_stream_listen_delete is True
    assert s.s3_options()["verify"] is True


def test_empty_env_falls_back_to_the_yaml_value(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(
        "s3: {verify: false}\nretention: {keep_days: 7, keep_snapshots: ~}\n", encoding="utf-8"
    )
    s = load_settings(path, env={"S3_VERIFY": "", "RETENTION_KEEP_DAYS": ""})
    assert s.s3.verify is False  # the operator's explicit yaml value, not the empty env
    assert s.retention.keep_days == 7
    assert s.retention.keep_snapshots == 0  # yaml null: the default


def test_an_empty_variable_blanking_a_config_file_value_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A compose file's ``ARCHIVE_URI=${ARCHIVE_URI}`` left unset blanks the archive the config
    file names: that still wins (an empty variable is how the image's default is turned off),
    but not in silence. A variable that blanks nothing, or a typed key, says nothing."""
    path = tmp_path / "config.yml"
    path.write_text(
        "archive: {uri: /var/lib/backup}\ns3: {verify: false}\n"
        "target: {opencti_url: 'http://b:8080', opencti_token: t-0123456789}\n",
        encoding="utf-8",
    )
    env = {"ARCHIVE_URI": "", "S3_VERIFY": "", "S3_STORAGE_CLASS": "", "TARGET_AMQP_HOST": ""}
    with caplog.at_level(logging.WARNING, logger="connector.settings"):
        s = load_settings(path, env=env)
    assert s.archive.uri == ""
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert "ARCHIVE_URI is set but empty" in warned[0] and "archive.uri" in warned[0]
    assert "/var/lib/backup" not in warned[0]  # values are never shown (some are secrets)


def test_explicit_false_words_still_work() -> None:
    for word in ("false", "no", "0", "off", "FALSE"):
        assert load_settings(None, env={"S3_VERIFY": word}).s3.verify is False
    for word in ("true", "yes", "1", "on", "On"):
        assert load_settings(None, env={"S3_PATH_STYLE": word}).s3.path_style is True
    # The tri-state TLS word of the amqp transport: 'auto' (as announced) is no typo.
    assert load_settings(None, env={"TARGET_AMQP_USE_SSL": "auto"}).target.amqp_use_ssl == "auto"
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={"S3_VERIFY": "maybe"})
    assert err.value.key == "s3.verify"


# -- 3. the recover date -------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["31/12/2025", "yesterday", "2025-13-01", "2025-12-31T25:00:00Z", "1969-12-31T00:00:00Z"]
)
def test_bad_recover_date_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={"CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE": bad})
    assert err.value.key == "connector.live_stream_recover_iso_date"
    assert "CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE" in str(err.value)


@pytest.mark.parametrize(
    "good",
    ["2025-12-31", "2025-12-31T00:00:00Z", "2025-12-31T23:59:59.123Z", "2025-06-01T12:00:00+02:00"],
)
def test_iso_recover_dates_are_accepted(good: str) -> None:
    s = load_settings(None, env={"CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE": good})
    assert s.connector.live_stream_recover_iso_date == good


def test_bad_recover_date_exits_2_before_anything_is_written(tmp_path: Path) -> None:
    env = {
        "OPENCTI_URL": "http://127.0.0.1:9",
        "OPENCTI_TOKEN": TOKEN,
        "ARCHIVE_URI": str(tmp_path / "a"),
        "CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE": "31/12/2025",
    }
    done = _cli(env, tmp_path, "run")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "connector.live_stream_recover_iso_date" in done.stderr
    assert not (tmp_path / "a").exists(), "no checkpoint may hold the bad date"


# -- 4. numbers, retention values and schedules --------------------------------------------


@pytest.mark.parametrize("key", [k for k in TYPED if k.type == "float"], ids=lambda k: k.env)
@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_non_finite_floats_are_refused(key: KeyDoc, bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={key.env: bad})
    assert err.value.key == key.path and key.env in str(err.value)


def test_non_finite_float_from_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text("archive: {max_age_secs: .inf}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert err.value.key == "archive.max_age_secs"


@pytest.mark.parametrize(
    ("env_name", "path"),
    [
        ("RETENTION_KEEP_DAYS", "retention.keep_days"),
        ("RETENTION_KEEP_SNAPSHOTS", "retention.keep_snapshots"),
    ],
)
def test_negative_retention_values_are_refused(env_name: str, path: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={env_name: "-3"})
    assert err.value.key == path


@pytest.mark.parametrize("bad", ["0", "-5"])
def test_a_shutdown_timeout_must_be_positive(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={"CONNECTOR_SHUTDOWN_TIMEOUT_SECS": bad})
    assert err.value.key == "connector.shutdown_timeout_secs"


def test_a_spill_limit_below_64_kib_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={"CONNECTOR_SPILL_BYTES": "1000"})
    assert err.value.key == "connector.spill_bytes"


@pytest.mark.parametrize("bad", ["0", "0.5", "-1"])
def test_a_run_lease_must_last_a_second_at_least(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={"CONNECTOR_LEASE_SECS": bad})
    assert err.value.key == "connector.lease_secs"


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_the_largest_file_carried_to_a_target_must_be_positive(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={"TARGET_MAX_FILE_MB": bad})
    assert err.value.key == "target.max_file_mb" and "TARGET_FILES" in str(err.value)


def test_a_relative_file_uri_is_refused(tmp_path: Path) -> None:
    """``file://var/lib/x`` (two slashes, a compose-file typo) would be a path relative to
    wherever the process runs; ``file:///var/lib/x`` is meant."""
    done = _cli({}, tmp_path, "status", "--archive", "file://var/lib/opencti-sync")
    assert done.returncode == 2 and "archive.uri" in done.stderr and "file:///" in done.stderr
    assert not (tmp_path / "var").exists()
    ok = _cli({}, tmp_path, "status", "--archive", f"file://{tmp_path}/a")
    assert "configuration error" not in ok.stderr


@pytest.mark.parametrize(
    ("env_name", "path"),
    [
        ("SNAPSHOT_SCHEDULE", "snapshot.schedule"),
        ("RETENTION_SCHEDULE", "retention.schedule"),
    ],
)
@pytest.mark.parametrize("bad", ["every 6 hours", "daily", "* * *", "61 * * * *", "every 0s"])
def test_unparseable_schedules_are_refused(env_name: str, path: str, bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={env_name: bad})
    assert err.value.key == path


@pytest.mark.parametrize("good", ["", "every 6h", "every 30m", "0 3 * * *", "*/15 * * * 1-5"])
def test_valid_schedules_are_accepted(good: str) -> None:
    s = load_settings(None, env={"SNAPSHOT_SCHEDULE": good, "RETENTION_SCHEDULE": good})
    assert s.snapshot.schedule == good and s.retention.schedule == good


def test_check_refuses_what_run_refuses(tmp_path: Path) -> None:
    """rv/check_misses_config.sh: `check` exited 0 with settings `run` rejects or crashes on."""
    base = {"OPENCTI_URL": "http://127.0.0.1:9", "OPENCTI_TOKEN": TOKEN}
    for extra, key in (
        ({"SNAPSHOT_SCHEDULE": "every 6 hours"}, "snapshot.schedule"),
        ({"RETENTION_KEEP_DAYS": "-3"}, "retention.keep_days"),
        ({"CONNECTOR_READ_TIMEOUT_SECS": "nan"}, "connector.read_timeout_secs"),
    ):
        done = _cli({**base, **extra}, tmp_path, "check")
        assert done.returncode == 2, (extra, done.stderr[-2000:])
        assert key in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("env_name", "key"),
    [("OPENCTI_URL", "opencti.url"), ("TARGET_OPENCTI_URL", "target.opencti_url")],
)
def test_platform_urls_carry_no_credentials(env_name: str, key: str) -> None:
    """The source URL is stored in the checkpoint, shown by status and logged."""
    env = {
        "OPENCTI_URL": "http://opencti:8080",
        "OPENCTI_TOKEN": "tok-0123456789",
        "TARGET_OPENCTI_TOKEN": "tok-9876543210",
        env_name: "https://backup:Pr0xyPassw0rd@opencti.example.org",
    }
    with pytest.raises(ConfigError) as err:
        load_settings(None, env=env)
    assert err.value.key == key and "Pr0xyPassw0rd" not in str(err.value)


@pytest.mark.parametrize("env_name", ["SNAPSHOT_SCHEDULE", "RETENTION_SCHEDULE"])
def test_a_schedule_without_an_archive_is_refused(env_name: str) -> None:
    env = {
        "OPENCTI_URL": "http://opencti:8080",
        "OPENCTI_TOKEN": "tok-0123456789",
        "ARCHIVE_URI": "",
        "TARGET_OPENCTI_URL": "http://other:8080",
        "TARGET_OPENCTI_TOKEN": "tok-9876543210",
        env_name: "every 6h",
    }
    with pytest.raises(ConfigError) as err:
        load_settings(None, env=env)
    assert err.value.key == env_name.lower().replace("_", ".", 1)


@pytest.mark.parametrize("port", ["-5", "70000"])
def test_amqp_port_out_of_range_is_refused(port: str) -> None:
    env = {
        "OPENCTI_URL": "http://opencti:8080",
        "OPENCTI_TOKEN": "tok-0123456789",
        "TARGET_OPENCTI_URL": "http://other:8080",
        "TARGET_OPENCTI_TOKEN": "tok-9876543210",
        "TARGET_AMQP_PORT": port,
    }
    with pytest.raises(ConfigError) as err:
        load_settings(None, env=env)
    assert err.value.key == "target.amqp_port"


def test_amqp_overrides_with_the_api_transport_are_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {
        "OPENCTI_URL": "http://opencti:8080",
        "OPENCTI_TOKEN": "tok-0123456789",
        "TARGET_OPENCTI_URL": "http://other:8080",
        "TARGET_OPENCTI_TOKEN": "tok-9876543210",
        "TARGET_TRANSPORT": "api",
        "TARGET_AMQP_HOST": "rabbit.internal",
        "TARGET_SYNCHRONIZED": "true",
    }
    load_settings(None, env=env)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "target.amqp_host" in text and "target.synchronized has no effect" in text


# -- 5. each bound at its edge, and values of the wrong kind ---------------------------------

NOW_SECONDS = "1767225600"  # 2026-01-01 in epoch seconds: what pycti users often give


@pytest.mark.parametrize(
    "env",
    [
        {"CONNECTOR_MAX_EVENT_BYTES": "65536"},
        {"CONNECTOR_BACKOFF_INITIAL_SECS": "2", "CONNECTOR_BACKOFF_MAX_SECS": "2"},
        {"ARCHIVE_CODEC": "gzip", "ARCHIVE_COMPRESSION_LEVEL": "9"},
        {"ARCHIVE_CODEC": "zstd", "ARCHIVE_COMPRESSION_LEVEL": "19"},
        {"METRICS_PORT": "65535"},
        {"CONNECTOR_SPILL_BYTES": "65536"},
        {"CONNECTOR_LEASE_SECS": "1"},
        {"CONNECTOR_READ_TIMEOUT_SECS": "5.5"},
        {"CONNECTOR_LIVE_STREAM_START_TIMESTAMP": NOW_SECONDS + "000"},
        {"CONNECTOR_ID": "7C1D2E3F-0000-4000-8000-00000000BEEF"},
    ],
    ids=lambda env: " ".join(f"{k}={v}" for k, v in env.items()),
)
def test_a_value_at_its_bound_is_accepted(env: dict[str, str]) -> None:
    load_settings(None, env=env)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"CONNECTOR_MAX_EVENT_BYTES": "65535"}, "connector.max_event_bytes"),
        ({"ARCHIVE_CODEC": "gzip", "ARCHIVE_COMPRESSION_LEVEL": "10"}, "archive.compression_level"),
        ({"ARCHIVE_CODEC": "zstd", "ARCHIVE_COMPRESSION_LEVEL": "20"}, "archive.compression_level"),
        ({"METRICS_PORT": "65536"}, "metrics.port"),
        ({"CONNECTOR_READ_TIMEOUT_SECS": "5"}, "connector.read_timeout_secs"),
        ({"CONNECTOR_RETENTION_CHECK_SECS": "-1"}, "connector.retention_check_secs"),
        ({"ARCHIVE_CODEC": "zstd", "ARCHIVE_COMPRESSION_LEVEL": "0"}, "archive.compression_level"),
        ({"CONNECTOR_LOG_LEVEL": "verbose"}, "connector.log_level"),
        ({"TARGET_OPENCTI_URL": "http://other:8080"}, "target.opencti_token"),
        ({"S3_SSE": "aws:kms"}, "s3.kms_key_id"),
        (
            {"CONNECTOR_LIVE_STREAM_START_TIMESTAMP": NOW_SECONDS},
            "connector.live_stream_start_timestamp",
        ),
        ({"CONNECTOR_ID": "7c1d2e3f00004000800000000000beef"}, "connector.id"),
        ({"CONNECTOR_ID": "{7c1d2e3f-0000-4000-8000-00000000beef}"}, "connector.id"),
        ({"OPENCTI_URL": "ftp://opencti.example.org"}, "opencti.url"),
        ({"TARGET_AMQP_USE_SSL": "maybe"}, "target.amqp_use_ssl"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(f"{k}={x}" for k, x in v.items()),
)
def test_a_value_past_its_bound_is_refused(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env=env)
    assert err.value.key == key


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("archive: {max_events: true}\n", "archive.max_events"),
        ("metrics: {port: false}\n", "metrics.port"),
        ("archive: {max_age_secs: true}\n", "archive.max_age_secs"),
        ("archive: {max_events: 5.7}\n", "archive.max_events"),
    ],
)
def test_a_yaml_value_of_another_kind_is_no_count(tmp_path: Path, yaml_text: str, key: str) -> None:
    """``max_events: true`` is a slip (a key name misread), not 1 event per segment; 5.7
    events is no count, not 5."""
    path = tmp_path / "config.yml"
    path.write_text(yaml_text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert err.value.key == key


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("archive: {uri: off}\n", "archive.uri"),
        ("connector: {live_stream_id: yes}\n", "connector.live_stream_id"),
        ("opencti: {token: on}\n", "opencti.token"),
    ],
)
def test_a_yaml_boolean_for_a_text_key_is_refused(tmp_path: Path, yaml_text: str, key: str) -> None:
    """YAML reads an unquoted ``off`` as a boolean: ``uri: off`` was the archive ./False."""
    path = tmp_path / "config.yml"
    path.write_text(yaml_text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert err.value.key == key and "quote it" in str(err.value)
    path.write_text('archive: {uri: "off"}\n', encoding="utf-8")  # quoted: the text
    assert load_settings(path, env={}).archive.uri == "off"


def test_an_unknown_key_in_the_config_file_is_refused(tmp_path: Path) -> None:
    """A misspelt key (``max_event`` for ``max_events``) would leave the default in force."""
    path = tmp_path / "config.yml"
    path.write_text("archive: {max_event: 5}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert err.value.key == "archive.max_event"


def test_every_s3_setting_reaches_the_storage_options() -> None:
    """Temporary credentials need their session token (and the rest of what is set)."""
    env = {
        "S3_REGION": "eu-west-3",
        "S3_ENDPOINT_URL": "http://minio:9000",
        "S3_ACCESS_KEY_ID": "AKIA0123456789",
        "S3_SECRET_ACCESS_KEY": "secret-0123456789",
        "S3_SESSION_TOKEN": "session-0123456789",
        "S3_PROFILE": "backup",
        "S3_CA_BUNDLE": "/etc/ssl/minio.pem",
        "S3_SSE": "aws:kms",
        "S3_KMS_KEY_ID": "kms-key-1",
        "S3_STORAGE_CLASS": "STANDARD_IA",
    }
    opts = load_settings(None, env=env).s3_options()
    assert {k: v for k, v in opts.items() if k not in ("path_style", "verify")} == {
        "region": "eu-west-3",
        "endpoint_url": "http://minio:9000",
        "access_key_id": "AKIA0123456789",
        "secret_access_key": "secret-0123456789",
        "session_token": "session-0123456789",
        "profile": "backup",
        "ca_bundle": "/etc/ssl/minio.pem",
        "sse": "aws:kms",
        "kms_key_id": "kms-key-1",
        "storage_class": "STANDARD_IA",
    }


@pytest.mark.parametrize("shape", ["[{}]", "{{value: {}}}"])
def test_a_secret_of_the_wrong_type_is_refused_without_showing_it(
    tmp_path: Path, shape: str
) -> None:
    path = tmp_path / "config.yml"
    path.write_text(f"opencti:\n  token: {shape.format(TOKEN)}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert err.value.key == "opencti.token" and "OPENCTI_TOKEN" in str(err.value)
    assert TOKEN not in str(err.value) and TOKEN[-6:] not in str(err.value)


def test_a_settings_warning_is_shown_with_the_error_it_explains(tmp_path: Path) -> None:
    """The empty ``ARCHIVE_URI`` that blanks config.yml's archive is why a schedule is refused:
    the warning, held until the log format is known, is written though the logs never are."""
    config = tmp_path / "config.yml"
    config.write_text("archive: {uri: /var/lib/backup}\n", encoding="utf-8")
    env = {"ARCHIVE_URI": "", "SNAPSHOT_SCHEDULE": "every 6h"}
    done = _cli(env, tmp_path, "status", "--config", str(config))
    assert done.returncode == 2, done.stderr
    assert "snapshot.schedule" in done.stderr
    assert "ARCHIVE_URI is set but empty" in done.stderr


def test_a_missing_source_token_exits_2_naming_the_key(tmp_path: Path) -> None:
    """A source URL without its token is a configuration error said at once, naming the key
    and its variable, not a source that fails its check (or a run retrying a refusal)."""
    env = {"OPENCTI_URL": "http://127.0.0.1:9", "ARCHIVE_URI": str(tmp_path / "a")}
    done = _cli(env, tmp_path, "check")
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]
    assert "opencti.token" in done.stderr and "OPENCTI_TOKEN" in done.stderr


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"SNAPSHOT_SCHEDULE": "every 1000000000d", "ARCHIVE_URI": "/a"}, "snapshot.schedule"),
        ({"RETENTION_SCHEDULE": "every 999999999d", "ARCHIVE_URI": "/a"}, "retention.schedule"),
        ({"CONNECTOR_LEASE_SECS": "1e20"}, "connector.lease_secs"),
        ({"CONNECTOR_READ_TIMEOUT_SECS": "1e10"}, "connector.read_timeout_secs"),
        ({"RETENTION_KEEP_DAYS": "99999999999999999999"}, "retention.keep_days"),
        ({"OPENCTI_URL": "http://a..b/"}, "opencti.url"),
        ({"TARGET_OPENCTI_URL": "https://", "TARGET_OPENCTI_TOKEN": "t"}, "target.opencti_url"),
        ({"CONNECTOR_LIVE_STREAM_ID": ""}, "connector.live_stream_id"),
        ({"CONNECTOR_LIVE_STREAM_ID": "  "}, "connector.live_stream_id"),
    ],
)
def test_values_libraries_fail_on_later_are_refused_at_load(env: dict[str, str], key: str) -> None:
    """Each passed validation, then ended in an OverflowError or UnicodeError traceback (exit
    1) from a timer, a socket, a date or `status --json`; an empty stream id silently meant
    the raw stream, with no recovery."""
    with pytest.raises(ConfigError) as err:
        load_settings(None, env=env)
    assert err.value.key == key


@pytest.mark.parametrize("key", ["OPENCTI_CA_BUNDLE", "TARGET_CA_BUNDLE"])
def test_a_ca_bundle_that_cannot_be_read_is_refused_at_load(tmp_path: Path, key: str) -> None:
    """Read only when the stream's reader thread connected: the thread died, and `run` went on
    archiving nothing while its healthcheck said healthy."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    extra = {"TARGET_OPENCTI_URL": "https://t", "TARGET_OPENCTI_TOKEN": "t"}
    for path, reason in ((tmp_path / "missing.pem", "No such file"), (garbage, "")):
        with pytest.raises(ConfigError) as err:
            load_settings(None, env={key: str(path), **extra})
        assert err.value.key == _key(key).path and reason in str(err.value)
    done = _cli({"OPENCTI_URL": "https://127.0.0.1:9", key: str(garbage), **extra}, tmp_path, "run")
    assert done.returncode == 2, done.stderr[-2000:]
    assert _key(key).path in done.stderr and "Traceback" not in done.stderr


def test_metrics_that_cannot_be_served_exit_2_naming_the_key(tmp_path: Path) -> None:
    """A host that does not resolve, or a port taken, stopped `run` as "a local file error"
    (exit 1) without naming the setting."""
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            "OPENCTI_URL": sim.url,
            "OPENCTI_TOKEN": TOKEN,
            "ARCHIVE_URI": str(tmp_path / "a"),
            "OPENCTI_SYNC_WORK_DIR": str(tmp_path / "w"),
            "CONNECTOR_REGISTER": "false",
            "METRICS_ENABLED": "true",
        }
        for extra, key in (
            ({"METRICS_HOST": "no-such-host.invalid"}, "metrics.host"),
            ({"METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(taken.getsockname()[1])},
             "metrics.port"),
        ):  # fmt: skip
            done = _cli({**env, **extra}, tmp_path, "run")
            assert done.returncode == 2, done.stderr[-2000:]
            assert key in done.stderr and "Traceback" not in done.stderr


def test_the_archive_flag_counts_before_the_settings_are_checked(tmp_path: Path) -> None:
    """`--archive` is ARCHIVE_URI: a schedule (which needs an archive) was refused with "set
    archive.uri" when the archive came by the flag."""
    env = {"ARCHIVE_URI": "", "SNAPSHOT_SCHEDULE": "0 3 * * *"}
    done = _cli(env, tmp_path, "status", "--archive", str(tmp_path / "arch"))
    assert "set archive.uri" not in done.stderr and done.returncode == 1, done.stderr
    assert "no archive at" in done.stderr
