"""The `trainguard` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

from monitor import __version__

DEFAULT_URL = "http://127.0.0.1:9750"
DEFAULT_ADDRESS = "127.0.0.1:9751"


class CliError(Exception):
    """A problem to report to the user in one line (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# tables


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _when(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table with aligned columns."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def format_alerts(alerts: Sequence[dict[str, Any]]) -> str:
    """The table that `trainguard alerts` prints."""
    if not alerts:
        return "no alerts"
    return table(["id", "run", "alert", "severity", "state", "rank", "step", "started", "summary"],
                 [[a["id"], a["run"], a["name"], a["severity"],
                   a["state"] + (",silenced" if a.get("silenced") else ""), a["rank"], a["step"],
                   _when(a["started_at"]), a["summary"]] for a in alerts])


def format_silences(silences: Sequence[dict[str, Any]]) -> str:
    """The table that `trainguard silence --list` prints."""
    if not silences:
        return "no silences"
    return table(["id", "run", "alert", "state", "ends", "created_by", "comment"],
                 [[s["id"], s["run"], s["alert"], s["state"], _when(s["ends_at"]), s["created_by"] or "-",
                   s["comment"] or "-"] for s in silences])


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 90s, 30m, 2h, 1d, 1w or 1h30m (ValueError if it is not one)."""
    t = text.strip().lower()
    parts = _DURATION.findall(t)
    if not t or "".join(n + u for n, u in parts) != t:
        raise ValueError(f"{text!r} is not a duration: use a number with a unit (s, m, h, d, w), e.g. 30m, 2h, 1d")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r}: must be longer than zero")
    return seconds


def _duration(v: str) -> float:
    try:
        return parse_duration(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def format_duration(seconds: float) -> str:
    """A duration as the largest whole units, e.g. 1d2h, 30m, 45s."""
    s = int(round(seconds))
    out = []
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= n:
            out.append(f"{s // n}{unit}")
            s %= n
    return "".join(out) or "0s"


def format_runs(runs: Sequence[dict[str, Any]]) -> str:
    """The table that `trainguard runs` prints."""
    if not runs:
        return "no live runs"
    return table(["run", "status", "health", "world_size", "reporting", "last_step", "last_seen"],
                 [[r["run"], r["status"], r["health"], r["world_size"], r["ranks_reporting"], r["last_step"],
                   _when(r["last_seen"])] for r in runs])


def _security(args: argparse.Namespace) -> Any:
    """The token and TLS settings of a client command: its flags, else TRAINGUARD_TOKEN, TRAINGUARD_TLS_CA, ..."""
    from monitor.client.security import ClientSecurity

    try:
        return ClientSecurity.resolve(token_file=args.token_file, ca_file=args.ca, cert_file=args.cert,
                                      key_file=args.key)
    except ValueError as e:
        raise CliError(str(e)) from None


def _api(args: argparse.Namespace, path: str, method: str = "GET", body: Any = None) -> Any:
    url = args.url
    sec = _security(args)
    full = url.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    headers.update(sec.headers())
    req = urllib.request.Request(full, data=data, method=method, headers=headers)
    try:
        ctx = sec.ssl_context() if full.startswith("https:") else None
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        try:
            msg = json.load(e).get("error", e.reason)
        except Exception:  # noqa: BLE001
            msg = e.reason
        raise CliError(f"{full}: HTTP {e.code}: {msg}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CliError(f"cannot reach the daemon at {url} ({reason}); start one with `trainguard serve` "
                       "or pass --url") from None


# ---------------------------------------------------------------------------------------------
# commands


def cmd_serve(args: argparse.Namespace) -> int:
    from monitor.daemon.app import ConfigError, Daemon, DaemonConfig, load_config_file, move_aside
    from monitor.daemon.store import StoreCorrupt, StoreError

    # The daemon's threads take turns on one interpreter lock; a 1 ms turn (instead of 5 ms) lets a
    # small, fresh batch through quickly while big ones are being applied.
    sys.setswitchinterval(0.001)
    try:
        cfg = DaemonConfig.from_mapping(load_config_file(args.config), args.config) if args.config else DaemonConfig()
        for name in ("host", "grpc_port", "http_port", "db", "alertmanager_urls", "webhook_urls", "tls_cert_file",
                     "tls_key_file", "tls_client_ca_file", "auth_tokens_file", "insecure"):
            v = getattr(args, name)
            if v is not None:
                setattr(cfg, name, v)
        try:
            daemon = Daemon(cfg).start()
        except StoreCorrupt as e:
            if not args.move_corrupt_aside:
                raise
            dest = move_aside(cfg.db)
            logging.getLogger("trainguard.daemon").warning("%s; moved it to %s and starting with a new database",
                                                           e, dest)
            daemon = Daemon(cfg).start()
    except (ConfigError, StoreError) as e:
        raise CliError(str(e)) from None
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger("trainguard.daemon").info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"trainguard {__version__} serving: gRPC {daemon.grpc_address}, HTTP {daemon.http_url} "
          f"(/metrics, /healthz, /api/v1/runs, /api/v1/alerts, /api/v1/silences); store {os.path.abspath(cfg.db)}",
          flush=True)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"grpc_port": daemon.grpc_port, "http_port": daemon.http_port, "pid": os.getpid()}, f)
        os.replace(tmp, args.ready_file)
    while not stop.wait(1.0):
        pass
    daemon.close()
    print("trainguard daemon stopped", flush=True)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from monitor.replay import ReplayError, replay

    missing = [p for p in args.traces if not os.path.isfile(p)]
    if missing:
        raise CliError(f"no such file: {', '.join(missing)}")
    try:
        res = replay(args.traces, args.address, batch_size=args.batch_size,
                     progress=False if args.quiet else None, security=_security(args))
    except ReplayError as e:
        raise CliError(str(e)) from None
    rate = res.records_accepted / res.seconds if res.seconds > 0 else 0.0
    print(f"replayed {res.records_accepted:,} records from {res.files} file(s) in {res.seconds:.2f}s "
          f"({rate:,.0f} records/s); runs: {', '.join(sorted(res.runs)) or '-'}")
    if res.rejected:
        print(f"{res.rejected:,} line(s) or record(s) rejected; the good ones were delivered:", file=sys.stderr)
        for err in res.line_errors:
            print(f"  {err}", file=sys.stderr)
        for msg in res.record_errors:
            print(f"  {msg}", file=sys.stderr)
        shown = len(res.line_errors) + len(res.record_errors)
        if res.rejected > shown:
            print(f"  ... and {res.rejected - shown:,} more", file=sys.stderr)
        return 1
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    if args.run:
        detail = _api(args, "/api/v1/runs/" + urllib.parse.quote(args.run, safe=""))
        if args.json:
            print(json.dumps(detail, indent=2))
            return 0
        print(format_runs([detail]))
        print()
        print(table(["rank", "status", "last_step", "last_seen", "step_time", "rss_bytes", "dropped"],
                    [[r["rank"], r["status"], r["last_step"], _when(r["last_seen"]), r["step_time_seconds"],
                      r["host_rss_bytes"], r["client"].get("client_dropped_total")] for r in detail["ranks"]]))
        return 0
    runs = _api(args, "/api/v1/runs")["runs"]
    print(json.dumps(runs, indent=2) if args.json else format_runs(runs))
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    q = {"state": args.state}
    if args.run:
        q["run"] = args.run
    alerts = _api(args, "/api/v1/alerts?" + urllib.parse.urlencode(q))["alerts"]
    print(json.dumps(alerts, indent=2) if args.json else format_alerts(alerts))
    return 0


def cmd_silence(args: argparse.Namespace) -> int:
    if args.list:
        silences = _api(args, "/api/v1/silences?" + urllib.parse.urlencode(
            {"state": "all" if args.all else "active"}))["silences"]
        print(json.dumps(silences, indent=2) if args.json else format_silences(silences))
        return 0
    if args.expire is not None:
        s = _api(args, f"/api/v1/silences/{args.expire}", method="DELETE")["silence"]
        print(json.dumps(s, indent=2) if args.json else
              f"silence {s['id']} expired (run {s['run']}, alert {s['alert']})")
        return 0
    if args.duration is None:
        raise CliError("give --for DURATION (with --run and/or --alert) to create a silence, --list to see them, "
                       "or --expire ID to end one")
    if args.run is None and args.alert is None:
        raise CliError("name what to silence: --run RUN and/or --alert NAME (use '*' for any)")
    body = {"run": args.run or "*", "alert": args.alert or "*", "duration_seconds": args.duration,
            "comment": args.comment, "created_by": args.by}
    res = _api(args, "/api/v1/silences", method="POST", body=body)
    s = res["silence"]
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(f"silence {s['id']}: run {s['run']}, alert {s['alert']}, for {format_duration(args.duration)} "
              f"(until {_when(s['ends_at'])}); end it early with `trainguard silence --expire {s['id']}`")
    return 0


def _default_user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is not worth an error
        return ""


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise CliError("the demo trains a model with PyTorch: pip install 'trainguard[torch]'") from None
    if args.scenario == "forgetting":
        from monitor.demo import run_forgetting_demo

        return run_forgetting_demo(pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                                   probe_every=args.probe_every, db=args.db, keep_serving=args.keep_serving)
    from monitor.demo import run_demo

    return run_demo(seconds=args.seconds, nan_at=args.nan_at, db=args.db, keep_serving=args.keep_serving)


# ---------------------------------------------------------------------------------------------
# parser


def _positive(v: str) -> float:
    x = float(v)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return x


def _fraction(v: str) -> float:
    x = float(v)
    if not 0 < x < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {v}")
    return x


def _count(v: str) -> int:
    try:
        x = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {v}") from None
    if x < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {v}")
    return x


def _port(v: str) -> int:
    x = int(v)
    if not 0 <= x <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0 picks a free port), got {v}")
    return x


def _client_flags(s: argparse.ArgumentParser) -> None:
    """Token and TLS options of the commands that talk to a daemon (the token itself only from a file or
    TRAINGUARD_TOKEN: a command line is visible to every user of the machine)."""
    g = s.add_argument_group("authentication and TLS (see SECURITY.md)")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the bearer token (default $TRAINGUARD_TOKEN_FILE, or the token in "
                        "$TRAINGUARD_TOKEN)")
    g.add_argument("--ca", default=None, metavar="FILE",
                   help="PEM CA certificate that signed the daemon's (default $TRAINGUARD_TLS_CA); turns on TLS")
    g.add_argument("--cert", default=None, metavar="FILE",
                   help="PEM client certificate for mutual TLS (default $TRAINGUARD_TLS_CERT)")
    g.add_argument("--key", default=None, metavar="FILE", help="its private key (default $TRAINGUARD_TLS_KEY)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="trainguard", formatter_class=fmt,
        description="Watch training jobs and page a person when a run goes wrong.",
        epilog="examples:\n  trainguard serve\n  trainguard demo\n  trainguard replay run.jsonl.gz\n"
               "  trainguard runs\n  trainguard alerts --run my-run\n"
               "  trainguard silence --run my-run --alert LossSpike --for 2h\n\n"
               "Run `trainguard COMMAND --help` for each command's options.")
    p.add_argument("--version", action="version", version=f"trainguard {__version__}")
    p.add_argument("--log-level", default=os.environ.get("TRAINGUARD_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity (default INFO)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the daemon", formatter_class=fmt,
                       description="Run the trainguard daemon: gRPC ingest, detectors, alerts, SQLite history, "
                                   "Prometheus /metrics and the JSON API.",
                       epilog="examples:\n  trainguard serve\n"
                              "  trainguard serve --db /var/lib/trainguard/trainguard.db\n"
                              "  trainguard serve --grpc-port 0 --http-port 0 --ready-file ports.json\n"
                              "  trainguard serve --config trainguard.toml\n"
                              "  trainguard serve --alertmanager-url http://alertmanager:9093\n"
                              "  trainguard serve --db ./trainguard.db --move-corrupt-aside\n"
                              "  trainguard serve --host 0.0.0.0 --auth-tokens-file tokens.toml \\\n"
                              "      --tls-cert tls.crt --tls-key tls.key\n\n"
                              "Listening on an address other than loopback needs client authentication (tokens or\n"
                              "mutual TLS) or --insecure; see SECURITY.md.\n\n"
                              "SIGTERM or Ctrl-C shuts down gracefully: health turns NOT_SERVING, in-flight calls\n"
                              "finish, the store is flushed.")
    s.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    s.add_argument("--grpc-port", type=_port, default=None, help="telemetry gRPC port (default 9751)")
    s.add_argument("--http-port", type=_port, default=None, help="metrics and API port (default 9750)")
    s.add_argument("--db", default=None, help="SQLite file for history (default ./trainguard.db)")
    s.add_argument("--config", default=None, metavar="FILE",
                   help="TOML config; command-line flags override it (see README: Configuration)")
    s.add_argument("--move-corrupt-aside", action="store_true",
                   help="if the database file is damaged, rename it to FILE.corrupt-TIMESTAMP (with its -wal and "
                        "-shm files) and start with a new one, instead of refusing to start")
    g = s.add_argument_group("security (see SECURITY.md)")
    g.add_argument("--tls-cert", dest="tls_cert_file", default=None, metavar="FILE",
                   help="PEM certificate for both listeners (with --tls-key): gRPC over TLS and HTTPS")
    g.add_argument("--tls-key", dest="tls_key_file", default=None, metavar="FILE", help="its private key")
    g.add_argument("--tls-client-ca", dest="tls_client_ca_file", default=None, metavar="FILE",
                   help="mutual TLS: accept only clients with a certificate this CA signed")
    g.add_argument("--auth-tokens-file", dest="auth_tokens_file", default=None, metavar="FILE",
                   help="TOML file of accepted bearer tokens, each scoped to run-id prefixes and to read or "
                        "write (default: $TRAINGUARD_AUTH_TOKENS holds the same text, if set)")
    g.add_argument("--insecure", action="store_true", default=None,
                   help="listen on a non-loopback --host without any client authentication (a warning is "
                        "logged): anyone who can reach the ports can write into and read every run")
    s.add_argument("--ready-file", default=None, metavar="FILE",
                   help="write {grpc_port, http_port, pid} as JSON here once serving (useful with port 0)")
    s.add_argument("--alertmanager-url", dest="alertmanager_urls", action="append", default=None, metavar="URL",
                   help="push alerts to this Alertmanager (its base URL; repeat for several); replaces the "
                        "config's alertmanager_urls")
    s.add_argument("--webhook-url", dest="webhook_urls", action="append", default=None, metavar="URL",
                   help="POST each alert transition as JSON to this URL (repeatable); replaces the config's "
                        "webhook_urls")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("replay", help="stream trace files to a daemon", formatter_class=fmt,
                       description="Send v1 trace files (.jsonl or .jsonl.gz) to a daemon as fast as it "
                                   "acknowledges them. Returns once the daemon has applied every record, so its "
                                   "alerts API already reflects them. Bad lines are reported with file:line and "
                                   "field; good lines are still sent.",
                       epilog="examples:\n  trainguard replay run.jsonl.gz\n"
                              "  trainguard replay traces/*.jsonl.gz --address 10.0.0.5:9751\n\n"
                              "exit status: 0 all delivered, 1 some lines or records rejected, 2 error")
    s.add_argument("traces", nargs="+", metavar="TRACE", help="trace file(s)")
    s.add_argument("--address", default=os.environ.get("TRAINGUARD_ADDRESS", DEFAULT_ADDRESS),
                   help=f"daemon gRPC address (default $TRAINGUARD_ADDRESS or {DEFAULT_ADDRESS})")
    s.add_argument("--batch-size", type=int, default=1000, help="records per batch (default 1000)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _client_flags(s)
    s.set_defaults(func=cmd_replay)

    url_help = f"daemon HTTP URL (default $TRAINGUARD_URL or {DEFAULT_URL})"
    s = sub.add_parser("runs", help="list live runs", formatter_class=fmt,
                       description="List the daemon's live runs, or one run's per-rank detail.",
                       epilog="examples:\n  trainguard runs\n  trainguard runs --run my-run\n  trainguard runs --json")
    s.add_argument("--run", default=None, help="show one run with per-rank detail")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--url", default=os.environ.get("TRAINGUARD_URL", DEFAULT_URL), help=url_help)
    _client_flags(s)
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("alerts", help="list alerts", formatter_class=fmt,
                       description="List alerts, newest first.",
                       epilog="examples:\n  trainguard alerts\n  trainguard alerts --run my-run --state firing\n"
                              "  trainguard alerts --json")
    s.add_argument("--run", default=None, help="only this run")
    s.add_argument("--state", default="all", choices=["firing", "resolved", "all", "pending"],
                   help="default all (every alert that fired); pending: waiting for their `for`")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--url", default=os.environ.get("TRAINGUARD_URL", DEFAULT_URL), help=url_help)
    _client_flags(s)
    s.set_defaults(func=cmd_alerts)

    s = sub.add_parser("silence", help="stop notifications for a run or an alert for a while", formatter_class=fmt,
                       description="Create, list or end silences. A silenced alert still shows in the API, "
                                   "`trainguard alerts` and trainguard_alert_active, but no notifier hears of it; "
                                   "if it still fires when the silence ends, it is announced then. Silences are "
                                   "stored, so they survive a daemon restart.",
                       epilog="examples:\n"
                              "  trainguard silence --run my-run --alert LossSpike --for 2h --comment 'bad shard'\n"
                              "  trainguard silence --run my-run --for 30m          # every alert of one run\n"
                              "  trainguard silence --alert LossPlateau --for 1d    # one alert in every run\n"
                              "  trainguard silence --list\n"
                              "  trainguard silence --list --all --json\n"
                              "  trainguard silence --expire 3\n\n"
                              "durations: a number with a unit, s m h d w, combinable: 90s, 30m, 2h, 1d, 1h30m")
    s.add_argument("--run", default=None, help="the run to silence ('*' or omitted with --alert: every run)")
    s.add_argument("--alert", default=None, help="the alert name to silence ('*' or omitted with --run: every alert)")
    what = s.add_mutually_exclusive_group()
    what.add_argument("--for", dest="duration", type=_duration, default=None, metavar="DURATION",
                      help="create a silence this long, e.g. 30m, 2h, 1d")
    what.add_argument("--list", action="store_true", help="list active silences")
    what.add_argument("--expire", type=int, default=None, metavar="ID", help="end silence ID now")
    s.add_argument("--comment", default="", help="why (shown in --list)")
    s.add_argument("--by", default=_default_user(), help="who (default: your user name)")
    s.add_argument("--all", action="store_true", help="with --list: expired ones too")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.add_argument("--url", default=os.environ.get("TRAINGUARD_URL", DEFAULT_URL), help=url_help)
    _client_flags(s)
    s.set_defaults(func=cmd_silence)

    s = sub.add_parser("demo", help="see trainguard catch a NaN or forgetting in a live training run",
                       formatter_class=fmt,
                       description="Start a daemon in this process and train a tiny language model on the CPU. "
                                   "Scenario 'nan' (the default): about a minute of training with a NaN injected "
                                   "near the end; exit status 0 when NonFinite fired at the injected step. "
                                   "Scenario 'forgetting': pre-train a character-level GPT-2 on arithmetic word "
                                   "problems, then fine-tune it on reading comprehension with an arithmetic probe "
                                   "every few steps; exit status 0 when ProbeRegression fired.",
                       epilog="examples:\n  trainguard demo\n  trainguard demo --seconds 20\n"
                              "  trainguard demo --scenario forgetting\n"
                              "  trainguard demo --scenario forgetting --pretrain-steps 400 --finetune-steps 100\n"
                              "  trainguard demo --keep-serving   # browse /metrics and the API afterwards")
    s.add_argument("--scenario", choices=("nan", "forgetting"), default="nan",
                   help="what goes wrong in the run (default nan)")
    s.add_argument("--seconds", type=_positive, default=60.0, help="nan: training time (default 60)")
    s.add_argument("--nan-at", type=_fraction, default=0.85,
                   help="nan: when to inject, as a fraction (default 0.85)")
    s.add_argument("--pretrain-steps", type=_count, default=700,
                   help="forgetting: steps of pre-training on arithmetic (default 700)")
    s.add_argument("--finetune-steps", type=_count, default=300,
                   help="forgetting: steps of fine-tuning on reading (default 300)")
    s.add_argument("--probe-every", type=_count, default=25,
                   help="forgetting: steps between arithmetic probes (default 25)")
    s.add_argument("--db", default=None, help="SQLite file (default: a new temporary directory)")
    s.add_argument("--keep-serving", action="store_true", help="keep the daemon up after training")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `trainguard` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"trainguard {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
