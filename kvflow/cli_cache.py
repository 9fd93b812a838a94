"""`kvflow cache info` and `kvflow cache clear`: inspect and empty the compile cache
($KVFLOW_CACHE_DIR/compile, see kvflow/compilation/store.py). Hooked in by kvflow/cli.py."""
from __future__ import annotations

import datetime
import json
import sys


def add_cache_parser(subparsers) -> None:
    cache = subparsers.add_parser("cache", help="inspect or clear the torch.compile cache")
    sub = cache.add_subparsers(dest="cache_command", required=True)
    info = sub.add_parser("info", help="list compile cache entries, their size and validity")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--cache-dir", default=None,
                      help="store root (default: $KVFLOW_CACHE_DIR/compile)")
    info.set_defaults(func=cache_info)
    clear = sub.add_parser("clear", help="delete compile cache entries")
    clear.add_argument("--key", default=None, help="delete only this entry")
    clear.add_argument("--cache-dir", default=None,
                       help="store root (default: $KVFLOW_CACHE_DIR/compile)")
    clear.set_defaults(func=cache_clear)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def cache_info(args) -> int:
    from kvflow.compilation.store import CompileStore

    report = CompileStore(args.cache_dir).info()
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    entries = report["entries"]
    print(f"compile cache: {report['root']}")
    print(f"{len(entries)} entries, {_size(report['total_bytes'])} "
          f"(shared triton kernels {_size(report['triton_bytes'])})")
    for e in entries:
        meta = e.get("meta", {})
        created = e.get("created")
        when = (datetime.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M")
                if created else "-")
        what = " ".join(str(meta[k]) for k in ("architecture", "dtype", "device", "torch")
                        if meta.get(k) is not None)
        print(f"  {e['key']}  {_size(e['size_bytes']):>10}  {when}  {e['status']}  {what}")
    if report["pending"]:
        print(f"{len(report['pending'])} build(s) in progress or left over by a crash "
              f"(removed by `kvflow cache clear`): {', '.join(report['pending'])}")
    return 0


def cache_clear(args) -> int:
    from kvflow.compilation.store import CompileStore

    store = CompileStore(args.cache_dir)
    result = store.clear(args.key)
    print(f"removed {len(result['removed'])} compile cache entr"
          f"{'y' if len(result['removed']) == 1 else 'ies'} from {store.root}")
    if result["busy"]:
        print(f"skipped {len(result['busy'])} being built by a running process: "
              f"{', '.join(result['busy'])}")
    return 0
