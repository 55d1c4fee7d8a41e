"""`mcpr logs|slow|sessions|session|clients|status|schema`: questions to the event store, from the shell.

Short-lived commands, so plain Python: argparse, a read-only SQLite
connection (the gateway may be writing: WAL lets both go on), `queries.py`
for every answer, and either readable tables or, with `--json`, one JSON
object per line for `jq`.  `logs -f` polls the file for ids above the last one
it printed, four times a second, which costs one indexed query each.

The store is the one the gateway started in the current directory uses
(`--config`, `MCPR_DB`, `[store] path`, else the per-project file under
`$XDG_STATE_HOME/mcpr/`), or `--db PATH`.

Every error is one line on standard error that names the option (or the
setting the store's path came from), the value, and what to do, never a
traceback: a script tells the two kinds apart by the exit status, as `twist`
does for the gateway.  64 (EX_USAGE) is a mistake on the command line or in
mcpr.toml (`--since yesterday`, `--status maybe`); 1 is a store that cannot
answer: none there yet (no gateway has written it), a file that is not a
store, or no session with that id.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable, Iterable, NoReturn, Sequence

from mcpr.common.settings import ConfigError, parse_duration
from mcpr.common.startup import EXIT_STATUS as USAGE_STATUS
from mcpr.gateway.settings import store_location
from mcpr.gateway.store import queries
from mcpr.gateway.store.queries import Filters, QueryError, RequestRow
from mcpr.gateway.store.schema import StoreError, open_reader
from mcpr.proxy.events import human_bytes

FOLLOW_INTERVAL = 0.25
STATUS_SPAN = 3600.0  # `status` sums up the last hour unless --since says otherwise


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`mcpr logs: option --since: ...`), not usage plus the
    error, with the status of a usage error."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument -"):
            message = "option " + message[len("argument "):]
        self.exit(USAGE_STATUS, f"{self.prog}: {message}\n")


# -- option values


def parse_since(text: str, now: float) -> float:
    """`10m`, `2h`, `7d` ago, or a local time such as `2026-12-01` or `2026-12-01T10:30`."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"expected a duration such as 10m or 7d, or a time such as 2026-12-01T10:30, "
                         f"got {text!r}") from None


