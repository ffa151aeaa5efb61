"""``python -m recsys COMMAND``: the project's command line.

Each command lives in the module that owns its area; this table only names them.
"""

from __future__ import annotations

import importlib
import sys

#: command -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "stack": ("recsys.local.cli", "stack_main", "start, stop or describe the local stack (up|down|status)"),
    "serve": ("recsys.local.cli", "serve_main", "serve the function app locally on :7071 against a running stack"),
    "run": ("recsys.local.cli", "run_main", "stack up, demo catalogue, serve; Ctrl-C stops everything"),
    "migrate": ("recsys.local.cli", "migrate_main", "apply the sql/ migrations to the database"),
    "setup": ("recsys.local.cli", "setup_main", "install PgBouncer and Azurite where missing"),
    "load": ("recsys.ingest.cli", "load_main", "bulk-load a .jsonl (or .npy + .jsonl) with binary COPY"),
    "enqueue": ("recsys.ingest.cli", "enqueue_main", "validate a batch file and send it to the loader's queue"),
    "demo": ("recsys.ingest.cli", "demo_main", "load the demo catalogue through the queue (host running)"),
    "maintain": ("recsys.maintenance", "maintain_main", "run housekeeping once (what the timer function does)"),
    "replay": ("recsys.ingest.replay", "replay_main", "send failed batches' messages from the poison queue again"),
    "calibrate": ("recsys.search.calibration", "calibrate_main", "measure recall per ef_search, store it"),
    "filter-index": ("recsys.search.filter_indexes", "filter_index_main",
                     "partial HNSW index for one category or tag (create|drop|list)"),
    "bench": ("recsys.bench.cli", "bench_main", "run benchmarks on ephemeral stacks, write bench/results"),
    "package": ("recsys.local.package", "package_main", "the files a publish uploads; --zip, --doctor"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        print("usage: python -m recsys COMMAND [ARGS]\n\ncommands:")
        for name, (_, _, text) in COMMANDS.items():
            print(f"  {name:<{width}}  {text}")
        return 0 if not args or args[0] in ("-h", "--help") else 2
    module, function, _ = COMMANDS[args[0]]
    return int(getattr(importlib.import_module(module), function)(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
