"""ingestd.config: a TOML file, overridden by INGESTD_* variables, validated once.

Every failure must be a ConfigError whose message names the offending setting, so an
operator can fix it from the one line the CLI prints.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ingestd.config import (
    Config,
    DatabaseConfig,
    IngestConfig,
    LogConfig,
    MetricsConfig,
    MqttConfig,
    load_config,
    parse_host_port,
    read_secret,
)
from ingestd.errors import ConfigError, UsageError

FULL_TOML = """\
[database]
url = "postgresql://reader@db.example:5433/meters"
password_file = "/run/credentials/ingestd/db"
pool_size = 8
connect_timeout_s = 5

[mqtt]
url = "mqtts://broker.example"
client_id = "ingestd-a"
topic_prefix = "site/meters"
shared_group = "ingest"
session_expiry_s = 3600
keepalive_s = 60
username = "ingestd"
reconnect_initial_s = 0.25
reconnect_max_s = 10.0

[ingest]
batch_max = 200
batch_wait_ms = 25
max_pending = 5000
verify_workers = 4
max_clock_skew_s = 120
key_refresh_s = 30.5

[metrics]
addr = "0.0.0.0:9200"

[log]
format = "json"
level = "debug"
"""


def write(tmp_path: Path, text: str, name: str = "ingestd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None = None, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    assert isinstance(info.value, UsageError)
    assert str(info.value).startswith(f"{info.value.key}: ")
    return info.value


# --- sources --------------------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    config = load_config(env={})
    assert config == Config()
    assert config.database.url == "postgresql://ingestd@127.0.0.1:5432/ingestd"
    assert config.mqtt.url == "mqtt://127.0.0.1:1883"
    assert config.mqtt.topic_prefix == "meters"
    assert config.ingest.batch_max == 1000
    assert config.ingest.max_clock_skew_s == 300
    assert config.metrics.addr == "127.0.0.1:9108"
    assert config.log == LogConfig(format="auto", level="info")


def test_process_environment_is_not_read_when_env_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGESTD_INGEST_BATCH_MAX", "not a number")
    assert load_config(env={}).ingest.batch_max == 1000


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGESTD_INGEST_BATCH_MAX", "7")
    assert load_config().ingest.batch_max == 7


def test_file_values_are_used(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_TOML), env={})
    assert config.database == DatabaseConfig(
        url="postgresql://reader@db.example:5433/meters",
        password_file="/run/credentials/ingestd/db",
        pool_size=8,
        connect_timeout_s=5.0,
    )
    assert isinstance(config.database.connect_timeout_s, float)  # an int in TOML, a float here
    assert config.mqtt.url == "mqtts://broker.example"
    assert config.mqtt.client_id == "ingestd-a"
    assert config.mqtt.topic_prefix == "site/meters"
    assert (config.mqtt.session_expiry_s, config.mqtt.keepalive_s) == (3600, 60)
    assert (config.mqtt.reconnect_initial_s, config.mqtt.reconnect_max_s) == (0.25, 10.0)
    assert config.ingest == IngestConfig(
        batch_max=200,
        batch_wait_ms=25,
        max_pending=5000,
        verify_workers=4,
        max_clock_skew_s=120,
        key_refresh_s=30.5,
    )
    assert config.metrics == MetricsConfig(addr="0.0.0.0:9200")
    assert config.log == LogConfig(format="json", level="debug")


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[ingest]\nbatch_max = 10\n"), env={})
    assert config.ingest == dataclasses.replace(IngestConfig(), batch_max=10)
    assert config.mqtt == MqttConfig()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == Config()


def test_path_may_be_a_string(tmp_path: Path) -> None:
    path = write(tmp_path, "[log]\nlevel = 'warning'\n")
    assert load_config(str(path), env={}).log.level == "warning"


def test_env_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "INGESTD_DATABASE_URL": "postgres://other@10.0.0.5/ingest",
        "INGESTD_MQTT_URL": "mqtt://10.0.0.6:1884",
        "INGESTD_METRICS_ADDR": "127.0.0.1:9300",
        "INGESTD_INGEST_BATCH_MAX": "500",
        "INGESTD_INGEST_KEY_REFRESH_S": "2.5",
        "INGESTD_INGEST_BATCH_WAIT_MS": "40",
        "INGESTD_DATABASE_POOL_SIZE": " 16 ",
        "INGESTD_LOG_LEVEL": "error",
    }
    config = load_config(write(tmp_path, FULL_TOML), env=env)
    assert config.database.url == "postgres://other@10.0.0.5/ingest"
    assert config.database.pool_size == 16
    assert config.database.password_file == "/run/credentials/ingestd/db"  # from the file
    assert config.mqtt.url == "mqtt://10.0.0.6:1884"
    assert config.mqtt.client_id == "ingestd-a"  # from the file
    assert config.metrics.addr == "127.0.0.1:9300"
    assert config.ingest.batch_max == 500
    assert type(config.ingest.batch_max) is int
    assert config.ingest.key_refresh_s == 2.5
    assert type(config.ingest.key_refresh_s) is float
    assert config.ingest.batch_wait_ms == 40
    assert config.ingest.max_pending == 5000  # from the file
    assert config.log.level == "error"


def test_env_float_may_be_written_as_an_integer() -> None:
    config = load_config(env={"INGESTD_MQTT_RECONNECT_MAX_S": "20"})
    assert config.mqtt.reconnect_max_s == 20.0
    assert type(config.mqtt.reconnect_max_s) is float


def test_env_alone_without_a_file() -> None:
    config = load_config(env={"INGESTD_MQTT_TOPIC_PREFIX": "site1/meters", "INGESTD_MQTT_SHARED_GROUP": "g"})
    assert config.mqtt.uplink_filter == "$share/g/site1/meters/+/up"


def test_ingestd_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[ingest]\nbatch_max = 300\n")
    config = load_config(env={"INGESTD_CONFIG": str(path), "INGESTD_INGEST_BATCH_WAIT_MS": "30"})
    assert (config.ingest.batch_max, config.ingest.batch_wait_ms) == (300, 30)


def test_explicit_path_wins_over_ingestd_config(tmp_path: Path) -> None:
    chosen = write(tmp_path, "[ingest]\nbatch_max = 300\n", "chosen.toml")
    other = write(tmp_path, "[ingest]\nbatch_max = 400\n", "other.toml")
    assert load_config(chosen, env={"INGESTD_CONFIG": str(other)}).ingest.batch_max == 300


def test_unrelated_environment_is_ignored() -> None:
    env = {"PATH": "/usr/bin", "INGESTD": "x", "INGESTDX_MQTT_URL": "http://x", "ingestd_mqtt_url": "x"}
    assert load_config(env=env) == Config()


# --- errors name the key --------------------------------------------------------------


def test_unknown_section(tmp_path: Path) -> None:
    exc = config_error(write(tmp_path, "[broker]\nurl = 'mqtt://h'\n"))
    assert exc.key == "broker"
    assert "broker" in str(exc)
    assert "unknown section" in str(exc)


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    exc = config_error(write(tmp_path, "ingest = 5\n"))
    assert exc.key == "ingest"
    assert "table" in str(exc)


def test_unknown_key_in_the_file(tmp_path: Path) -> None:
    exc = config_error(write(tmp_path, "[ingest]\nbatch_size = 10\n"))
    assert exc.key == "ingest.batch_size"
    assert "ingest.batch_size" in str(exc)


def test_a_renamed_key_names_its_new_name(tmp_path: Path) -> None:
    exc = config_error(write(tmp_path, "[ingest]\nverify_threads = 2\n"))
    assert str(exc) == "ingest.verify_threads: renamed: use ingest.verify_workers"
    exc = config_error(env={"INGESTD_INGEST_VERIFY_THREADS": "2"})
    assert str(exc) == "INGESTD_INGEST_VERIFY_THREADS: renamed: use INGESTD_INGEST_VERIFY_WORKERS"


def test_unknown_key_of_another_section(tmp_path: Path) -> None:
    # A real key, in the wrong section.
    exc = config_error(write(tmp_path, "[mqtt]\nbatch_max = 10\n"))
    assert "mqtt.batch_max" in str(exc)


@pytest.mark.parametrize(
    "name", ["INGESTD_MQTT_FOO", "INGESTD_INGEST_BATCH_SIZE", "INGESTD_DATABASE_", "INGESTD_LOG_URL"]
)
def test_unknown_env_var(name: str) -> None:
    exc = config_error(env={name: "1"})
    assert exc.key == name
    assert name in str(exc)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[ingest]\nbatch_max = true\n", "ingest.batch_max"),
        ("[ingest]\nbatch_max = 500.0\n", "ingest.batch_max"),
        ("[ingest]\nbatch_max = [500]\n", "ingest.batch_max"),
        ("[ingest]\nkey_refresh_s = false\n", "ingest.key_refresh_s"),
        ("[database]\nurl = 5\n", "database.url"),
        ("[mqtt]\nurl = true\n", "mqtt.url"),
        ("[log]\nlevel = 1\n", "log.level"),
        ("[metrics]\naddr = 9108\n", "metrics.addr"),
        ("[database]\npool_size = { n = 4 }\n", "database.pool_size"),
    ],
)
def test_wrong_type_in_the_file(tmp_path: Path, toml: str, key: str) -> None:
    exc = config_error(write(tmp_path, toml))
    assert exc.key == key
    assert key in str(exc)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[ingest]\nbatch_max = "500"\n', "ingest.batch_max"),
        ('[ingest]\nkey_refresh_s = "60"\n', "ingest.key_refresh_s"),
    ],
)
def test_string_for_a_number_in_the_file(tmp_path: Path, toml: str, key: str) -> None:
    exc = config_error(write(tmp_path, toml))
    assert exc.key == key


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("INGESTD_INGEST_BATCH_MAX", "five hundred", "ingest.batch_max"),
        ("INGESTD_INGEST_BATCH_MAX", "500.0", "ingest.batch_max"),
        ("INGESTD_INGEST_BATCH_MAX", "5e2", "ingest.batch_max"),
        ("INGESTD_INGEST_BATCH_MAX", "true", "ingest.batch_max"),
        ("INGESTD_INGEST_BATCH_MAX", "", "ingest.batch_max"),
        ("INGESTD_INGEST_BATCH_MAX", "5_00", "ingest.batch_max"),
        ("INGESTD_INGEST_KEY_REFRESH_S", "soon", "ingest.key_refresh_s"),
        ("INGESTD_INGEST_KEY_REFRESH_S", "", "ingest.key_refresh_s"),
    ],
)
def test_wrong_type_in_the_env(name: str, value: str, key: str) -> None:
    exc = config_error(env={name: value})
    assert exc.key == key
    assert key in str(exc)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[ingest]\nbatch_max = 0\n", "ingest.batch_max"),
        ("[ingest]\nbatch_max = 10001\n", "ingest.batch_max"),
        ("[ingest]\nbatch_max = -1\n", "ingest.batch_max"),
        ("[ingest]\nbatch_max = 2000\nmax_pending = 1000\n", "ingest.max_pending"),
        ("[ingest]\nverify_workers = 0\n", "ingest.verify_workers"),
        ("[ingest]\nmax_clock_skew_s = -1\n", "ingest.max_clock_skew_s"),
        ("[ingest]\nmax_data_age_days = 0.5\n", "ingest.max_data_age_days"),
        ("[ingest]\nmax_data_age_days = 3651\n", "ingest.max_data_age_days"),
        ("[ingest]\nmax_data_age_days = 80\n", "ingest.max_data_age_days"),
        ("[ingest]\nmax_data_age_days = 120\n[gaps]\nretention_days = 114\n", "ingest.max_data_age_days"),
        ("[ingest]\nkey_refresh_s = 0.0\n", "ingest.key_refresh_s"),
        ("[ingest]\nkey_refresh_s = nan\n", "ingest.key_refresh_s"),
        ("[ingest]\nkey_refresh_s = inf\n", "ingest.key_refresh_s"),
        ("[ingest]\ndb_retry_initial_s = 5.0\ndb_retry_max_s = 1.0\n", "ingest.db_retry_max_s"),
        ("[database]\npool_size = 1\n", "database.pool_size"),
        ("[gaps]\nmax_outstanding_per_meter = 0\n", "gaps.max_outstanding_per_meter"),
        ("[gaps]\nmax_active_per_meter = 0\n", "gaps.max_active_per_meter"),
        ("[gaps]\nmax_outstanding_seqs = 0\n", "gaps.max_outstanding_seqs"),
        ("[gaps]\npause_at_pending_share = 0.0\n", "gaps.pause_at_pending_share"),
        ("[gaps]\npause_at_pending_share = 1.5\n", "gaps.pause_at_pending_share"),
        ("[gaps]\npause_at_pending_share = nan\n", "gaps.pause_at_pending_share"),
        # More seqs than a meter must answer in one replay request (docs/protocol.md 9).
        ("[gaps]\nmax_range = 1001\n", "gaps.max_range"),
        ("[mqtt]\nkeepalive_s = 1\n", "mqtt.keepalive_s"),
        ("[mqtt]\nsession_expiry_s = 4294967296\n", "mqtt.session_expiry_s"),
        ("[mqtt]\nclient_id = 'has space'\n", "mqtt.client_id"),
        ("[mqtt]\nclient_id = ''\n", "mqtt.client_id"),
        ("[mqtt]\ntopic_prefix = 'meters/'\n", "mqtt.topic_prefix"),
        ("[mqtt]\ntopic_prefix = 'meters/#'\n", "mqtt.topic_prefix"),
        ("[mqtt]\nshared_group = 'a/b'\n", "mqtt.shared_group"),
        ("[mqtt]\ncert_file = '/etc/c.pem'\n", "mqtt.cert_file"),
        ("[log]\nformat = 'xml'\n", "log.format"),
        ("[log]\nlevel = 'INFO'\n", "log.level"),
    ],
)
def test_out_of_range_value(tmp_path: Path, toml: str, key: str) -> None:
    exc = config_error(write(tmp_path, toml))
    assert exc.key == key
    assert key in str(exc)


def test_data_window_must_hold_honest_replays_and_redeliveries() -> None:
    exc = config_error(env={"INGESTD_GAPS_RETENTION_DAYS": "120"})
    assert str(exc) == (
        "ingest.max_data_age_days: must be at least gaps.retention_days plus mqtt.session_expiry_s"
        " (127 days), or honest replays and redeliveries are rejected"
    )
    exc = config_error(env={"INGESTD_MQTT_SESSION_EXPIRY_S": str(30 * 86400)})
    assert exc.key == "ingest.max_data_age_days"
    assert "(120 days)" in str(exc)
    config = load_config(
        env={"INGESTD_GAPS_RETENTION_DAYS": "120", "INGESTD_INGEST_MAX_DATA_AGE_DAYS": "127"}
    )
    assert config.ingest.max_data_age_days == 127.0
    assert load_config(env={}).ingest.max_data_age_days == 100.0


def test_out_of_range_from_the_env() -> None:
    exc = config_error(env={"INGESTD_INGEST_BATCH_MAX": "0"})
    assert exc.key == "ingest.batch_max"
    assert "ingest.batch_max" in str(exc)


@pytest.mark.parametrize(
    ("name", "url", "key"),
    [
        ("INGESTD_MQTT_URL", "http://broker:1883", "mqtt.url"),
        ("INGESTD_MQTT_URL", "tcp://broker:1883", "mqtt.url"),
        ("INGESTD_MQTT_URL", "broker:1883", "mqtt.url"),
        ("INGESTD_MQTT_URL", "mqtt://", "mqtt.url"),
        ("INGESTD_MQTT_URL", "mqtt://broker:99999", "mqtt.url"),
        ("INGESTD_MQTT_URL", "mqtt://broker:port", "mqtt.url"),
        ("INGESTD_MQTT_URL", "", "mqtt.url"),
        ("INGESTD_DATABASE_URL", "mysql://db/ingestd", "database.url"),
        ("INGESTD_DATABASE_URL", "postgresql://db:70000/ingestd", "database.url"),
        ("INGESTD_DATABASE_URL", "db.example", "database.url"),
        ("INGESTD_DATABASE_URL", "", "database.url"),
    ],
)
def test_bad_url(name: str, url: str, key: str) -> None:
    exc = config_error(env={name: url})
    assert exc.key == key
    assert key in str(exc)


def test_postgresql_url_may_name_a_socket_instead_of_a_host() -> None:
    url = "postgresql:///ingestd?host=/var/run/postgresql"
    assert load_config(env={"INGESTD_DATABASE_URL": url}).database.url == url


@pytest.mark.parametrize("addr", ["localhost", "localhost:", "localhost:http", ":-1", "h:65536", "h:9108 "])
def test_metrics_addr_needs_a_port(addr: str) -> None:
    exc = config_error(env={"INGESTD_METRICS_ADDR": addr})
    assert exc.key == "metrics.addr"
    assert "metrics.addr" in str(exc)


def test_metrics_addr_with_a_superscript_port_is_a_config_error() -> None:
    exc = config_error(env={"INGESTD_METRICS_ADDR": "localhost:\u00b2"})
    assert exc.key == "metrics.addr"


def test_metrics_addr_may_be_empty_to_disable() -> None:
    assert load_config(env={"INGESTD_METRICS_ADDR": ""}).metrics.addr == ""


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        (":9108", ("0.0.0.0", 9108)),
        ("[::1]:9108", ("::1", 9108)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_host_port(addr: str, expected: tuple[str, int]) -> None:
    assert parse_host_port("metrics.addr", addr) == expected


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    exc = config_error(missing)
    assert exc.key == "config"
    assert str(missing) in str(exc)
    assert "no such file" in str(exc)


def test_missing_file_named_by_ingestd_config(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    exc = config_error(env={"INGESTD_CONFIG": str(missing)})
    assert str(missing) in str(exc)


def test_file_that_is_a_directory(tmp_path: Path) -> None:
    exc = config_error(tmp_path)
    assert exc.key == "config"
    assert str(tmp_path) in str(exc)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[log]\nlevel = '\xe9'\n")
    exc = config_error(path)
    assert exc.key == "config"


@pytest.mark.parametrize(
    "text",
    [
        "[ingest\nbatch_max = 1\n",
        "[ingest]\nbatch_max = \n",
        "[ingest]\nbatch_max = 1\nbatch_max = 2\n",
        "[ingest]\n[ingest]\n",
        "batch_max: 1\n",
    ],
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    exc = config_error(path)
    assert exc.key == "config"
    assert "TOML" in str(exc)
    assert str(path) in str(exc)


# --- derived MQTT settings ------------------------------------------------------------


def test_uplink_filter_without_shared_group() -> None:
    assert load_config(env={}).mqtt.uplink_filter == "meters/+/up"


def test_uplink_filter_with_shared_group(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nshared_group = 'ingest'\ntopic_prefix = 'a/b'\n")
    assert load_config(path, env={}).mqtt.uplink_filter == "$share/ingest/a/b/+/up"


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtts://h", "h", 8883, True),
        ("mqtts://h:8884", "h", 8884, True),
        ("mqtt://h", "h", 1883, False),
        ("mqtt://broker.example:1884", "broker.example", 1884, False),
        ("mqtt://user@10.1.2.3:1999", "10.1.2.3", 1999, False),
        ("mqtt://[::1]:1883", "::1", 1883, False),
    ],
)
def test_mqtt_host_port_tls(url: str, host: str, port: int, tls: bool) -> None:
    mqtt = load_config(env={"INGESTD_MQTT_URL": url}).mqtt
    assert (mqtt.host, mqtt.port, mqtt.tls) == (host, port, tls)


# --- secrets --------------------------------------------------------------------------


def test_read_secret_cuts_the_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("s3cret \n", encoding="utf-8")
    assert read_secret("database.password_file", str(path)) == "s3cret "


def test_read_secret_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_secret("mqtt.password_file", str(tmp_path / "missing"))
    assert info.value.key == "mqtt.password_file"
    assert "mqtt.password_file" in str(info.value)


def test_client_and_signer_files_checked_only_for_broker_commands(tmp_path: Path) -> None:
    """The systemd guide's configuration: the client certificate and the head-end kid in
    the file, their keys only in the unit's credentials. migrate and meter (broker=False)
    must accept it; the daemon must still refuse a certificate without its key."""
    path = write(tmp_path, "[mqtt]\ncert_file = '/etc/c.pem'\n[headend]\nkid = 'he-1'\n")
    config = load_config(path, env={}, broker=False)
    assert (config.mqtt.cert_file, config.headend.kid) == ("/etc/c.pem", "he-1")
    assert config_error(path).key == "mqtt.cert_file"
    env = {"INGESTD_MQTT_KEY_FILE": "/run/credentials/ingestd.service/mqtt-client.key"}
    with pytest.raises(ConfigError, match=r"^headend\.kid: key_file and kid go together$"):
        load_config(path, env=env)
    env["INGESTD_HEADEND_KEY_FILE"] = "/run/credentials/ingestd.service/headend.pem"
    assert load_config(path, env=env).headend.kid == "he-1"
    # Every other check still applies.
    with pytest.raises(ConfigError, match=r"^mqtt\.keepalive_s"):
        load_config(write(tmp_path, "[mqtt]\nkeepalive_s = 1\n"), env={}, broker=False)