def _threshold(text: str) -> float:
    """`500ms`, `2s` (a bare number is milliseconds here)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_duration(text) * 1000
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 500ms or 2s, got {text!r}") from None


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return int(text)


def _status(text: str) -> str:
    if text not in queries.STATUSES:
        raise argparse.ArgumentTypeError(f"expected {', '.join(queries.STATUSES[:-1])} or {queries.STATUSES[-1]}, "
                                         f"got {text!r}")
    return text


def _error_code(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON-RPC error code such as -32602, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    where = common.add_argument_group("store")
    where.add_argument("--db", metavar="PATH", help="the store's file (default: the one of the gateway started here)")
    where.add_argument("--config", "-c", metavar="PATH", help="the gateway's mcpr.toml, to find its store")
    which = common.add_argument_group("which requests")
    which.add_argument("--since", metavar="WHEN", help="a duration ago (10m, 2h, 7d) or a local time (2026-12-01T10:30)")
    which.add_argument("--until", metavar="WHEN", help="same forms as --since")
    which.add_argument("--tool", help="the tool called (a glob with * ? [])")
    which.add_argument("--method", help="the MCP method, e.g. tools/call or 'resources/*'")
    which.add_argument("--session", metavar="PREFIX", help="a session id, or its first characters")
    which.add_argument("--status", type=_status, metavar="|".join(queries.STATUSES),
                       help="ok, error (anything not ok) or timeout")
    which.add_argument("--error-code", type=_error_code, metavar="CODE", help="a JSON-RPC error code, e.g. -32602")
    which.add_argument("--via", choices=("direct", "tunnel", "replay"),
                       help="how the request reached the gateway (replay: sent again from the inspector)")
    out = common.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="one JSON object per line (for jq)")

    top = _Parser(prog="mcpr", description="Questions to the gateway's event store.",
                  epilog="Exit status: 0, 1 when the store cannot answer (none there yet, not a store, no "
                         "such session), 64 for a mistake in the options.")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    logs = sub.add_parser("logs", parents=[common], help="requests, oldest first")
    logs.add_argument("-f", "--follow", action="store_true", help="then print new requests as they come")
    logs.add_argument("-n", "--limit", type=_count, default=50, help="how many of the newest (50)")
    slowest = sub.add_parser("slow", parents=[common], help="the slowest requests (SSE streams left out)")
    slowest.add_argument("--threshold", type=_threshold, default=500.0, metavar="DURATION",
                         help="at least this long: 500ms (default), 2s")
    slowest.add_argument("-n", "--limit", type=_count, default=20, help="how many (20)")
    sessions = sub.add_parser("sessions", parents=[common], help="sessions, the most recently active first")
    sessions.add_argument("--active", action="store_true", help="only those neither ended nor idle past the timeout")
    sessions.add_argument("-n", "--limit", type=_count, default=50, help="how many (50)")
    one = sub.add_parser("session", parents=[common], help="one session and its requests")
    one.add_argument("id", help="the session id, or enough of its first characters")
    one.add_argument("-n", "--limit", type=_count, default=1000, help="how many of its newest requests (1000)")
    who = sub.add_parser("clients", parents=[common], help="clients (name and version from initialize)")
    who.add_argument("-n", "--limit", type=_count, default=50, help="how many (50)")
    sub.add_parser("status", parents=[common], help="the store, the gateway writing it, and the last hour")
    schema = sub.add_parser("schema", parents=[common],
                            help="the tools, resources and prompts the server listed, or how they changed")
    schema.add_argument("--changes", action="store_true", help="what changed from one distinct answer to the next")
    schema.add_argument("-n", "--limit", type=_count, default=100, help="how many answers or changes (100)")
    return top


# -- formatting


def when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%m-%d %H:%M:%S", time.localtime(ts))


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f}s" if value >= 1000 else f"{value:.1f}ms"


def short(session_id: str | None) -> str:
    return session_id[:8] if session_id else "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Columns as wide as their widest cell; those in `right` aligned right."""
    body = [list(r) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    align = set(right)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in align else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
                         ).rstrip()

    return [line(headers), *(line(r) for r in body)]


# Fixed widths: `logs -f` prints lines before it has seen the ones to come.
LOG_HEADER = f"{'ID':>6}  {'TIME':<14}  {'VIA':<6}  {'HTTP':<6}  {'ST':>3}  {'TOTAL':>8}  {'UP':>8}  {'DOWN':>8}  " \
             f"{'SESSION':<8}  MCP"


def log_line(r: RequestRow) -> str:
    what = r.mcp_method or r.path
    if r.target:
        what += f" {r.target}"
    if r.error_code is not None:
        what += f" error {r.error_code}" + (f": {r.error_message}" if r.error_message else "")
    if r.outcome != "ok":
        what += f" ({r.outcome})"
    return (f"{r.id:>6}  {when(r.started):<14}  {r.via:<6}  {r.method:<6}  {r.status if r.status else '-':>3}  "
            f"{ms(r.latency_ms):>8}  {ms(r.upstream_ms):>8}  {ms(r.downstream_ms):>8}  {short(r.session_id):<8}  {what}")


def _json_line(kind: str, value: dict[str, Any]) -> str:
    return json.dumps({"type": kind, **value}, separators=(",", ":"), default=str)


class Output:
    """Lines to standard output; a reader that went away (`| head`) ends the command quietly."""

    def __init__(self, json_lines: bool) -> None:
        self.json = json_lines

    def line(self, text: str, *, flush: bool = False) -> None:
        sys.stdout.write(text + "\n")
        if flush:
            sys.stdout.flush()

    def record(self, kind: str, value: dict[str, Any], *, flush: bool = False) -> None:
        self.line(_json_line(kind, value), flush=flush)

    def listed(self, kind: str, rows: Sequence[Any], empty: str) -> bool:
        """Whether `rows` are said already: as records under --json, or as `empty` when there is
        none; else the command prints its table."""
        if self.json:
            for row in rows:
                self.record(kind, row.as_dict())
            return True
        if not rows:
            self.line(empty)
            return True
        return False


