"""The Prometheus alert rules and the Grafana dashboard, checked as their tools read them:
promtool on the rules, their unit tests and every PromQL expression of the dashboard;
every SQL query of the dashboard on the real migrated schema; every runbook link to a
section of docs/operations.md. promtool missing is a failure, not a skip: `make test`
installs it (Debian package `prometheus`).

The YAML files are read with a few regular expressions (they are ours, in one layout)
rather than with a YAML library that ingestd would otherwise not need; what is generated
here is JSON, which promtool reads as YAML."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from ingestd.metrics import Metrics

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "ingestd.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "ingestd.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
ALERTS = {
    "IngestdDown",
    "IngestdBrokerDisconnected",
    "IngestdDatabaseDown",
    "IngestdHealthStale",
    "IngestdMetersGray",
    "IngestdMetersRed",
    "IngestdTamperEvent",
    "IngestdIsolatedPowerLoss",
    "IngestdGapsNotFilling",
    "IngestdSignatureFailures",
    "IngestdRejectionsRising",
    "IngestdVerifyWorkerRestarts",
    "IngestdClockOffset",
    "IngestdBillingAtRisk",
}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if found is None:
        pytest.fail("promtool not found: install the Debian package `prometheus` (make test does)")
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def rules() -> dict[str, str]:
    """Alert name -> the text of its rule."""
    blocks = re.split(r"^      - alert: ", RULES.read_text(encoding="utf-8"), flags=re.MULTILINE)[1:]
    return {block.split("\n", 1)[0].strip(): block for block in blocks}


def test_rules_are_valid_and_their_unit_tests_pass() -> None:
    check = promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    run = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_is_there_and_tested_firing_and_quiet() -> None:
    assert set(rules()) == ALERTS
    checks = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", RULE_TESTS.read_text(encoding="utf-8"))
    firing = {name for name, empty in checks if not empty}
    quiet = {name for name, empty in checks if empty}
    assert firing == ALERTS
    assert quiet == ALERTS


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_every_alert_has_summary_description_and_runbook_section() -> None:
    anchors = _anchors(OPERATIONS.read_text(encoding="utf-8"))
    for alert, rule in rules().items():
        assert re.search(r"^ {10}summary: \S", rule, flags=re.MULTILINE), alert
        assert re.search(r"^ {10}description: \S", rule, flags=re.MULTILINE), alert
        link = re.search(r"^ {10}runbook_url: docs/operations\.md#(\S+)$", rule, flags=re.MULTILINE)
        assert link is not None, alert
        assert link[1] == alert.lower(), alert
        assert link[1] in anchors, f"docs/operations.md has no section #{link[1]}"


def test_rules_and_dashboard_use_only_metrics_ingestd_exports() -> None:
    metrics = Metrics()
    metrics.meters.labels(flag="ok").set(0)  # labelled gauges appear once set
    metrics.gaps_open.set(0)
    metrics.billing_meters.labels(period="2026-10", status="pending").set(0)
    metrics.billing_period_end.labels(period="2026-10").set(0)
    metrics.billing_cutoff.labels(period="2026-10").set(0)
    exported = {s.name for m in metrics.registry.collect() for s in m.samples}
    text = RULES.read_text(encoding="utf-8") + DASHBOARD.read_text(encoding="utf-8")
    used = set(re.findall(r"\bingestd_[a-z_]+", text))
    # ingestd_meter_last_seen_timestamp_seconds is optional (flags.per_meter_metrics).
    assert used - exported == set(), "rules or dashboard use metrics ingestd does not export"


# -- the dashboard ------------------------------------------------------------------------


def targets(kind: str) -> list[tuple[str, dict[str, Any]]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        (f"{panel['title']} / {target['refId']}", target)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        if target["datasource"]["type"] == kind
    ]


def test_dashboard_refers_to_the_provisioned_data_sources() -> None:
    provisioned = dict(
        re.findall(r"^    uid: (\S+)\n    type: (\S+)$", DATASOURCES.read_text(), flags=re.MULTILINE)
    )
    assert len(provisioned) == 2
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        for source in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert provisioned.get(source["uid"]) == source["type"], panel["title"]
    assert targets("prometheus")
    assert targets("postgres")


def test_every_promql_expression_parses(tmp_path: Path) -> None:
    """promtool has no stand-alone expression checker; a recording rule per expression is
    checked by the same parser Prometheus uses."""
    exprs = targets("prometheus")
    recording = [
        {
            "record": f"dashboard:expr_{i}",
            # Grafana's own variables are not PromQL; give them a value as Grafana would.
            "expr": target["expr"].replace("$__rate_interval", "1m").replace("$__interval", "1m"),
        }
        for i, (_name, target) in enumerate(exprs)
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": recording}]}))
    check = promtool("check", "rules", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(recording)} rules found" in check.stdout


def test_promtool_catches_a_bad_expression(tmp_path: Path) -> None:
    """The check above could pass by checking nothing; show that it catches an error."""
    path = tmp_path / "bad.rules.yml"
    bad = {"record": "dashboard:bad", "expr": "sum by (flag) (rate(ingestd_meters[5m])"}
    path.write_text(json.dumps({"groups": [{"name": "bad", "rules": [bad]}]}))
    assert promtool("check", "rules", str(path)).returncode != 0


def grafana_sql(sql: str) -> str:
    """A dashboard query as Grafana sends it for the last six hours at 1-minute buckets."""
    sql = re.sub(
        r"\$__timeFilter\(([^)]+)\)",
        r"\1 BETWEEN now() - INTERVAL '6 hours' AND now()",
        sql,
    )
    sql = sql.replace("$__interval_ms", "60000")
    assert "$" not in sql, f"a Grafana macro the test does not substitute: {sql}"
    return sql


@pytest.mark.parametrize("name", [name for name, _ in targets("postgres")])
async def test_every_sql_query_runs_on_the_schema(db: Conn, name: str) -> None:
    target = dict(targets("postgres"))[name]
    now = await db.fetchval("SELECT now()")
    # Some rows of every kind the panels read, so the queries run on data, not only plan.
    await db.execute("INSERT INTO meters (meter_id, site) VALUES ('M-1', 'S'), ('M-2', 'S')")
    await db.execute(
        "INSERT INTO meter_epochs VALUES ('M-1', 0, 9, $1::timestamptz - INTERVAL '3 days', $1)", now
    )
    await db.execute(
        """INSERT INTO events (meter_id, time, code, detail, epoch, seq, received_at) VALUES
           ('M-1', $1::timestamptz - INTERVAL '1 hour', '003', '{}', 0, 1, $1),
           ('M-1', $1::timestamptz - INTERVAL '1 hour', '001', '{"isolated": true}', 0, 2, $1)""",
        now,
    )
    await db.execute(
        """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at, closed_at) VALUES
           ('M-1', 0, 3, 4, 'open', $1::timestamptz - INTERVAL '2 hours', NULL),
           ('M-1', 0, 5, 5, 'filled', $1::timestamptz - INTERVAL '2 hours', $1)""",
        now,
    )
    statement = await db.prepare(grafana_sql(target["rawSql"]))
    rows = await statement.fetch()
    columns = [a.name for a in statement.get_attributes()]
    assert rows, f"{name}: no rows from the sample data"
    if target["format"] == "time_series":
        assert columns[0] == "time", f"{name}: a time series needs its first column named time"
        assert "value" in columns or len(columns) >= 2


# -- the installation guide's monitoring snippets -------------------------------------------


def _guide_block(lang: str, containing: str) -> str:
    text = OPERATIONS.read_text(encoding="utf-8")
    found = [b for b in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL) if containing in str(b)]
    assert len(found) == 1, f"docs/operations.md: expected one {lang} block with {containing!r}"
    return str(found[0])


def test_data_source_time_interval_is_the_guides_scrape_interval() -> None:
    """Grafana's $__rate_interval is built from timeInterval: it must be the interval the
    guide tells Prometheus to scrape at, or rate() panels get too few points or go blank."""
    (time_interval,) = re.findall(r"^\s+timeInterval: (\S+)$", DATASOURCES.read_text(), flags=re.MULTILINE)
    snippet = _guide_block("yaml", "job_name: ingestd")
    scrape = re.findall(r"^\s+scrape_interval: (\S+)$", snippet, flags=re.MULTILINE)
    assert scrape == [time_interval], "the guide's Prometheus snippet must set the data source's interval"


def test_guide_says_the_database_must_accept_tls_for_grafana() -> None:
    (sslmode,) = re.findall(r"^\s+sslmode: (\S+)$", DATASOURCES.read_text(), flags=re.MULTILINE)
    section = OPERATIONS.read_text(encoding="utf-8").split("5. **Grafana.**", 1)[1].split("\n## ", 1)[0]
    assert f"sslmode: {sslmode}" in section, "the guide must say which TLS mode Grafana's data source uses"
