"""Authentication, TLS and where the daemon listens, against real daemons over real TLS: who may write
and read which runs, with plain and mutual TLS, every refusal counted, and no secret in any output."""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from monitor import wire
from monitor.client.reporter import Reporter
from monitor.client.security import ClientSecurity
from monitor.daemon.app import ConfigError, Daemon, DaemonConfig
from monitor.daemon.auth import is_loopback
from monitor.daemon.store import Store
from monitor.records import Record
from tests.helpers import ROOT, Pki, metrics, sample, wait_for

WRITER_A = "tok-writer-team-a-0123456789abcdef"
READER_A = "tok-reader-team-a-0123456789abcdef"
WRITER_B = "tok-writer-team-b-0123456789abcdef"
ADMIN = "tok-admin-every-run-0123456789abcd"
WRONG = "tok-nobody-knows-this-0123456789ab"
SECRETS = (WRITER_A, READER_A, WRITER_B, ADMIN, WRONG)
TOKENS_TOML = f"""
[[token]]
name = "team-a-jobs"
token = "{WRITER_A}"
role = "write"
runs = ["team-a/"]

[[token]]
name = "team-a-dashboards"
sha256 = "{hashlib.sha256(READER_A.encode()).hexdigest()}"
role = "read"
runs = ["team-a/"]

[[token]]
name = "team-b-jobs"
token = "{WRITER_B}"
role = "write"
runs = ["team-b/"]

[[token]]
name = "ops"
token = "{ADMIN}"
role = "write"
runs = [""]
"""


@pytest.fixture
def tokens_file(tmp_path: Path) -> str:
    p = tmp_path / "tokens.toml"
    p.write_text(TOKENS_TOML)
    return str(p)


def _batch(run: str, seq: int = 1, step: int = 1) -> bytes:
    return wire.encode_batch(run, 0, "inc-1", seq, [Record("train", run, time.time(), 0, step, {"loss": 1.0})])


def _channel(d: Daemon, pki: Pki, cert: tuple[str, str] | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(pki.ca).read_bytes(),
        private_key=Path(cert[1]).read_bytes() if cert else None,
        certificate_chain=Path(cert[0]).read_bytes() if cert else None)
    return grpc.secure_channel(f"127.0.0.1:{d.grpc_port}", creds)


def _report(ch: grpc.Channel, data: bytes, token: str | None) -> Any:
    md = (("authorization", f"Bearer {token}"),) if token else None
    return wire.decode_response(ch.unary_unary(wire.REPORT_METHOD)(data, timeout=10, metadata=md))


