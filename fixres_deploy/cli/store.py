"""`fixres-deploy store check|gc`: verify a sweep's result store, remove what nothing uses.

Imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse

from fixres_deploy.cli.app import _emit, command


def _open_store(path: str):
    from fixres_deploy.sweep.store import ResultStore, find_store

    return ResultStore(find_store(path), clean_orphans=False)


@command("store")
def cmd_store(args: argparse.Namespace) -> int:
    store = _open_store(args.dir)
    if args.store_command == "check":
        result = store.check(quarantine=not args.no_quarantine)
        _emit(args, result, _check_text)
        return 1 if result["bad"] or result["unreadable"] else 0
    result = store.gc(dry_run=args.dry_run)
    _emit(args, result, lambda r: _gc_text(r, args.dry_run))
    return 0


def _check_text(r: dict) -> str:
    lines = [f"{r['ok']} record(s) verified"]
    for b in r["bad"]:
        where = f" -> quarantined to {b['quarantined_to']}" if b.get("quarantined_to") else ""
        lines.append(f"BAD {b['stage']} {b['record']}{where}")
        lines += [f"    {p}" for p in b["problems"]]
    for u in r["unreadable"]:
        lines.append(f"UNREADABLE {u['record']}: {u['problem']}")
    if r["stale"]:
        lines.append(f"{len(r['stale'])} record(s) of another schema_version (never reused; `store gc` removes them)")
    if r["bad"] or r["unreadable"]:
        lines.append("the next run computes the quarantined stages again")
    return "\n".join(lines)


def _gc_text(r: dict, dry_run: bool) -> str:
    verb = "would remove" if dry_run else "removed"
    lines = []
    for what, items in r.items():
        lines.append(f"{verb} {len(items)} {what.replace('_', ' ')}")
        lines += [f"    {p}" for p in items]
    return "\n".join(lines)


def _store_parser(sub) -> None:
    p = sub.add_parser(
        "store",
        help="verify a result store (check) or remove orphans and unreferenced artifacts (gc)",
        description="A sweep's result store (OUT/store): `check` verifies the size and sha256 of every "
        "artifact against its record and quarantines bad ones (exit 1 if any); `gc` removes temp "
        "folders of killed runs, records of other schema versions, artifact folders no record "
        "references and the quarantine.",
    )
    ssub = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    c = ssub.add_parser("check", help="verify every record's artifacts (exit 1 when any is bad)")
    c.add_argument("dir", help="the store folder, or a run folder holding store/")
    c.add_argument("--no-quarantine", action="store_true", help="only report bad records, move nothing")
    c.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    g = ssub.add_parser("gc", help="remove orphan temp folders, stale records, unreferenced artifacts, quarantine")
    g.add_argument("dir", help="the store folder, or a run folder holding store/")
    g.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    g.add_argument("--json", action="store_true", help="print one JSON document on stdout")


PARSERS = [_store_parser]
