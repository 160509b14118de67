"""Command line (`pipeline`, also `python -m pipeline`): demo, migrate, run, import-csv, token,
prune, tail, asyncapi (§8)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from uuid import UUID

from pipeline.config import Settings
from pipeline.logging import configure
from pipeline.topology import STAGE_NAMES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    demo = verbs.add_parser(
        "demo", help="run everything on embedded servers with a simulated fleet"
    )
    demo.add_argument(
        "--duration", type=float, default=None, metavar="S", help="stop after S seconds"
    )
    demo.add_argument(
        "--cluster",
        action="store_true",
        help="three embedded NATS nodes with every stream on all three, and two workers",
    )
    verbs.add_parser("migrate", help="create or upgrade the schema in PIPELINE_DATABASE_URL")
    run = verbs.add_parser("run", help="run stages against the configured services")
    run.add_argument(
        "--stage",
        action="append",
        choices=STAGE_NAMES,
        metavar="NAME",
        help=f"run only this stage (repeatable): {', '.join(STAGE_NAMES)}",
    )
    run.add_argument("--mode", choices=("split", "fused"), default="fused")
    spec = verbs.add_parser(
        "asyncapi", help="write the AsyncAPI document and the JSON Schemas of every message"
    )
    spec.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="write asyncapi.json and *.schema.json there (default: the document to stdout)",
    )
    tail = verbs.add_parser("tail", help="print messwerte as they are published")
    tail.add_argument("--org", type=UUID, default=None, metavar="UUID", help="one organization")
    tail.add_argument("--einheit", type=int, default=None, metavar="ID", help="one unit")
    tail.add_argument(
        "--from-start", action="store_true", help="replay the stream first, then follow it"
    )
    tail.add_argument(
        "--durable", default=None, metavar="NAME", help="a durable consumer that resumes"
    )
    tail.add_argument("--count", type=int, default=None, metavar="N", help="stop after N")
    tail.add_argument("--json", action="store_true", help="print each message's JSON")
    token = verbs.add_parser("token", help="API tokens of the ingest API (design §12)")
    token_verbs = token.add_subparsers(dest="token_verb", required=True)
    create = token_verbs.add_parser("create", help="a new token; printed once, on the last line")
    create.add_argument("--org", type=UUID, required=True, metavar="UUID")
    create.add_argument("--name", required=True, metavar="NAME")
    token_verbs.add_parser("list", help="name, organization, created, last used, revoked")
    revoke = token_verbs.add_parser("revoke", help="revoke a token (within 5 s everywhere)")
    revoke.add_argument("name", metavar="NAME")
    prune = verbs.add_parser(
        "prune", help="delete processed raw rows older than PIPELINE_RAW_RETENTION_DAYS"
    )
    prune.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    imp = verbs.add_parser("import-csv", help="feed CSV readings through the pipeline (quelle=CSV)")
    imp.add_argument("file", type=Path, metavar="FILE")
    return parser


async def _run_workers(settings: Settings, stages: Sequence[str], mode: str) -> None:
    from pipeline.app import Pipeline

    pipeline = Pipeline(settings, stages, mode)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pipeline.stop.set)
    await pipeline.run()


async def _token(settings: Settings, args: argparse.Namespace) -> int:
    import asyncpg

    from pipeline import tokens
    from pipeline.migrations import migrate

    await migrate(settings.database_url)
    db = await asyncpg.connect(settings.database_url)
    try:
        if args.token_verb == "create":
            try:
                token = await tokens.create(db, args.org, args.name)
            except asyncpg.UniqueViolationError:
                print(f"token: a token named {args.name!r} exists already", file=sys.stderr)
                return 1
            print(f"token {args.name!r} for organization {args.org}; it is shown only now:")
            print(token)
            return 0
        if args.token_verb == "list":
            print("name\torganization\tcreated\tlast used\trevoked")
            for info in await tokens.listing(db):
                row = tokens.describe(info)
                print("\t".join(str(row[k] or "-") for k in row))
            return 0
        if await tokens.revoke(db, args.name):
            print(f"token {args.name!r} revoked")
            return 0
        print(f"token: no active token named {args.name!r}", file=sys.stderr)
        return 1
    finally:
        await db.close()


async def _prune(settings: Settings, dry_run: bool) -> int:
    from pipeline.database import connect
    from pipeline.migrations import migrate
    from pipeline.prune import METERS, bess_table, prune

    if settings.raw_retention is None:
        print(
            "prune: PIPELINE_RAW_RETENTION_DAYS is not set, raw rows are kept forever",
            file=sys.stderr,
        )
        return 2
    await migrate(settings.database_url)
    pool = await connect(
        settings.database_url,
        size=1,
        connect_s=settings.db_connect_timeout_seconds,
        acquire_s=settings.db_acquire_timeout_seconds,
        statement_s=settings.db_statement_timeout_seconds,
    )
    try:
        tables = (METERS, bess_table(settings.bess_max_gap_seconds))
        for result in await prune(
            pool, tables, retention=settings.raw_retention, grace=settings.grace, dry_run=dry_run
        ):
            print(f"prune: {result}")
    finally:
        await pool.close()
    return 0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return
    uvloop.install()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb == "demo":
        configure("json" if not sys.stderr.isatty() else "console", "warning")
        from pipeline.demo import run_demo

        _use_uvloop()
        return run_demo(args.duration, cluster=args.cluster)
    settings = Settings()
    configure(settings.log_format, settings.log_level)
    if args.verb == "migrate":
        from pipeline.migrations import migrate

        applied = asyncio.run(migrate(settings.database_url))
        print(f"migrate: applied {applied or 'nothing, schema is current'}")
        return 0
    if args.verb == "run":
        _use_uvloop()
        asyncio.run(_run_workers(settings, args.stage or STAGE_NAMES, args.mode))
        return 0
    if args.verb == "asyncapi":
        from pipeline import asyncapi

        if args.out is None:
            print(asyncapi.files()["asyncapi.json"], end="")
            return 0
        for path in asyncapi.write(args.out):
            print(f"asyncapi: wrote {path}")
        return 0
    if args.verb == "tail":
        from pipeline.tail import TailOptions, tail

        options = TailOptions(
            organization_id=args.org,
            einheit_id=args.einheit,
            durable=args.durable,
            from_start=args.from_start,
            count=args.count,
            as_json=args.json,
        )
        asyncio.run(tail(settings.nats_servers, options, sys.stdout))
        return 0
    if args.verb == "token":
        return asyncio.run(_token(settings, args))
    if args.verb == "prune":
        return asyncio.run(_prune(settings, args.dry_run))
    if args.verb == "import-csv":
        from pipeline.csv_import import import_csv

        try:
            summary = asyncio.run(import_csv(settings, args.file))
        except (OSError, ValueError) as exc:
            print(f"import-csv: {exc}", file=sys.stderr)
            return 2
        print(summary.line())
        return 0
    return 2  # pragma: no cover - argparse rejects unknown verbs


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
