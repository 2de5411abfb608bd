"""swf-engine command line: serve, check, send, reprocess, prune, capture, user."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from engine import __version__


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config)


def _data_dir() -> Path:
    return Path(os.environ.get("SWF_DATA_DIR") or "./var")


def _migrated_store():
    """The database of SWF_DATABASE_URL, else SQLite under SWF_DATA_DIR, at the newest schema."""
    from engine.store.db import Store, default_url

    data_dir = _data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(os.environ.get("SWF_DATABASE_URL") or default_url(data_dir))
    store.migrate()
    return store


def _load_config(args: argparse.Namespace):
    """The validated channels file, or None after printing every problem as file:line: message."""
    from engine.config import load_config
    from engine.errors import ConfigError

    try:
        return load_config(_config_path(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    config = _load_config(args)
    if config is None:
        return 1
    print(f"{args.config}: ok, {len(config.channels)} channel(s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from engine import logs
    from engine.app import build_engine

    logs.setup(os.environ.get("SWF_LOG_LEVEL", "INFO"))
    config = _load_config(args)
    if config is None:
        return 1
    store = _migrated_store()
    from admin_ui import ROUTERS as ADMIN_ROUTERS
    from admin_ui import people_access
    from engine.http_api import ROUTERS

    # the admin UI's logins also guard the engine's routes for people (reports, capture), closed without them
    engine = build_engine(config, store, _data_dir(), config_path=_config_path(args).resolve(),
                          http_routers=(*ROUTERS, *ADMIN_ROUTERS), http_people=people_access())
    # The journal writer, the event loop and pynetdicom's threads hand the GIL to each other on every
    # message; with the default 5 ms switch interval an ACK can wait a whole interval for the loop.
    sys.setswitchinterval(0.0005)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await engine.start()
        print(f"swf-engine {__version__} serving {len(config.channels)} channel(s); data in {_data_dir()}",
              file=sys.stderr, flush=True)
        await stop.wait()
        await engine.stop()

    asyncio.run(run())
    store.dispose()
    return 0


def _split_messages(data: bytes) -> list[bytes]:
    """A file may hold one message or several; each starts with MSH. LF and CRLF become CR."""
    data = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip(b"\r \t\x0b\x1c")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    parts: list[bytes] = []
    for segment in data.split(b"\r"):
        if segment.startswith(b"MSH") or not parts:
            parts.append(segment)
        else:
            parts[-1] += b"\r" + segment
    return [p + b"\r" for p in parts if p.strip()]


def cmd_send(args: argparse.Namespace) -> int:
    from engine.channels.mllp import MllpClient
    from engine.mappings.ack import ack_code_of

    host, _, port = args.target.rpartition(":")
    if not host or not port.isdigit():
        print("swf-engine send: target must be HOST:PORT", file=sys.stderr)
        return 2
    files: list[Path] = []
    for name in args.files:
        path = Path(name)
        files.extend(sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path])

    async def run() -> int:
        client = MllpClient(host, int(port), connect_timeout=args.timeout, answer_timeout=args.timeout)
        failures = 0
        try:
            for path in files:
                for message in _split_messages(path.read_bytes()):
                    try:
                        answer = await client.send(message)
                    except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
                        print(f"{path}: no ACK: {exc.__class__.__name__} {exc}", file=sys.stderr)
                        failures += 1
                        continue
                    text = _decode_answer(answer)
                    code = ack_code_of(text)
                    failures += code not in ("AA", "CA")
                    print(f"--- {path} -> {code or '?'}")
                    print(text.replace("\r", "\n").rstrip("\n"))
        finally:
            await client.close()
        return 0 if failures == 0 else 1

    return asyncio.run(run())


def _decode_answer(answer: bytes) -> str:
    from engine.errors import EngineError
    from engine.mappings.hl7_message import sniff_header

    try:
        return sniff_header(answer, fallback_codec="gb18030").text
    except EngineError:
        return answer.decode("utf-8", errors="replace")


def cmd_reprocess(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from engine.channels.dispatcher import requeue
    from engine.clock import Clock
    from engine.store.tables import Delivery

    store = _migrated_store()
    with store.session() as session:
        ids = list(args.ids)
        if args.all_dead:
            query = select(Delivery.id).where(Delivery.status == "dead")
            if args.channel:
                query = query.where(Delivery.channel == args.channel)
            ids += list(session.scalars(query))
        if not ids:
            print("nothing to reprocess", file=sys.stderr)
            return 1
        count = requeue(session, ids, Clock().utcnow())
    print(f"requeued {count} deliver{'y' if count == 1 else 'ies'}")
    return 0 if count else 1


def cmd_capture_import(args: argparse.Namespace) -> int:
    from engine import logs
    from engine.app import build_engine
    from engine.non_dicom_capture.importer import run_import

    logs.setup(os.environ.get("SWF_LOG_LEVEL", "WARNING"))
    config = _load_config(args)
    if config is None:
        return 1
    store = _migrated_store()
    engine = build_engine(config, store, _data_dir())
    engine.writer.start()
    try:
        return run_import(engine, args.accession, [Path(f) for f in args.files], station_name=args.station,
                          wait=args.wait)
    finally:
        engine.writer.stop()
        store.dispose()


def cmd_prune(args: argparse.Namespace) -> int:
    """Archive and remove journal content past its channel's retention; print what was (or would be) done."""
    from engine.store.pruner import Pruner, session_writer

    config = _load_config(args)
    if config is None:
        return 1
    store = _migrated_store()
    try:
        # Small transactions of its own: safe beside a running `serve` (SQLite waits on busy_timeout).
        report = Pruner(store, _data_dir(), lambda: config, session_writer(store)).run(dry_run=args.dry_run)
    finally:
        store.dispose()
    for line in report.lines():
        print(line)
    total = report.total()
    print(f"{'dry run: would remove' if args.dry_run else 'removed'} {total.messages} message(s), "
          f"{total.deliveries} deliveries, {total.files} spooled file(s); archived {total.archived} "
          f"in {len(report.archive_files)} file(s)")
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    """Add a local user of the admin UI (the first admin, typically); the password from stdin or a prompt."""
    import getpass

    from admin_ui.auth import ROLES, add_user
    from engine.clock import Clock

    if args.role not in ROLES:
        print(f"swf-engine user add: role must be one of {', '.join(ROLES)}", file=sys.stderr)
        return 2
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.username}: ")
        if password != getpass.getpass("again: "):
            print("swf-engine user add: the passwords differ", file=sys.stderr)
            return 1
    store = _migrated_store()
    try:
        with store.session() as session:
            add_user(session, args.username, password, args.role, Clock().utcnow())
    except ValueError as exc:
        print(f"swf-engine user add: {exc}", file=sys.stderr)
        return 1
    finally:
        store.dispose()
    print(f"user {args.username} added with role {args.role}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swf-engine", description=__doc__)
    parser.add_argument("--version", action="version", version=f"swf-engine {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run every channel in the config")
    serve.add_argument("--config", default="channels.yaml")
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check", help="validate a channels file")
    check.add_argument("--config", default="channels.yaml")
    check.set_defaults(func=cmd_check)

    send = commands.add_parser("send", help="send HL7 files over MLLP and print each ACK")
    send.add_argument("target", metavar="HOST:PORT")
    send.add_argument("files", nargs="+", metavar="FILE")
    send.add_argument("--timeout", type=float, default=30.0)
    send.set_defaults(func=cmd_send)

    reprocess = commands.add_parser("reprocess", help="requeue dead deliveries")
    reprocess.add_argument("ids", nargs="*", type=int, metavar="DELIVERY_ID")
    reprocess.add_argument("--all-dead", action="store_true")
    reprocess.add_argument("--channel")
    reprocess.set_defaults(func=cmd_reprocess)

    capture = commands.add_parser("capture", help="non-DICOM capture: wrap exported stills and clips into DICOM")
    capture_commands = capture.add_subparsers(dest="capture_command", required=True)
    capture_import = capture_commands.add_parser(
        "import", help="wrap stills/clips for an order, send them to the PACS, print the SOP Instance UIDs")
    capture_import.add_argument("--accession", required=True)
    capture_import.add_argument("--station", help="capture station whose settings apply (default: by modality)")
    capture_import.add_argument("--config", default="channels.yaml")
    capture_import.add_argument("--wait", type=float, default=60.0,
                                help="seconds to wait for delivery; what is not delivered stays queued")
    capture_import.add_argument("files", nargs="+", metavar="FILE")
    capture_import.set_defaults(func=cmd_capture_import)

    prune = commands.add_parser("prune", help="archive and remove journal content past each channel's retention")
    prune.add_argument("--config", default="channels.yaml")
    prune.add_argument("--dry-run", action="store_true", help="count what would go; change nothing")
    prune.set_defaults(func=cmd_prune)

    user = commands.add_parser("user", help="local users of the admin UI and REST API")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    user_add = user_commands.add_parser("add", help="add a user (argon2 hash; roles admin, analyst, viewer, capture)")
    user_add.add_argument("username")
    user_add.add_argument("--role", default="admin")
    user_add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    user_add.set_defaults(func=cmd_user_add)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
