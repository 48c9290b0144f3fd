"""The ``ingestd`` command.

Exit status: 0 done; 1 a service (broker, database) failed or the daemon stopped on an
error; 2 bad input from the operator (a setting, an argument, a key file), reported in
one line that names what was wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import orjson
import structlog

from ingestd.config import Config, load_config
from ingestd.envelope import KID, METER_ID, parse_time
from ingestd.errors import IngestdError, KeyFileError, Rejected, UsageError
from ingestd.files import KEY_FILE_MAX, MESSAGE_FILE_MAX, read_bounded
from ingestd.logs import configure_logging
from ingestd.signature import (
    ALGS,
    generate_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
)
from ingestd.simulator import add_arguments
from ingestd.store import Store, database_error

_T = TypeVar("_T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = structlog.get_logger("ingestd.cli")


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - long, but a flat list of declarations
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML configuration file (default: $INGESTD_CONFIG, else built-in defaults)",
    )
    parser = _Parser(
        prog="ingestd",
        description="Head-end ingestion daemon: signed smart-meter readings from MQTT into TimescaleDB.",
        parents=[common],
        epilog="Environment: INGESTD_CONFIG, INGESTD_DATABASE_URL, INGESTD_MQTT_URL, "
        "INGESTD_METRICS_ADDR, and INGESTD_<SECTION>_<KEY> for any setting.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    commands.add_parser(
        "migrate", parents=[common], help="create or upgrade the database schema (safe to repeat)"
    )
    commands.add_parser("run", parents=[common], help="run the daemon: subscribe, verify, store, acknowledge")

    meter = commands.add_parser("meter", parents=[common], help="register meters and manage their keys")
    meter_cmds = meter.add_subparsers(
        dest="meter_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    add = meter_cmds.add_parser(
        "add", parents=[common], help="register a meter (or add a key to one) with its public key"
    )
    add.add_argument("meter_id", metavar="METER_ID")
    add.add_argument("--alg", required=True, choices=ALGS, help="signature algorithm of the key")
    add.add_argument("--kid", required=True, help="key id, as meters put it in the JWS header")
    add.add_argument("--key", required=True, metavar="PUBLIC_KEY.pem", help="public key (PEM)")
    add.add_argument("--site", help="building or site the meter is installed in")
    add.add_argument("--interval", type=_positive_int, metavar="SECONDS", help="metering interval")
    add.add_argument(
        "--valid-from",
        type=_timestamp,
        metavar="TIME",
        help="RFC 3339 time from which the key may sign (default now): for rotation, overlap keys",
    )
    add.add_argument(
        "--valid-until", type=_timestamp, metavar="TIME", help="RFC 3339 time at which the key expires"
    )
    add.add_argument(
        "--max-power-w",
        type=_max_power,
        metavar="W",
        help="service size in W: an interval's energy above it is a billing spike ('none' clears it)",
    )
    setter = meter_cmds.add_parser("set", parents=[common], help="change a registered meter's settings")
    setter.add_argument("meter_id", metavar="METER_ID")
    setter.add_argument(
        "--max-power-w",
        type=_max_power,
        metavar="W",
        required=True,
        help="service size in W, for the billing spike check ('none' clears it)",
    )
    _add_import_export(meter_cmds, common)
    listing = meter_cmds.add_parser("list", parents=[common], help="list meters and their keys")
    listing.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    revoke = meter_cmds.add_parser(
        "revoke-key", parents=[common], help="revoke a key: its messages are rejected from now on"
    )
    revoke.add_argument("kid", metavar="KID")
    history = meter_cmds.add_parser(
        "history",
        parents=[common],
        help="every change to a meter and its keys, from the admin log: when, by which role, what",
    )
    history.add_argument("meter_id", metavar="METER_ID")
    history.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    gaps = commands.add_parser(
        "gaps", parents=[common], help="list sequence gaps; 'gaps request' asks a meter to replay now"
    )
    gaps.add_argument("--meter", metavar="ID", help="only this meter")
    shown = gaps.add_mutually_exclusive_group()
    shown.add_argument(
        "--status",
        choices=("open", "requested", "filled", "lost", "active"),
        default="active",
        help="only this status (default active: open or requested)",
    )
    shown.add_argument(
        "--all",
        action="store_const",
        const=None,
        dest="status",
        help="every gap kept, closed ones too (see gaps.closed_retention_days)",
    )
    gaps.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    gaps_cmds = gaps.add_subparsers(dest="gaps_command", metavar="ACTION", parser_class=_Parser)
    request = gaps_cmds.add_parser(
        "request",
        parents=[common],
        help="ask a meter for its missing data now (e.g. after an antenna repair)",
    )
    request.add_argument("--meter", metavar="ID", required=True, dest="request_meter")

    keygen = commands.add_parser(
        "keygen", parents=[common], help="make a private key; print its public key (PEM)"
    )
    keygen.add_argument("--alg", required=True, choices=ALGS)
    keygen.add_argument("--out", required=True, metavar="PRIVATE.pem", help="where to write the private key")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")

    status = commands.add_parser(
        "status",
        parents=[common],
        help="meters that need attention (red, gray, never heard, tamper events); exit 1 if any is red",
    )
    status.add_argument("--site", help="only meters of this site")
    status.add_argument("--flag", choices=("ok", "gray", "red", "never"), help="only meters with this flag")
    status.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    check = commands.add_parser(
        "check-message",
        parents=[common],
        help="would ingestd accept this message? (no database, no broker; for firmware teams)",
        description="Runs the head-end's checks on one message with one public key, as if the key "
        "were registered: exit 0 accepted, 1 rejected (the reason and the rule of docs/protocol.md it "
        "broke are printed), 2 bad input. Duplicates and seq_conflict need the stored messages and are "
        "not checked.",
    )
    check.add_argument("file", metavar="FILE", help="the MQTT payload, byte for byte ('-': standard input)")
    check.add_argument("--key", required=True, metavar="PUBLIC.pem", help="the meter's public key (PEM)")
    check.add_argument(
        "--alg", choices=ALGS, help="the algorithm the key is registered with (default: the header's)"
    )
    check.add_argument("--kid", help="the kid the key is registered under (default: the header's)")
    check.add_argument(
        "--meter",
        metavar="ID",
        help="the meter the key is registered to (default: the topic's, else the body's)",
    )
    check.add_argument(
        "--topic", metavar="T", help="the topic it is published on (default: {prefix}/{meter}/up)"
    )
    check.add_argument(
        "--received-at",
        type=_timestamp,
        metavar="TIME",
        help="RFC 3339 receive time to assume (default now)",
    )
    check.add_argument("--valid-from", type=_timestamp, metavar="TIME", help="the key's valid_from")
    check.add_argument("--valid-until", type=_timestamp, metavar="TIME", help="the key's valid_until")
    _add_audit_parser(commands, common)
    _billing_parser(commands, common)

    simulate = commands.add_parser(
        "simulate", parents=[common], help="run a fleet of virtual meters (demo, tests, benchmarks)"
    )
    add_arguments(simulate)
    return parser


def _add_import_export(meter_cmds: Any, common: argparse.ArgumentParser) -> None:  # noqa: ANN401 - argparse's private subparsers type
    imp = meter_cmds.add_parser(
        "import",
        parents=[common],
        help="register a fleet from a file (CSV or JSON lines), all or nothing",
        description="Registers every meter and key of FILE in one transaction: any bad row (each is "
        "reported with its line number) and nothing is written (exit 2). Re-importing is a no-op for "
        "meters and keys already registered alike. Format as written by 'ingestd meter export'.",
    )
    imp.add_argument("file", metavar="FILE", help="CSV with a header, or JSON lines (.csv, .jsonl)")
    imp.add_argument("--format", choices=("csv", "jsonl"), help="the file's format (default: its extension)")
    imp.add_argument(
        "--dry-run", action="store_true", help="check everything, the database too; write nothing"
    )
    export = meter_cmds.add_parser(
        "export", parents=[common], help="write every meter and key in the format 'meter import' reads"
    )
    export.add_argument("--format", choices=("csv", "jsonl"), help="default: --out's extension, else csv")
    export.add_argument("--out", metavar="FILE", help="write to FILE (default: standard output)")
    export.add_argument("--force", action="store_true", help="overwrite an existing --out file")


def _add_audit_parser(commands: Any, common: argparse.ArgumentParser) -> None:  # noqa: ANN401 - argparse's private type
    audit = commands.add_parser(
        "audit", parents=[common], help="check the stored data against the signatures"
    )
    audit_cmds = audit.add_subparsers(
        dest="audit_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    verify = audit_cmds.add_parser(
        "verify",
        parents=[common],
        help="verify every stored message again and compare readings, events and the ledger with it; "
        "exit 1 on any finding",
    )
    verify.add_argument("--meter", metavar="ID", help="only this meter")
    verify.add_argument(
        "--from",
        dest="since",
        type=_timestamp,
        metavar="TIME",
        help="only messages received at or after TIME",
    )
    verify.add_argument(
        "--to", dest="until", type=_timestamp, metavar="TIME", help="only messages received before TIME"
    )
    verify.add_argument("--json", action="store_true", help="one JSON document instead of lines")


def _billing_parser(commands: Any, common: argparse.ArgumentParser) -> None:  # noqa: ANN401 - argparse's private type
    billing = commands.add_parser(
        "billing", parents=[common], help="billing periods: statements, closing a period, adjustments"
    )
    cmds = billing.add_subparsers(
        dest="billing_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    report = cmds.add_parser(
        "report", parents=[common], help="per meter: open, close, consumption, completeness, flags, status"
    )
    report.add_argument("--period", required=True, metavar="YYYY-MM", help="the billing period")
    report.add_argument("--site", help="only meters of this site")
    report.add_argument(
        "--status", choices=("ready", "estimated", "pending", "review"), help="only this status"
    )
    report.add_argument("--format", choices=("table", "csv", "json"), default="table", help="default table")
    close = cmds.add_parser(
        "close",
        parents=[common],
        help="freeze a period's statements (once; before the cut-off needs --force)",
    )
    close.add_argument("--period", required=True, metavar="YYYY-MM", help="the billing period")
    close.add_argument("--force", action="store_true", help="close before the period's cut-off")
    adjustments = cmds.add_parser(
        "adjustments", parents=[common], help="closed figures that later data changed: the re-bill list"
    )
    adjustments.add_argument("--period", metavar="YYYY-MM", help="only this period")
    adjustments.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    adjustments.add_argument(
        "--mark-billed", action="store_true", help="record the listed adjustments as re-billed"
    )
    evidence = cmds.add_parser(
        "evidence",
        parents=[common],
        help="write a self-contained bundle that proves a meter's consumption in a period, checkable offline",
    )
    evidence.add_argument("--meter", required=True, metavar="ID")
    evidence.add_argument("--period", required=True, metavar="YYYY-MM", help="a calendar month (UTC)")
    evidence.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) directory")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(getattr(args, "config", None), broker=args.command in _BROKER_COMMANDS)
        configure_logging(config.log)
        handler = _HANDLERS[args.command]
        return handler(config, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        error = _reported(exc)
        if error is None:
            raise  # a bug: its traceback is what is wanted
        if isinstance(error, UsageError):
            print(f"ingestd: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        print(f"ingestd: {error}", file=sys.stderr)
        return EXIT_FAILURE


def _reported(exc: Exception) -> IngestdError | None:
    """What to report in one line: an error of ours, or a database error said as one;
    None for anything else."""
    # A task group (the daemon's, a command's) raises every failure at once; the first
    # is the cause, the others (if any) its consequences.
    while isinstance(exc, ExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, IngestdError):
        return exc
    return database_error(exc)


def _run_async(coro: Callable[[], Awaitable[int]]) -> int:
    return _run_async_value(coro)


def _run_async_value(coro: Callable[[], Awaitable[_T]]) -> _T:
    async def wrapped() -> _T:
        return await coro()

    return asyncio.run(wrapped())


def _cmd_migrate(config: Config, _args: argparse.Namespace) -> int:
    async def go() -> int:
        async with Store(config.database) as store:
            applied = await store.migrate(note=lambda text: print(f"ingestd: {text}", file=sys.stderr))
        if applied:
            for m in applied:
                print(f"applied {m.version:04d}_{m.name}")
        else:
            print("schema is current")
        return EXIT_OK

    return _run_async(go)


def _cmd_run(config: Config, _args: argparse.Namespace) -> int:
    from ingestd.daemon import Daemon, install_signal_handlers  # noqa: PLC0415 - only `run` needs it

    async def go() -> int:
        daemon = Daemon(config)
        install_signal_handlers(daemon)
        await daemon.run()
        return EXIT_OK

    return _run_async(go)


def _cmd_meter(config: Config, args: argparse.Namespace) -> int:
    action = args.meter_command
    if action == "add":
        _check_meter_id("METER_ID", args.meter_id)
        if args.valid_from and args.valid_until and args.valid_until <= args.valid_from:
            raise UsageError("--valid-until must be later than --valid-from")
        if not KID.fullmatch(args.kid):
            raise UsageError(f"--kid {args.kid!r} must be 1-128 printable ASCII characters, no spaces")
        pem = read_bounded(args.key, "--key", KEY_FILE_MAX)
        try:
            load_public_key(pem, args.alg)
        except KeyFileError as exc:
            raise KeyFileError(f"--key {args.key}: {exc}") from None

        async def add() -> int:
            async with Store(config.database) as store:
                await store.add_meter(
                    args.meter_id,
                    alg=args.alg,
                    kid=args.kid,
                    public_key_pem=pem.decode("ascii"),
                    site=args.site,
                    interval_s=args.interval,
                    valid_from=args.valid_from,
                    valid_until=args.valid_until,
                )
                if args.max_power_w is not None:
                    from ingestd.billing import set_max_power  # noqa: PLC0415 - only with --max-power-w

                    async with store.connection() as conn:
                        await set_max_power(conn, args.meter_id, args.max_power_w)
            print(f"meter {args.meter_id}: key {args.kid} ({args.alg}) registered")
            return EXIT_OK

        return _run_async(add)
    if action == "import":
        return _meter_import(config, args)
    if action == "export":
        return _meter_export(config, args)
    if action == "list":

        async def listing() -> int:
            async with Store(config.database) as store:
                rows = await store.list_meters()
            meters = [
                {
                    "meter_id": r["meter_id"],
                    "site": r["site"],
                    "interval_s": r["interval_s"],
                    "registered_at": r["registered_at"].isoformat(),
                    "keys": orjson.loads(r["keys"]),
                }
                for r in rows
            ]
            if args.json:
                print(orjson.dumps(meters, option=orjson.OPT_INDENT_2).decode())
            else:
                _print_meter_table(meters)
            return EXIT_OK

        return _run_async(listing)
    if action == "history":
        return _meter_history(config, args)
    if action == "set":

        async def setter() -> int:
            from ingestd.billing import set_max_power  # noqa: PLC0415 - only `meter set` needs it

            async with Store(config.database) as store, store.connection() as conn:
                if not await set_max_power(conn, args.meter_id, args.max_power_w):
                    raise UsageError(f"METER_ID {args.meter_id!r}: no such meter")
            shown = "none" if args.max_power_w is None else f"{args.max_power_w} W"
            print(f"meter {args.meter_id}: max power {shown}")
            return EXIT_OK

        return _run_async(setter)

    async def revoke() -> int:
        async with Store(config.database) as store:
            revoked = await store.revoke_key(args.kid)
        if not revoked:
            raise UsageError(f"no active key {args.kid!r} (unknown, or already revoked)")
        print(f"key {args.kid} revoked")
        return EXIT_OK

    return _run_async(revoke)


def _meter_import(config: Config, args: argparse.Namespace) -> int:
    from ingestd import provision  # noqa: PLC0415 - only `meter import` needs it

    path: str = args.file
    fmt = provision.format_of(path, args.format)
    plan = provision.read_plan(path, fmt)

    async def go() -> provision.Outcome:
        async with Store(config.database) as store, store.connection() as conn:
            return await provision.apply_plan(conn, plan, path, dry_run=args.dry_run)

    try:
        outcome = _run_async_value(go)
    except provision.BadRowsError as exc:
        # One line per bad row, then the verdict (main prints it) as the last line.
        print("\n".join(exc.lines(path)), file=sys.stderr)
        raise
    verb = "would import" if args.dry_run else "imported"
    print(
        f"{path}: {verb} {len(plan.meters)} meters ({outcome.meters_new} new, "
        f"{outcome.meters_updated} updated, {outcome.meters_unchanged} unchanged) and "
        f"{len(plan.keys)} keys ({outcome.keys_new} new, {outcome.keys_registered} already registered)"
    )
    return EXIT_OK


def _meter_export(config: Config, args: argparse.Namespace) -> int:
    from ingestd import provision  # noqa: PLC0415 - only `meter export` needs it

    out = Path(args.out) if args.out else None
    if out is not None:
        if out.exists() and not args.force:
            raise UsageError(f"--out {out}: file exists (use --force to overwrite)")
        if out.exists() and not out.is_file():
            raise UsageError(f"--out {out}: not a regular file")
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    fmt = provision.format_of(args.out or "-.csv", args.format or _export_format(out))

    async def go() -> tuple[list[Any], int]:
        async with Store(config.database) as store, store.connection() as conn:
            return await provision.export_rows(conn)

    rows, keyless = _run_async_value(go)
    text = provision.rendered(rows, fmt)
    if out is None:
        sys.stdout.write(text)
    else:
        provision.write_atomically(out, text)
    if keyless:
        print(
            f"ingestd: {keyless} meter(s) without a key not exported (an import needs a key)", file=sys.stderr
        )
    return EXIT_OK


def _export_format(out: Path | None) -> str:
    return "jsonl" if out is not None and out.suffix.lower() in {".jsonl", ".ndjson"} else "csv"


def _meter_history(config: Config, args: argparse.Namespace) -> int:
    from ingestd.audit import describe_change, meter_history  # noqa: PLC0415 - only `history` needs it

    _check_meter_id("METER_ID", args.meter_id)

    async def go() -> int:
        async with Store(config.database) as store, store.connection() as conn:
            entries = await meter_history(conn, args.meter_id)
            registered = await conn.fetchval(
                "SELECT EXISTS (SELECT FROM meters WHERE meter_id = $1)", args.meter_id
            )
        if not entries and not registered:
            raise UsageError(f"meter {args.meter_id!r}: not registered, and no change to it is logged")
        if args.json:
            for entry in entries:
                entry["logged_at"] = entry["logged_at"].isoformat()
            print(orjson.dumps(entries, option=orjson.OPT_INDENT_2).decode())
            return EXIT_OK
        _print_table(
            ("TIME", "ROLE", "SESSION USER", "APPLICATION", "ACTION", "TABLE", "KEY", "CHANGE"),
            [
                (
                    e["logged_at"].isoformat(timespec="seconds"),
                    e["db_role"],
                    e["session_role"],
                    e["application_name"] or "-",
                    e["action"],
                    e["table_name"],
                    e["row_key"] or "-",
                    describe_change(e),
                )
                for e in entries
            ],
            empty=f"no change to meter {args.meter_id} is logged (the log starts with migration 0010)",
        )
        return EXIT_OK

    return _run_async(go)


def _cmd_gaps(config: Config, args: argparse.Namespace) -> int:
    if args.gaps_command == "request":

        async def request() -> int:
            async with Store(config.database) as store:
                count = await store.request_gaps_now(args.request_meter)
            if count == 0:
                raise UsageError(f"meter {args.request_meter!r} has no open or requested gaps")
            print(
                f"{count} gap(s) of {args.request_meter} due now; "
                f"the daemon asks within {config.gaps.poll_s:g} s"
            )
            return EXIT_OK

        return _run_async(request)

    async def listing() -> int:
        async with Store(config.database) as store:
            rows = await store.list_gaps(meter_id=args.meter, status=args.status)
        gaps = [
            {
                k: (v.isoformat() if hasattr(v, "isoformat") else str(v) if k == "request_id" and v else v)
                for k, v in dict(r).items()
            }
            for r in rows
        ]
        if args.json:
            print(orjson.dumps(gaps, option=orjson.OPT_INDENT_2).decode())
        else:
            _print_table(
                ("METER", "EPOCH", "SEQS", "MISSING", "STATUS", "DETECTED", "ATTEMPTS", "NEXT REQUEST"),
                [
                    (
                        g["meter_id"],
                        str(g["epoch"]),
                        f"{g['from_seq']}-{g['to_seq']}",
                        str(int(g["to_seq"]) - int(g["from_seq"]) + 1),
                        g["status"],
                        g["detected_at"][:19],
                        str(g["attempts"]),
                        (g["next_request_at"] or "-")[:19] if g["status"] in {"open", "requested"} else "-",
                    )
                    for g in gaps
                ],
                empty="no gaps",
            )
        return EXIT_OK

    return _run_async(listing)


def _cmd_keygen(_config: Config, args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"--out {out}: file exists (use --force to overwrite)")
    if out.exists() and not out.is_file():
        # Opening a FIFO for writing would hang, and a device is no place for a key.
        raise UsageError(f"--out {out}: not a regular file")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    key = generate_private_key(args.alg)
    # Created 0600 from the start: a private key must never be readable by others,
    # not even for the moment between create and chmod.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_pem(key))
    sys.stdout.write(public_key_pem(key.public_key()).decode("ascii"))
    return EXIT_OK


def _cmd_status(config: Config, args: argparse.Namespace) -> int:
    from ingestd import health  # noqa: PLC0415 - only `status` needs it

    async def go() -> int:
        async with Store(config.database) as store, store.connection() as conn:
            if args.site is not None and not await conn.fetchval(
                "SELECT EXISTS (SELECT FROM meters WHERE site = $1)", args.site
            ):
                raise UsageError(f"--site {args.site!r}: no meters registered at this site")
            as_of = await conn.fetchval("SELECT now()")
            counts = await health.flag_counts(conn, as_of, config.flags, site=args.site)
            if args.flag is not None:
                # The selection is the meters with that flag: the counts (and the exit
                # status) are of them.
                counts = {f: n if f == args.flag else 0 for f, n in counts.items()}
            shown = health.by_severity(
                await health.fetch_health(
                    conn, as_of, config.flags, site=args.site, flag=args.flag, attention=args.flag is None
                )
            )
        total = sum(counts.values())
        if args.json:
            print(orjson.dumps(health.status_json(shown, counts, as_of), option=orjson.OPT_INDENT_2).decode())
        else:
            if shown:
                print("\n".join(health.status_table(shown, as_of)))
            summary = ", ".join(f"{counts[f]} {f}" for f in health.FLAGS)
            print(f"{len(shown)} of {total} meters listed ({summary})")
        return EXIT_FAILURE if counts["red"] else EXIT_OK

    return _run_async(go)


def _cmd_check_message(config: Config, args: argparse.Namespace) -> int:
    from ingestd import conformance  # noqa: PLC0415 - only `check-message` needs it

    if args.file == "-":
        payload = sys.stdin.buffer.read(MESSAGE_FILE_MAX + 1)
        if len(payload) > MESSAGE_FILE_MAX:
            raise UsageError(f"FILE -: more than {MESSAGE_FILE_MAX} bytes on standard input")
    else:
        payload = read_bounded(args.file, "FILE", MESSAGE_FILE_MAX)
    registration = conformance.Registration(
        read_bounded(args.key, "--key", KEY_FILE_MAX),
        args.alg,
        args.kid,
        args.meter,
        args.valid_from,
        args.valid_until,
    )
    if args.kid is not None and not KID.fullmatch(args.kid):
        raise UsageError(f"--kid {args.kid!r} must be 1-128 printable ASCII characters, no spaces")
    if args.meter is not None:
        _check_meter_id("--meter", args.meter)
    if args.valid_from and args.valid_until and args.valid_until <= args.valid_from:
        raise UsageError("--valid-until must be later than --valid-from")
    try:
        message = conformance.check_offline(
            payload,
            registration,
            topic=args.topic,
            received_at=args.received_at or datetime.now(UTC),
            topic_prefix=config.mqtt.topic_prefix,
            max_clock_skew=timedelta(seconds=config.ingest.max_clock_skew_s),
            max_data_age=timedelta(days=config.ingest.max_data_age_days),
        )
    except KeyFileError as exc:
        raise KeyFileError(f"--key {args.key}: {exc}") from None
    except Rejected as exc:
        print("\n".join(conformance.rejected_lines(exc)))
        return EXIT_FAILURE
    print(conformance.accepted_line(message))
    return EXIT_OK


def _cmd_audit(config: Config, args: argparse.Namespace) -> int:
    from ingestd.audit import Auditor, Finding  # noqa: PLC0415 - only `audit` needs it
    from ingestd.verifier import VerifierPool  # noqa: PLC0415

    if args.meter is not None:
        _check_meter_id("--meter", args.meter)
    if args.since and args.until and args.until <= args.since:
        raise UsageError("--to must be later than --from")
    first = True

    def report(finding: Finding) -> None:
        # Printed as found, never collected: a store tampered with throughout stays in bounded memory.
        nonlocal first
        if args.json:
            prefix = '{"findings": [\n' if first else ",\n"
            sys.stdout.write(prefix + orjson.dumps(finding.as_json()).decode())
        else:
            print(finding.line())
        first = False

    async def go() -> int:
        async with Store(config.database) as store, VerifierPool(config.ingest.verify_workers) as pool:
            auditor = Auditor(store, pool, topic_prefix=config.mqtt.topic_prefix, report=report)
            summary = await auditor.run(meter_id=args.meter, since=args.since, until=args.until)
        if args.json:
            head = '{"findings": [],' if first else "\n],"
            sys.stdout.write(f'{head} "summary": {orjson.dumps(summary.as_json()).decode()}}}\n')
        else:
            print("\n".join(summary.lines()))
        return EXIT_OK if summary.clean else EXIT_FAILURE

    return _run_async(go)


def _cmd_billing(config: Config, args: argparse.Namespace) -> int:  # noqa: PLR0915 - three small commands
    from ingestd import billing  # noqa: PLC0415 - only `billing` needs it

    retention = timedelta(days=config.gaps.retention_days)
    cfg = config.billing

    async def report() -> int:
        period = billing.parse_period(args.period, cfg)
        async with Store(config.database) as store, store.connection() as conn:
            as_of: datetime = await conn.fetchval("SELECT now()")
            billing.check_reportable(period, as_of)
            if args.site is not None and not await billing.site_exists(conn, args.site):
                raise UsageError(f"--site {args.site!r}: no meters registered at this site")
            statements = await billing.compute_statements(
                conn, period, as_of=as_of, retention=retention, site=args.site
            )
            closed = await billing.is_closed(conn, period)
            if closed:
                await billing.record_adjustments(conn, period, statements)
            adjustments = await billing.list_adjustments(conn, period) if closed else []
        shown = billing.by_urgency(s for s in statements if args.status is None or s.status == args.status)
        if args.format == "csv":
            sys.stdout.write(billing.csv_rows(shown))
        elif args.format == "json":
            doc = billing.report_json(period, shown, as_of)
            doc["closed"] = closed
            doc["adjustments"] = [
                a.to_json()
                for a in adjustments
                if args.site is None or a.meter_id in {s.meter_id for s in statements}
            ]
            print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        else:
            state = "closed" if closed else f"open, cut-off {billing.cutoff(period, cfg).isoformat()}"
            print(f"period {period.name}: {period.start.isoformat()} to {period.end.isoformat()} ({state})")
            print("\n".join(billing.report_table(shown)))
            unbilled = [a for a in adjustments if a.billed_at is None]
            if unbilled:
                hint = f"ingestd billing adjustments --period {period.name}"
                print(f"{len(unbilled)} adjustment(s) to re-bill: {hint}")
        return EXIT_OK

    async def close() -> int:
        period = billing.parse_period(args.period, cfg)
        async with Store(config.database) as store, store.connection() as conn:
            as_of = await conn.fetchval("SELECT now()")
            billing.check_reportable(period, as_of)
            if as_of < period.end:
                raise UsageError(f"--period {period.name}: not over yet (it ends {period.end.isoformat()})")
            deadline = billing.cutoff(period, cfg)
            if as_of < deadline and not args.force:
                raise UsageError(
                    f"--period {period.name}: before its cut-off {deadline.isoformat()} "
                    "(data may still arrive); use --force to close now"
                )
            if await billing.is_closed(conn, period):
                raise UsageError(
                    f"--period {period.name}: already closed (closed statements are never rewritten)"
                )
            statements = await billing.compute_statements(conn, period, as_of=as_of, retention=retention)
            count = await billing.close_period(conn, period, statements)
        t = billing.totals(statements)
        counts = ", ".join(f"{t.by_status[s]} {s}" for s in billing.STATUSES)
        print(f"period {period.name} closed: {count} statements ({counts})")
        return EXIT_OK

    async def adjustments() -> int:
        period = billing.parse_period(args.period, cfg) if args.period else None
        async with Store(config.database) as store, store.connection() as conn:
            as_of = await conn.fetchval("SELECT now()")
            if period is not None:
                billing.check_reportable(period, as_of)
                if not await billing.is_closed(conn, period):
                    raise UsageError(
                        f"--period {period.name}: not closed (adjustments exist only for closed periods)"
                    )
                live = await billing.compute_statements(conn, period, as_of=as_of, retention=retention)
                await billing.record_adjustments(conn, period, live)
            else:
                await billing.check_adjustments(conn, cfg, as_of=as_of, retention=retention)
            found = await billing.list_adjustments(conn, period)
            if args.mark_billed:
                await billing.mark_billed(conn, [a.id for a in found], as_of)
        if args.json:
            print(orjson.dumps([a.to_json() for a in found], option=orjson.OPT_INDENT_2).decode())
        else:
            _print_table(
                ("ID", "PERIOD", "METER", "FIELD", "OLD", "NEW", "CAUSED BY", "DETECTED", "BILLED"),
                [
                    (
                        str(a.id),
                        a.period,
                        a.meter_id,
                        a.field,
                        a.old_value or "-",
                        a.new_value or "-",
                        " ".join(f"{c['epoch']}:{c['seq']}" for c in a.caused_by) or "-",
                        a.detected_at.isoformat()[:19],
                        a.billed_at.isoformat()[:19] if a.billed_at else "-",
                    )
                    for a in found
                ],
                empty="no adjustments",
            )
        return EXIT_OK

    if args.billing_command == "evidence":
        return _billing_evidence(config, args)
    handlers = {"report": report, "close": close, "adjustments": adjustments}
    return _run_async(handlers[args.billing_command])


def _billing_evidence(config: Config, args: argparse.Namespace) -> int:
    from ingestd import evidence  # noqa: PLC0415 - only `billing evidence` needs it

    _check_meter_id("--meter", args.meter)
    evidence.period_bounds(args.period)

    out = Path(args.out)
    evidence.check_out(out)

    async def go() -> evidence.Evidence:
        async with Store(config.database) as store, store.connection() as conn:
            return await evidence.collect(conn, args.meter, args.period)

    manifest = evidence.write(out, asyncio.run(go()))
    figure = manifest["consumption_wh"]
    print(
        f"{args.out}: {len(manifest['messages'])} signed messages, {len(manifest['keys'])} key(s); "
        f"consumption {figure if figure is not None else 'unknown'} Wh ({manifest['status']}); "
        f"check with: python3 {out / 'verify.py'}"
    )
    return EXIT_OK


def _cmd_simulate(config: Config, args: argparse.Namespace) -> int:
    from ingestd.simulator import run_from_args  # noqa: PLC0415 - only `simulate` needs it

    return _run_async(lambda: run_from_args(config, args))


# Commands that connect to the broker or sign with the head-end key: only these need the
# client certificate's key and the head-end key (systemd credentials of the daemon's unit).
_BROKER_COMMANDS = frozenset({"run", "simulate"})

_HANDLERS: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "migrate": _cmd_migrate,
    "run": _cmd_run,
    "meter": _cmd_meter,
    "keygen": _cmd_keygen,
    "gaps": _cmd_gaps,
    "simulate": _cmd_simulate,
    "check-message": _cmd_check_message,
    "status": _cmd_status,
    "audit": _cmd_audit,
    "billing": _cmd_billing,
}


def _check_meter_id(option: str, value: str) -> None:
    if not METER_ID.fullmatch(value):
        raise UsageError(f"{option} {value!r} must match [A-Za-z0-9_-]{{1,64}}")


def _timestamp(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an RFC 3339 time such as 2027-01-01T00:00:00Z, got {text!r}"
        ) from None


def _max_power(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    return _positive_int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def _print_meter_table(meters: list[dict[str, Any]]) -> None:
    rows = []
    for m in meters:
        keys = ", ".join(f"{k['kid']} {k['alg']}{' (revoked)' if k['revoked_at'] else ''}" for k in m["keys"])
        rows.append((m["meter_id"], m["site"] or "-", f"{m['interval_s']}s", keys or "-"))
    _print_table(("METER", "SITE", "INTERVAL", "KEYS"), rows, empty="no meters registered")


def _print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], *, empty: str) -> None:
    """Columns padded to their widest cell; the last one is not padded."""
    if not rows:
        print(empty)
        return
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        print("  ".join([*(cell.ljust(w) for cell, w in zip(r, widths, strict=False)), r[-1]]))


if __name__ == "__main__":
    sys.exit(main())