# -- the commands


def run_logs(db: sqlite3.Connection, filters: Filters, args: argparse.Namespace, out: Output) -> None:
    rows = queries.requests(db, filters, limit=args.limit)
    if out.json:
        for r in rows:
            out.record("request", r.as_dict())
    else:
        out.line(LOG_HEADER)
        for r in rows:
            out.line(log_line(r))
    if not args.follow:
        return
    last = rows[-1].id if rows else queries.last_id(db)
    sys.stdout.flush()
    while True:
        time.sleep(FOLLOW_INTERVAL)
        for r in queries.requests(db, filters, after=last, limit=1000):
            last = r.id
            if out.json:
                out.record("request", r.as_dict(), flush=True)
            else:
                out.line(log_line(r), flush=True)


def run_slow(db: sqlite3.Connection, filters: Filters, args: argparse.Namespace, out: Output) -> None:
    rows = queries.slow(db, filters, threshold_ms=args.threshold, limit=args.limit)
    if out.listed("request", rows, f"no request took {ms(args.threshold)} or more"):
        return
    out.line(LOG_HEADER)
    for r in rows:
        out.line(log_line(r))


def _client(name: str | None, version: str | None) -> str:
    return f"{name or '?'} {version or ''}".strip() if name or version else "-"


def run_sessions(db: sqlite3.Connection, filters: Filters, args: argparse.Namespace, out: Output) -> None:
    rows = queries.sessions(db, filters, now=time.time(), active=args.active, limit=args.limit)
    if out.listed("session", rows, "no active session" if args.active else "no session"):
        return
    out.line("\n".join(table(
        ("SESSION", "CLIENT", "SERVER", "VIA", "STARTED", "LAST", "REQS", "ERRS", "STATE"),
        ((s.id[:12], _client(s.client_name, s.client_version), _client(s.server_name, s.server_version),
          s.via or "-", when(s.first_seen), when(s.last_activity), str(s.requests), str(s.errors),
          s.state if s.state != "active" or s.active else "idle") for s in rows),
        right=(6, 7))))


def run_session(db: sqlite3.Connection, filters: Filters, args: argparse.Namespace, out: Output) -> None:
    s = queries.session(db, args.id, now=time.time())
    rows = queries.requests(db, replace(filters, session=s.id), limit=args.limit)
    if out.json:
        out.record("session", s.as_dict())
        for r in rows:
            out.record("request", r.as_dict())
        return
    duration = (s.ended or s.last_activity) - s.first_seen
    for label, value in (("session", s.id), ("client", _client(s.client_name, s.client_version)),
                         ("server", _client(s.server_name, s.server_version) +
                          (f", protocol {s.protocol_version}" if s.protocol_version else "")),
                         ("via", s.via or "-"),
                         ("state", (s.state if s.state != "active" or s.active else "idle") +
                          (f" at {when(s.ended)}" if s.ended else "")),
                         ("time", f"{when(s.first_seen)} - {when(s.last_activity)} ({ms(duration * 1000)})"),
                         ("requests", f"{s.requests}, {s.errors} failed")):
        out.line(f"{label:<9} {value}")
    out.line("")
    out.line(LOG_HEADER)
    for r in rows:
        out.line(log_line(r))


def run_clients(db: sqlite3.Connection, filters: Filters, args: argparse.Namespace, out: Output) -> None:
    rows = queries.clients(db, filters, limit=args.limit)
    if out.listed("client", rows, "no request"):
        return
    out.line("\n".join(table(("CLIENT", "VERSION", "SESSIONS", "REQUESTS", "ERRORS", "FIRST", "LAST", "VIA"),
                             ((c.client_name or "(unknown)", c.client_version or "-", str(c.sessions),
                               str(c.requests), str(c.errors), when(c.first_seen), when(c.last_seen), ",".join(c.via))
                              for c in rows), right=(2, 3, 4))))


