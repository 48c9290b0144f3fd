"""docs/operations.md, "Installation (systemd)", steps 2 to 4, run as written on this
machine: configuration, credentials, migrate and meter add. Only the paths move (under a
temporary root) and systemctl is left out; tests/test_systemd_nspawn.py runs every step
unchanged under a real systemd."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import install_guide

from ingestd.signature import generate_private_key, public_key_pem
from services import PostgresServer


def run_guide(root: Path, workdir: Path, steps: range) -> subprocess.CompletedProcess[str]:
    script = install_guide.shell(steps)
    script = script.replace("/opt/ingestd/bin/ingestd", f"{sys.executable} -m ingestd.cli")
    script = script.replace(" /etc/", f" {root}/etc/").replace("=/etc/", f"={root}/etc/")
    # systemd's part needs a real systemd: the nspawn test runs it.
    script = "\n".join(line for line in script.splitlines() if not line.startswith("systemctl "))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    return subprocess.run(
        ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=120, check=False
    )


async def test_guide_steps_configure_credentials_migrate_register(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """A fresh database, the guide's configuration (client certificate and head-end kid
    set, their keys left to the unit's credentials): every command must succeed."""
    url = await asyncio.to_thread(pg_server.create_database, f"guide_{os.getpid()}_{id(tmp_path):x}")
    root, work = tmp_path / "root", tmp_path / "src"
    (root / "etc").mkdir(parents=True)
    work.mkdir()
    toml = install_guide.config_toml().replace("/etc/", f"{root}/etc/")
    toml = install_guide.with_setting(toml, "database", "url", url)
    toml = install_guide.with_setting(toml, "mqtt", "url", "mqtts://127.0.0.1:8883")
    (work / "ingestd.toml").write_text(toml, encoding="utf-8")
    # What the operator brings: certificates, the broker client key, the password, a meter key.
    for name in ("db-ca.crt", "mqtt-ca.crt", "mqtt-client.crt", "mqtt-client.key"):
        (work / name).write_text("-----BEGIN PLACEHOLDER-----\n", encoding="utf-8")
    (work / "db-password").write_text("not-needed-with-trust\n", encoding="utf-8")
    meter_key = generate_private_key("ES256")
    (work / "meter.pub.pem").write_bytes(public_key_pem(meter_key.public_key()))

    proc = await asyncio.to_thread(run_guide, root, work, range(2, 5))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "applied 0001_" in proc.stdout
    assert "meter M-000123: key M-000123-2026 (ES256) registered" in proc.stdout

    assert (root / "etc" / "ingestd" / "ingestd.toml").stat().st_mode & 0o777 == 0o644
    assert (root / "etc" / "credstore").stat().st_mode & 0o777 == 0o700
    for name in ("ingestd-db-password", "ingestd-mqtt-client.key", "ingestd-headend.pem"):
        assert (root / "etc" / "credstore" / name).stat().st_mode & 0o777 == 0o600, name
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT alg FROM meter_keys WHERE kid = 'M-000123-2026'") == "ES256"
    finally:
        await conn.close()


def test_guide_blocks_are_found() -> None:
    """The parser sees every step's block: a guide rewritten out of its reach fails here."""
    steps = [(b.step, b.lang) for b in install_guide.blocks()]
    # Step 5 is the database administrator's (the roles, docs/security.md): SQL, not run here.
    assert steps == [(1, "sh"), (2, "toml"), (2, "sh"), (3, "sh"), (4, "sh"), (5, "sql"), (5, "sql")]
    assert "systemctl enable --now ingestd" in install_guide.shell(range(4, 5))


def test_daemon_without_its_credentials_refuses_the_guides_configuration(tmp_path: Path) -> None:
    """`run` connects and signs: without the unit's credentials its keys are missing, and
    that is one line naming the setting, exit 2, before anything is connected."""
    config = tmp_path / "ingestd.toml"
    config.write_text(install_guide.config_toml(), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    proc = subprocess.run(
        [sys.executable, "-m", "ingestd.cli", "run", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "ingestd: error: mqtt.cert_file: cert_file and key_file go together\n"
