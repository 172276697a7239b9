"""The configuration reference is generated from settings.py and the committed copies are fresh."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from connector.configdoc import README_BEGIN, README_END, render, render_readme, update_files
from connector.errors import ConnectorError
from connector.settings import Settings, iter_keys, load_settings
from tests.support.connector import ROOT

ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
STALE = "stale: run `opencti-sync config-doc --update` from the repository root"


def _readme_block(text: str) -> str:
    return text[text.index(README_BEGIN) + len(README_BEGIN) : text.index(README_END)]


def test_sample_is_fresh() -> None:
    assert (ROOT / "config.yml.sample").read_text(encoding="utf-8") == render("yaml"), STALE


def test_readme_block_is_fresh() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _readme_block(readme).strip() == render("markdown").strip(), STALE


def test_every_key_has_env_type_and_description() -> None:
    keys = iter_keys()
    assert len(keys) > 20
    for k in keys:
        assert ENV_NAME.match(k.env), k.path
        assert k.description.strip().endswith((".", ")")), f"{k.path}: description is a sentence"
        assert k.type in ("str", "int", "float", "bool"), k.path
        assert isinstance(k.default, {"str": str, "int": int, "float": float, "bool": bool}[k.type])
        if k.choices:
            assert k.default in k.choices, k.path


def test_env_names_and_paths_unique() -> None:
    keys = iter_keys()
    envs = [k.env for k in keys]
    assert len(envs) == len(set(envs)), sorted(e for e in envs if envs.count(e) > 1)
    paths = [k.path for k in keys]
    assert len(paths) == len(set(paths))


def test_every_env_name_is_documented() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sample = (ROOT / "config.yml.sample").read_text(encoding="utf-8")
    for k in iter_keys():
        assert f"`{k.env}`" in readme, f"{k.env} missing from README"
        assert f"env {k.env}," in sample, f"{k.env} missing from config.yml.sample"


def test_sample_loads_back_to_the_defaults() -> None:
    # The generated sample must be valid configuration that changes nothing.
    data = yaml.safe_load(render("yaml"))
    assert set(data) == {k.path.split(".")[0] for k in iter_keys()}
    loaded = load_settings(ROOT / "config.yml.sample", env={})
    assert loaded == Settings()


def test_secrets_have_no_default_in_docs() -> None:
    secret_keys = [k for k in iter_keys() if k.secret]
    assert {k.env for k in secret_keys} >= {
        "OPENCTI_TOKEN",
        "S3_SECRET_ACCESS_KEY",
        "TARGET_OPENCTI_TOKEN",
    }
    sample = render("yaml")
    for k in secret_keys:
        assert f"  {k.path.split('.', 1)[1]}: ''  # secret" in sample


def test_update_rewrites_a_stale_copy(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stale = readme.replace(_readme_block(readme), "\n| old table |\n")
    (tmp_path / "README.md").write_text(stale, encoding="utf-8")
    (tmp_path / "config.yml.sample").write_text("old: sample\n", encoding="utf-8")
    changed = update_files(tmp_path)
    assert sorted(p.name for p in changed) == ["README.md", "config.yml.sample"]
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == render_readme(readme)
    assert (tmp_path / "config.yml.sample").read_text(encoding="utf-8") == render("yaml")
    # Text outside the markers is kept byte for byte; a second run changes nothing.
    assert render_readme(stale).split(README_BEGIN)[0] == readme.split(README_BEGIN)[0]
    assert update_files(tmp_path) == []


def test_cli_update_and_missing_markers(tmp_path: Path) -> None:
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    out = subprocess.run(
        [sys.executable, "-m", "connector", "config-doc", "--update"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"updated {tmp_path / 'config.yml.sample'}"
    (tmp_path / "README.md").write_text("# no markers\n", encoding="utf-8")
    with pytest.raises(ConnectorError, match="config-doc:begin"):
        update_files(tmp_path)


def test_descriptions_say_what_the_code_does() -> None:
    """Cron schedules run in UTC (connector.jobs); keep_snapshots counts besides the base
    snapshot (connector.retention), which is always kept."""
    docs = {k.env: k.description for k in iter_keys()}
    for env in ("SNAPSHOT_SCHEDULE", "RETENTION_SCHEDULE"):
        assert "UTC" in docs[env], env
    assert "every <N>s|m|h|d" in docs["SNAPSHOT_SCHEDULE"]
    assert "besides the base snapshot" in docs["RETENTION_KEEP_SNAPSHOTS"].lower()
    assert "always kept" in docs["RETENTION_KEEP_SNAPSHOTS"]


def test_empty_values_are_documented() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Configuration") : readme.index(README_BEGIN)]
    assert "empty value of a bool, int or float key" in " ".join(section.split())
    assert "counts as not set" in render("yaml")