def _span(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes)
    return " ".join(parts[:2]) or f"{secs}s"


def run_status(db: sqlite3.Connection, filters: Filters, args: argparse.Namespace, out: Output, path: Path) -> None:
    now = time.time()
    span = filters if filters.since is not None else replace(filters, since=now - STATUS_SPAN)
    st = queries.status(db, span, now=now)
    if out.json:
        out.record("status", {"path": str(path), **st.as_dict()})
        return
    out.line(f"store     {path} (schema {st.schema_version}, {human_bytes(st.size_bytes, iec=True)}, {st.stored_requests} requests"
             + (f" since {when(st.oldest)})" if st.oldest else ")"))
    run = st.run
    if run is None:
        out.line("gateway   none has written here yet")
    else:
        state = (f"running, pid {run.pid} on {run.host}, up {_span(now - run.started)}" if run.running else
                 f"stopped at {when(run.stopped)}" if run.stopped else
                 f"not answering (last heard of {when(run.last_seen)}, pid {run.pid} on {run.host})")
        out.line(f"gateway   {state}; mcpr {run.version}, {', '.join(run.listen)} -> {run.upstream}")
        if run.tunnel is not None:
            tunnel = run.tunnel
            out.line(f"tunnel    {tunnel['state']} at {when(tunnel['ts'])}"
                     + (f": {tunnel['url']}" if tunnel.get("url") else "")
                     + (f" (relay {tunnel['relay']})" if tunnel.get("relay") else ""))
        out.line(f"events    {run.written} written, {run.dropped} dropped"
                 + (" (the disk did not keep up)" if run.dropped else ""))
    traffic = st.traffic
    label = "last 1h" if filters.since is None else f"since {when(span.since)}"
    out.line(f"{label:<9} {traffic.requests} requests, {traffic.errors} failed ({traffic.timeouts} timed out), "
             f"p50 {ms(traffic.p50_ms)}, p95 {ms(traffic.p95_ms)}, max {ms(traffic.max_ms)}; {traffic.sessions} "
             f"sessions; {st.active_sessions} active now")


def _signature(method: str, item: dict[str, Any]) -> str:
    """`add(a, b, [c])` for a tool, `review(code)` for a prompt, the URI and name for a resource."""
    if method == "tools/list":
        properties, required = queries.schema_parts(item.get("inputSchema"))
        args = [p if p in required else f"[{p}]" for p in properties]
        return f"{item.get('name')}({', '.join(args)})"
    if method == "prompts/list":
        arguments = item.get("arguments")
        args = [a.get("name", "?") if a.get("required") else f"[{a.get('name', '?')}]"
                for a in (arguments if isinstance(arguments, list) else []) if isinstance(a, dict)]
        return f"{item.get('name')}({', '.join(args)})"
    key = "uriTemplate" if method == "resources/templates/list" else "uri"
    return f"{item.get(key)}" + (f" ({item['name']})" if item.get("name") else "")


def _description(item: dict[str, Any]) -> str:
    text = item.get("description")
    first = text.strip().splitlines()[0] if isinstance(text, str) and text.strip() else ""
    return first if len(first) <= 70 else first[:69] + "…"


