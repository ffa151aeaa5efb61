"""Commands of the local stack and the local host (``python -m recsys stack|serve|run|...``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from recsys.config import Settings, SettingsError, load_settings
from recsys.local import tools
from recsys.local.stack import MAX_REPLICAS, Stack, StackConfig

__all__ = ["build_host", "migrate_main", "run_main", "serve", "serve_main", "setup_main", "stack_main"]

log = logging.getLogger("recsys")

DEFAULT_PORT = 7071


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The storage SDK logs every HTTP exchange at INFO.
    logging.getLogger("azure").setLevel(logging.WARNING)


def _schema_options(settings: Settings) -> dict[str, Any]:
    """What the migrations take from the settings: dimension, column type, HNSW parameters."""
    return {
        "embedding_dim": settings.embedding_dim,
        "vector_type": settings.vector_type,
        "hnsw_m": settings.hnsw_m,
        "hnsw_ef_construction": settings.hnsw_ef_construction,
    }


def _stack_from(args: argparse.Namespace) -> Stack:
    root = Path(args.root) if getattr(args, "root", None) else None
    # The schema of a stack being created follows the settings, as with `run` and `migrate`.
    schema = _schema_options(load_settings()) if getattr(args, "action", None) == "up" else {}
    return Stack(StackConfig.local(root, **schema, replicas=getattr(args, "replicas", 0)))


def _replicas(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 <= count <= MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_REPLICAS}")
    return count


REPLICAS_HELP = (
    "streaming standbys of PostgreSQL, each behind its own PgBouncer (ports after the primary's:"
    " 5433/6433, 5434/6434, ...); the query path lists them before the primary"
)


def stack_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys stack", description="the local stack")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--root", help="folder of the stack's data (default: .stack/ in the checkout)")
    parser.add_argument("--replicas", type=_replicas, default=0, metavar="N",
                        help=f"with up: {REPLICAS_HELP} (default 0; down and status see every standby on disk)")
    args = parser.parse_args(argv)
    _logging()
    stack = _stack_from(args)
    if args.action == "up":
        stack.up()
    elif args.action == "down":
        stack.down()
    print(json.dumps(stack.describe(), indent=2))
    if args.action == "down":
        return 0
    # Standbys left on disk by an earlier --replicas are reported, not required.
    running = {name: up for name, up in stack.status().items() if "." not in name}
    for replica in stack.replicas():
        running.update(replica.status())
    return 0 if all(running.values()) else 1


def migrate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys migrate", description="apply sql/ migrations")
    parser.add_argument("--root", help="folder of the local stack (default: .stack/)")
    parser.add_argument("--url", help="a direct (not PgBouncer) URL of the schema owner, e.g. on Azure")
    args = parser.parse_args(argv)
    _logging()
    settings = load_settings()
    if args.url:
        import psycopg

        from recsys.db.migrations import apply_migrations

        with psycopg.connect(args.url, autocommit=True) as conn:
            applied = apply_migrations(conn, **_schema_options(settings))
    else:
        root = Path(args.root) if args.root else None
        applied = Stack(StackConfig.local(root, **_schema_options(settings))).migrate()
    print("\n".join(applied) if applied else "nothing to apply")
    return 0


def setup_main(argv: list[str]) -> int:
    _logging()
    tools.ensure_tools()
    return 0


def _check_settings() -> bool:
    try:
        load_settings()
    except SettingsError as exc:
        print(f"recsys: cannot start: {exc}", file=sys.stderr)
        return False
    return True


def build_host(
    *,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    run_queues: bool = True,
) -> object:
    """The local host for ``function_app.app`` with the checkout's host.json and settings."""
    from recsys.db.pool import close_pools
    from recsys.local.host import FunctionHost, load_host_config

    root = tools.project_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import function_app

    settings = load_settings()
    return FunctionHost(
        function_app.app,
        load_host_config(root / "host.json"),
        function_key=settings.function_key,
        run_queues=run_queues,
        on_startup=on_startup,
        on_shutdown=close_pools,
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM interrupts as Ctrl-C does (``KeyboardInterrupt``), so that the
    ``finally`` clauses that stop the stack run: by default SIGTERM ends the process at once, and
    uvicorn, which handles it while it serves, raises it again once it has shut down. Only the
    main thread can set a handler; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    on_startup: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Serve the function app until interrupted (Ctrl-C / SIGTERM). Returns an exit code."""
    import uvicorn

    from recsys.local.host import load_local_settings

    load_local_settings(tools.project_root() / "local.settings.json")
    if not _check_settings():
        return 2
    config = uvicorn.Config(
        build_host(on_startup=on_startup),  # type: ignore[arg-type]
        host=host,
        port=port,
        lifespan="on",
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    # uvicorn raises the Ctrl-C or SIGTERM it handled again once it has shut down gracefully.
    with contextlib.suppress(KeyboardInterrupt), sigterm_interrupts():
        server.run()
    return 0 if server.started else 1


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys serve", description="serve the function app locally")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    _logging()
    return serve(args.host, args.port)


TRY_IT = """
recsys is serving on http://localhost:{port}/api

  curl -s http://localhost:{port}/api/health
  curl -s http://localhost:{port}/api/items/item-000042
  curl -s 'http://localhost:{port}/api/items/item-000042/similar?k=5'
  curl -s 'http://localhost:{port}/api/items/item-000042/similar?k=5&recall_target=0.95'
  curl -s -X POST http://localhost:{port}/api/recommendations \\
       -H 'content-type: application/json' -d '{{"positive": ["item-000042"], "k": 5}}'

PgBouncer (transaction mode): psql postgresql://recsys:recsys-local@127.0.0.1:6432/pgbouncer -c 'SHOW POOLS'
Press Ctrl-C to stop the host and the whole stack.
"""


def run_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys run", description="the whole local service")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--no-demo", action="store_true", help="do not load the demo catalogue")
    parser.add_argument("--replicas", type=_replicas, default=0, metavar="N", help=REPLICAS_HELP)
    args = parser.parse_args(argv)
    _logging()
    from recsys.local.host import load_local_settings

    load_local_settings(tools.project_root() / "local.settings.json")
    if not _check_settings():
        return 2
    settings = load_settings()
    stack = Stack(StackConfig.local(**_schema_options(settings), replicas=args.replicas))
    # A SIGTERM while the stack starts stops it too, not only one while the host serves.
    with contextlib.suppress(KeyboardInterrupt), sigterm_interrupts():
        return _run(stack, args)
    return 130


def _run(stack: Stack, args: argparse.Namespace) -> int:
    try:
        stack.up()
        for key, value in stack.app_environment().items():
            os.environ.setdefault(key, value)

        async def ready() -> None:
            task = asyncio.create_task(_after_start(args.port, demo=not args.no_demo))
            _background.add(task)
            task.add_done_callback(_background.discard)

        return serve("127.0.0.1", args.port, on_startup=ready)
    finally:
        stack.down()


_background: set[asyncio.Task[None]] = set()


async def _after_start(port: int, *, demo: bool) -> None:
    """Load the demo catalogue through the queue path once the host is serving, then say how to try it."""
    if demo:
        from recsys.ingest.demo import load_demo_catalogue
        from recsys.search.calibration import calibrate_catalogue

        log.info("loading the demo catalogue through the queue (a minute or so)")
        try:
            await load_demo_catalogue()
            log.info("calibrating recall per ef_search on the demo catalogue (recall_target)")
            await calibrate_catalogue()
        except Exception:
            log.exception("the demo catalogue did not load or calibrate; the service runs without it")
    print(TRY_IT.format(port=port), flush=True)