def _refusal(ch: grpc.Channel, data: bytes, token: str | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        _report(ch, data, token)
    return e.value


def _https(d: Daemon, pki: Pki, path: str, token: str | None = None, cert: tuple[str, str] | None = None,
           method: str = "GET", body: Any = None) -> tuple[int, Any]:
    ctx = ssl.create_default_context(cafile=pki.ca)
    if cert:
        ctx.load_cert_chain(*cert)
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"https://127.0.0.1:{d.http_port}{path}", data=data, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            raw = r.read()
            return r.status, raw if path.startswith("/metrics") else json.loads(raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metrics_text(d: Daemon, pki: Pki, cert: tuple[str, str] | None) -> str:
    status, raw = _https(d, pki, "/metrics", token=ADMIN, cert=cert)
    assert status == 200
    return raw.decode()


@pytest.fixture(params=["tls", "mutual-tls"])
def secured(request: Any, daemon_factory: Any, tokens_file: str, pki: Pki) -> tuple[Daemon, Any]:
    """A daemon with tokens over TLS, or over mutual TLS; and the client certificate to use (or None)."""
    mutual = request.param == "mutual-tls"
    d = daemon_factory(auth_tokens_file=tokens_file, tls_cert_file=pki.server, tls_key_file=pki.server_key,
                       tls_client_ca_file=pki.ca if mutual else None)
    return d, ((pki.client, pki.client_key) if mutual else None)


def test_writers_reach_only_their_runs_and_every_refusal_is_counted(
        secured: tuple[Daemon, Any], pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    d, cert = secured
    caplog.set_level(logging.DEBUG)
    with _channel(d, pki, cert) as ch:
        assert _report(ch, _batch("team-a/llama-1"), WRITER_A).accepted == 1
        refusals = {
            "missing_token": _refusal(ch, _batch("team-a/llama-1", 2), None),
            "unknown_token": _refusal(ch, _batch("team-a/llama-1", 2), WRONG),
            "run_scope": _refusal(ch, _batch("team-a/llama-1", 2), WRITER_B),
            "read_only": _refusal(ch, _batch("team-a/llama-1", 2), READER_A),
        }
        assert _report(ch, _batch("team-b/gpt-1"), WRITER_B).accepted == 1
        assert _report(ch, _batch("anyone/x"), ADMIN).accepted == 1
    codes = {reason: e.code() for reason, e in refusals.items()}
    assert codes == {"missing_token": grpc.StatusCode.UNAUTHENTICATED,
                     "unknown_token": grpc.StatusCode.UNAUTHENTICATED,
                     "run_scope": grpc.StatusCode.PERMISSION_DENIED,
                     "read_only": grpc.StatusCode.PERMISSION_DENIED}
    assert "team-b-jobs" in refusals["run_scope"].details() and "'team-b/'" in refusals["run_scope"].details()
    assert "may only read" in refusals["read_only"].details()

    # Only what the right tokens sent was stored: one record of team-a, none of the refused ones.
    assert d.flush(10)
    store = Store(d.config.db)
    try:
        assert [b[3] for b in store.batches("team-a/llama-1", limit=100)] == [1]
    finally:
        store.close(1.0)

    text = _metrics_text(d, pki, cert)  # served over TLS here: read the way a scraper would
    for reason in refusals:
        assert f'trainguard_auth_refused_total{{listener="grpc",reason="{reason}"}} 1.0' in text, reason
    # No secret anywhere: not in refusals, metrics or logs.
    seen = text + caplog.text + "".join(e.details() for e in refusals.values())
    assert [s for s in SECRETS if s in seen] == []


def test_mutual_tls_refuses_clients_without_a_certificate_the_ca_signed(
        daemon_factory: Any, tokens_file: str, pki: Pki) -> None:
    d = daemon_factory(auth_tokens_file=tokens_file, tls_cert_file=pki.server, tls_key_file=pki.server_key,
                       tls_client_ca_file=pki.ca)
    for cert in (None, (pki.stranger, pki.stranger_key)):
        with _channel(d, pki, cert) as ch:
            e = _refusal(ch, _batch("team-a/x"), WRITER_A)
            assert e.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no call reaches the daemon
        for c in (None, cert):
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                _https(d, pki, "/healthz", cert=c)
    with _channel(d, pki, (pki.client, pki.client_key)) as ch:
        assert _report(ch, _batch("team-a/x"), WRITER_A).accepted == 1
    text = _metrics_text(d, pki, (pki.client, pki.client_key))
    n = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith('trainguard_auth_refused_total{listener="http",reason="tls_handshake"}'))
    assert n >= 3  # no certificate (twice: once per loop) and the stranger's


def test_a_plaintext_client_cannot_talk_to_a_tls_daemon(daemon_factory: Any, tokens_file: str, pki: Pki) -> None:
    d = daemon_factory(auth_tokens_file=tokens_file, tls_cert_file=pki.server, tls_key_file=pki.server_key)
    with grpc.insecure_channel(d.grpc_address) as ch:
        e = _refusal(ch, _batch("team-a/x"), WRITER_A)
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert d.registry.get("team-a/x") is None


def test_readers_see_only_their_runs_over_https(secured: tuple[Daemon, Any], pki: Pki) -> None:
    d, cert = secured
    with _channel(d, pki, cert) as ch:
        for seq, run, tok in ((1, "team-a/one", WRITER_A), (1, "team-b/two", WRITER_B)):
            rec = Record("train", run, time.time(), 0, 1, {"loss": float("nan")})
            _report(ch, wire.encode_batch(run, 0, "i", seq, [rec]), tok)

    def get(path: str, token: str | None) -> tuple[int, Any]:
        return _https(d, pki, path, token=token, cert=cert)

    assert get("/api/v1/runs", None)[0] == 401
    assert get("/api/v1/runs", WRONG)[0] == 401
    status, body = get("/api/v1/runs", READER_A)
    assert status == 200 and [r["run"] for r in body["runs"]] == ["team-a/one"]
    assert sorted(r["run"] for r in get("/api/v1/runs", ADMIN)[1]["runs"]) == ["team-a/one", "team-b/two"]
    status, body = get("/api/v1/runs/team-b%2Ftwo", READER_A)
    assert status == 403 and "team-a-dashboards" in body["error"]
    assert get("/api/v1/runs/team-a%2Fone", READER_A)[0] == 200
    assert {a["run"] for a in get("/api/v1/alerts", READER_A)[1]["alerts"]} == {"team-a/one"}
    assert get("/api/v1/alerts?run=team-b%2Ftwo", READER_A)[0] == 403
    # /healthz and /metrics are open by default (probes and scrapers).
    assert get("/healthz", None)[0] == 200
    assert b'run="team-b/two"' in get("/metrics", None)[1]

    # A reader cannot silence; a writer silences its own runs only; "*" needs a token for every run.
    silence = {"run": "team-a/one", "duration_seconds": 60}
    status, body = _https(d, pki, "/api/v1/silences", READER_A, cert, "POST", silence)
    assert status == 403 and "may only read" in body["error"]
    assert _https(d, pki, "/api/v1/silences", WRITER_B, cert, "POST", silence)[0] == 403
    assert _https(d, pki, "/api/v1/silences", WRITER_A, cert, "POST", {"alert": "NonFinite",
                                                                       "duration_seconds": 60})[0] == 403
    status, body = _https(d, pki, "/api/v1/silences", WRITER_A, cert, "POST", silence)
    assert status == 200 and body["silence"]["created_by"] == "team-a-jobs"
    sid = body["id"]
    assert _https(d, pki, f"/api/v1/silences/{sid}", WRITER_B, cert, "DELETE")[0] == 403
    assert [s["id"] for s in get("/api/v1/silences", READER_A)[1]["silences"]] == [sid]
    assert get("/api/v1/silences", WRITER_B)[1]["silences"] == []
    assert _https(d, pki, f"/api/v1/silences/{sid}", WRITER_A, cert, "DELETE")[0] == 200

    text = _metrics_text(d, pki, cert)
    assert 'trainguard_auth_refused_total{listener="http",reason="missing_token"} 1.0' in text
    assert 'trainguard_auth_refused_total{listener="http",reason="unknown_token"} 1.0' in text
    assert 'trainguard_auth_refused_total{listener="http",reason="read_only"} 1.0' in text
    assert 'trainguard_auth_refused_total{listener="http",reason="run_scope"} 5.0' in text
    assert [s for s in SECRETS if s in text] == []


def test_protected_metrics_and_healthz_need_a_token_and_show_a_reader_its_runs(
        daemon_factory: Any, tokens_file: str) -> None:
    d = daemon_factory(auth_tokens_file=tokens_file, metrics_open=False, healthz_open=False)
    with grpc.insecure_channel(d.grpc_address) as ch:
        _report(ch, _batch("team-a/one"), WRITER_A)
        _report(ch, _batch("team-b/two"), WRITER_B)

    def get(path: str, token: str | None) -> tuple[int, str]:
        req = urllib.request.Request(d.http_url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            assert e.headers["WWW-Authenticate"] if e.code == 401 else True
            return e.code, e.read().decode()

    assert get("/metrics", None)[0] == 401
    assert get("/healthz", None)[0] == 401
    assert get("/healthz", READER_A)[0] == 200
    status, text = get("/metrics", READER_A)
    assert status == 200 and 'run="team-a/one"' in text and "team-b" not in text
    assert "trainguard_ingest_batches_total" in text  # the daemon's own figures stay
    status, text = get("/metrics", ADMIN)
    assert 'run="team-a/one"' in text and 'run="team-b/two"' in text


def test_the_reporter_sends_with_its_token_over_tls_and_counts_a_refusal(
        daemon_factory: Any, tokens_file: str, pki: Pki, monkeypatch: pytest.MonkeyPatch,
        reporters: list[Reporter]) -> None:
    d = daemon_factory(auth_tokens_file=tokens_file, tls_cert_file=pki.server, tls_key_file=pki.server_key,
                       tls_client_ca_file=pki.ca)
    monkeypatch.setenv("TRAINGUARD_TOKEN", WRITER_A)
    monkeypatch.setenv("TRAINGUARD_TLS_CA", pki.ca)
    monkeypatch.setenv("TRAINGUARD_TLS_CERT", pki.client)
    monkeypatch.setenv("TRAINGUARD_TLS_KEY", pki.client_key)
    good = Reporter(run="team-a/job", address=d.grpc_address, heartbeat_interval=60)
    # Scoped to another team: refused for good, counted, never raised into training.
    bad = Reporter(run="team-a/other", address=d.grpc_address, heartbeat_interval=60,
                   security=ClientSecurity.resolve(token=WRITER_B))
    reporters.extend([good, bad])
    for step in range(1, 51):
        good.log("train", step, {"loss": 1.0 / step})
        bad.log("train", step, {"loss": 1.0 / step})
    assert good.flush(20) is True and bad.flush(20) is True
    s, b = good.stats(), bad.stats()
    assert (s.sent, s.rejected, s.dropped) == (50, 0, 0)
    assert (b.sent, b.rejected) == (0, 50)
    assert "PERMISSION_DENIED" in (b.last_error or "") and WRITER_B not in (b.last_error or "")
    wait_for(lambda: d.registry.get("team-a/job") is not None and d.registry.get("team-a/job").last_step() == 50,
             what="the records of the good reporter")
    assert d.registry.get("team-a/other") is None


def test_the_cli_talks_https_with_a_token_file_and_names_a_refusal(
        daemon_factory: Any, tokens_file: str, pki: Pki, tmp_path: Path) -> None:
    d = daemon_factory(auth_tokens_file=tokens_file, tls_cert_file=pki.server, tls_key_file=pki.server_key)
    with _channel(d, pki) as ch:
        _report(ch, _batch("team-a/cli"), WRITER_A)
    (tmp_path / "token").write_text(READER_A + "\n")
    url = f"https://127.0.0.1:{d.http_port}"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "monitor.cli", *args, "--url", url, "--ca", pki.ca],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    r = cli("runs", "--json", "--token-file", str(tmp_path / "token"))
    assert r.returncode == 0, r.stderr
    assert [x["run"] for x in json.loads(r.stdout)] == ["team-a/cli"]
    r = cli("runs")
    assert r.returncode == 2 and "HTTP 401" in r.stderr and "no bearer token" in r.stderr
    r = cli("silence", "--run", "team-a/cli", "--for", "1h", "--token-file", str(tmp_path / "token"))
    assert r.returncode == 2 and "HTTP 403" in r.stderr and "may only read" in r.stderr
    assert READER_A not in r.stderr + r.stdout


# -- where it listens ------------------------------------------------------------------------------


def test_a_non_loopback_address_needs_authentication_or_insecure(
        tmp_path: Path, tokens_file: str, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    base = dict(grpc_port=0, http_port=0, db=str(tmp_path / "t.db"))
    with pytest.raises(ConfigError, match=r"^host: 0\.0\.0\.0 can be reached from other machines.*--insecure"):
        Daemon(DaemonConfig(host="0.0.0.0", **base))
    caplog.set_level(logging.WARNING, "trainguard.daemon")
    for cfg in (dict(insecure=True), dict(auth_tokens_file=tokens_file),
                dict(tls_cert_file=pki.server, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca)):
        d = Daemon(DaemonConfig(host="0.0.0.0", **base, **cfg)).start()  # type: ignore[arg-type]
        d.close(timeout=1.0)
    assert [r.message for r in caplog.records if "--insecure" in r.message] != []
    assert len([r for r in caplog.records if "no client authentication" in r.message]) == 1
    assert DaemonConfig().host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.1.2.3")


def test_serve_refuses_every_interface_without_auth_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "monitor.cli", "serve", "--host", "0.0.0.0", "--grpc-port", "0",
                        "--http-port", "0", "--db", str(tmp_path / "t.db")], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("trainguard serve: error: host: 0.0.0.0 can be reached") and "Traceback" not in r.stderr


# -- bad settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ('[[token]]\nname = "a"\ntoken = "short"\nrole = "write"\nruns = [""]\n', r"token\[0\]\.token \(a\): must be at "
                                                                             r"least 16"),
    (f'[[token]]\nname = "a"\ntoken = "{WRITER_A}"\nrole = "admin"\nruns = [""]\n', r'token\[0\]\.role \(a\): must '
                                                                                    r'be "read" or "write"'),
    (f'[[token]]\nname = "a"\ntoken = "{WRITER_A}"\nrole = "read"\nruns = []\n', r"token\[0\]\.runs \(a\)"),
    (f'[[token]]\nname = "a"\ntoken = "{WRITER_A}"\nrole = "read"\nruns = [""]\n'
     f'[[token]]\nname = "b"\ntoken = "{WRITER_A}"\nrole = "read"\nruns = [""]\n', r"token\[1\] \(b\): the same "
                                                                                  r"token as a"),
    (f'[[token]]\nname = "a"\ntoken = "{WRITER_A}"\nsha256 = "00"\nrole = "read"\nruns = [""]\n',
     r"give either token or sha256"),
    ('[[token]]\nname = "a"\nsha256 = "xyz"\nrole = "read"\nruns = [""]\n', r"sha256 \(a\): must be 64 hex"),
    (f'token = "{WRITER_A}"\n', r"expected \[\[token\]\] tables only"),
    ('[[token]\n', r"not valid TOML"),
    ("", r"no \[\[token\]\] entries"),
])
def test_a_bad_tokens_file_is_named_without_showing_a_token(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "tokens.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        Daemon(DaemonConfig(grpc_port=0, http_port=0, db=str(tmp_path / "t.db"), auth_tokens_file=str(p)))
    assert WRITER_A not in str(e.value) and '"short"' not in str(e.value)


def test_bad_tls_settings_are_named(tmp_path: Path, pki: Pki) -> None:
    base = dict(grpc_port=0, http_port=0, db=str(tmp_path / "t.db"))
    cases = [
        (dict(tls_cert_file=pki.server), r"^tls_key_file: TLS needs both"),
        (dict(tls_client_ca_file=pki.ca), r"^tls_client_ca_file: mutual TLS needs"),
        (dict(tls_cert_file=str(tmp_path / "nope.crt"), tls_key_file=pki.server_key),
         r"^tls_cert_file: cannot read .*nope\.crt"),
        (dict(tls_cert_file=pki.server, tls_key_file=pki.client_key), r"^tls_cert_file, tls_key_file: .* are not a"),
        (dict(tls_cert_file=pki.server, tls_key_file=pki.server_key, tls_client_ca_file=pki.server_key),
         r"^tls_client_ca_file: .* holds no PEM CA"),
        (dict(auth_tokens_file=str(tmp_path / "missing.toml")), r"^auth_tokens_file: cannot read"),
        (dict(metrics_open="no"), r"^metrics_open: expected true or false"),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message):
            Daemon(DaemonConfig(**base, **cfg))  # type: ignore[arg-type]


def test_tokens_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINGUARD_AUTH_TOKENS", TOKENS_TOML)
    d = Daemon(DaemonConfig(grpc_port=0, http_port=0, db=str(tmp_path / "t.db"))).start()
    try:
        with grpc.insecure_channel(d.grpc_address) as ch:
            assert _refusal(ch, _batch("team-a/x"), None).code() == grpc.StatusCode.UNAUTHENTICATED
            assert _report(ch, _batch("team-a/x"), WRITER_A).accepted == 1
        assert sample(metrics(d), "trainguard_auth_refused_total", listener="grpc", reason="missing_token") == 1
    finally:
        d.close(timeout=1.0)


def test_security_md_names_every_refusal_reason_and_setting() -> None:
    from monitor.daemon.auth import REASONS

    doc = (ROOT / "SECURITY.md").read_text()
    assert [r for r in REASONS if f"`{r}`" not in doc] == []
    for setting in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file", "metrics_open",
                    "healthz_open", "--insecure", "TRAINGUARD_TOKEN", "TRAINGUARD_TLS_CA", "TRAINGUARD_AUTH_TOKENS"):
        assert setting in doc, setting


def test_a_token_over_plaintext_to_another_machine_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    sec = ClientSecurity.resolve(token=WRITER_A)
    caplog.set_level(logging.WARNING, "trainguard.client")
    for address in ("127.0.0.1:9751", "localhost:9751", "10.9.8.7:9751", "10.9.8.7:9751"):
        sec.channel(address, []).close()
    warnings = [r.getMessage() for r in caplog.records if "without TLS" in r.getMessage()]
    assert len(warnings) == 1 and "10.9.8.7:9751" in warnings[0] and WRITER_A not in warnings[0]