def run_schema(db: sqlite3.Connection, filters: Filters, args: argparse.Namespace, out: Output) -> None:
    if args.changes:
        changes = queries.schema_changes(db, filters, limit=args.limit)
        if out.listed("schema_change", changes, "no list answer stored" if filters == Filters() else "no change"):
            return
        for c in changes:
            page = f" (cursor {c.cursor})" if c.cursor else ""
            was = f", was #{c.previous_id}" if c.previous_id is not None else ", the first seen"
            out.line(f"{when(c.ts)}  {c.method}{page}  answer #{c.listing_id}{was}")
            out.line("\n".join([f"  + {n}" for n in c.added] + [f"  - {n}" for n in c.removed]
                               + [f"  ~ {_item_change(ch)}" for ch in c.changed]))
        return
    rows = queries.listings(db, filters, latest=True, limit=args.limit)
    if out.listed("listing", rows, "no list answer stored"):
        return
    for listing in rows:
        items = listing.items
        if filters.tool is not None:
            items = {n: v for n, v in items.items() if n == filters.tool}
        page = f" (cursor {listing.cursor})" if listing.cursor else ""
        out.line(f"{listing.method}{page}: {len(listing.items)} item(s); answer #{listing.id}, given {listing.seen} "
                 f"time(s), {when(listing.first_seen)} - {when(listing.last_seen)}")
        cells = [(_signature(listing.method, item), _description(item)) for item in items.values()]
        out.line("\n".join("  " + line for line in table(("NAME", "DESCRIPTION"), cells)[1:]))


def _item_change(c: queries.ItemChange) -> str:
    detail = []
    for sign, names in (("+", c.properties_added), ("-", c.properties_removed), ("~", c.properties_changed)):
        detail += [f"{sign}{n}" for n in names]
    detail += [f"required +{n}" for n in c.required_added] + [f"required -{n}" for n in c.required_removed]
    fields = [f"inputSchema ({', '.join(detail)})" if f == "inputSchema" and detail else f for f in c.fields]
    return f"{c.name}: {', '.join(fields)}"


RUNNERS: dict[str, Callable[[sqlite3.Connection, Filters, argparse.Namespace, Output], None]] = {
    "logs": run_logs, "slow": run_slow, "sessions": run_sessions, "session": run_session, "clients": run_clients,
    "schema": run_schema,
}


def filters_of(args: argparse.Namespace, now: float, parse: argparse.ArgumentParser) -> Filters:
    """The filters of the options; a time that is not one is a usage error, said as argparse's are."""
    def moment(option: str, text: str | None) -> float | None:
        if text is None:
            return None
        try:
            return parse_since(text, now)
        except ValueError as e:
            parse.error(f"option {option}: {e}")

    return Filters(since=moment("--since", args.since), until=moment("--until", args.until), tool=args.tool,
                   method=args.method, session=args.session, status=args.status, error_code=args.error_code,
                   via=args.via)


def store_path(args: argparse.Namespace, parse: argparse.ArgumentParser) -> tuple[Path, str]:
    """The store's file and where its path came from (an option, a variable, a key, the default),
    to start the errors of reading it."""
    if args.db:
        return Path(args.db).expanduser().resolve(), "option --db"
    try:
        store = store_location(config=args.config)
    except ConfigError as e:
        parse.error(str(e))
    if store is None:
        parse.error("the gateway started here keeps no store ([store] enabled = false or no_store); "
                    "--db PATH reads one")
    return store.path, store.origin


def main(argv: Sequence[str]) -> int:
    """Run one query command (`argv` without the program name); the exit status."""
    top = parser()
    args = top.parse_args(argv)
    prog = f"mcpr {args.command}"
    # The subcommand's parser, so that a usage error reads `mcpr logs: ...` as argparse's own do.
    parse = _Parser(prog=prog)
    filters = filters_of(args, time.time(), parse)
    path, origin = store_path(args, parse)
    try:
        db = open_reader(path)
    except StoreError as e:
        print(f"{prog}: {origin}: {e}", file=sys.stderr)
        return 1
    out = Output(args.json)
    try:
        if args.command == "status":
            run_status(db, filters, args, out, path)
        else:
            RUNNERS[args.command](db, filters, args, out)
        sys.stdout.flush()
    except QueryError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except sqlite3.Error as e:
        print(f"{prog}: {path}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0 if args.command == "logs" else 130
    except BrokenPipeError:
        # The reader left (`| head`): stop quietly, and let the exit's flush go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        db.close()
    return 0
