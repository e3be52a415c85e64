"""Who may write or read which runs: bearer tokens scoped to run-id prefixes and a role, and the TLS
settings of both listeners.

A tokens file (TOML) lists the accepted tokens:

    [[token]]
    name = "team-a-jobs"            # shown in logs and refusals; the token itself never is
    sha256 = "9f86d081884c7d65..."  # hex SHA-256 of the token (or: token = "the token itself")
    role = "write"                  # "write" (sends telemetry, sets silences, and reads) or "read"
    runs = ["team-a/"]              # run-id prefixes it covers; "" covers every run

The daemon keeps only each token's SHA-256 and compares digests, so a lookup takes the same time
however close a wrong token is to a right one.
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

ROLES = ("read", "write")
MIN_TOKEN_CHARS = 16
MAX_TOKENS = 10_000
TOKENS_ENV = "TRAINGUARD_AUTH_TOKENS"  # the tokens file's content, when no auth_tokens_file is set
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+:/-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")

# Why a request was refused: the reason label of trainguard_auth_refused_total.
REASONS = ("missing_token", "unknown_token", "malformed", "read_only", "run_scope", "tls_handshake")


class AuthConfigError(ValueError):
    """The tokens or TLS settings cannot be used; the message names the setting (never a secret)."""


@dataclass(frozen=True)
class Principal:
    """What one token may do."""

    name: str
    role: str
    prefixes: tuple[str, ...]

    def can_read(self, run: str) -> bool:
        return any(run.startswith(p) for p in self.prefixes)

    @property
    def every_run(self) -> bool:
        """Whether it covers every run ("*" silences, unfiltered /metrics)."""
        return "" in self.prefixes

    def scope(self) -> str:
        """Its prefixes as a refusal shows them."""
        return ", ".join(repr(p) for p in self.prefixes)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class Tokens:
    """The accepted tokens, by the SHA-256 of each."""

    def __init__(self, by_digest: Mapping[bytes, Principal]):
        self._by_digest = dict(by_digest)

    def lookup(self, token: str) -> Principal | None:
        return self._by_digest.get(digest(token))

    @classmethod
    def parse(cls, data: Any, source: str) -> "Tokens":
        """Build from a parsed tokens file; AuthConfigError names the entry and field at fault."""
        if not isinstance(data, Mapping) or set(data) - {"token"}:
            raise AuthConfigError(f"{source}: expected [[token]] tables only")
        entries = data.get("token", [])
        if not isinstance(entries, list):
            raise AuthConfigError(f"{source}: expected [[token]] tables only")
        if not entries:
            raise AuthConfigError(f"{source}: no [[token]] entries; give at least one (see SECURITY.md)")
        if len(entries) > MAX_TOKENS:
            raise AuthConfigError(f"{source}: {len(entries)} tokens, at most {MAX_TOKENS}")
        by_digest: dict[bytes, Principal] = {}
        names: dict[str, int] = {}
        for i, e in enumerate(entries):
            where = f"{source}: token[{i}]"
            if not isinstance(e, Mapping):
                raise AuthConfigError(f"{where}: expected a table")
            unknown = set(e) - {"name", "token", "sha256", "role", "runs"}
            if unknown:
                raise AuthConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                                      "known: name, token, sha256, role, runs")
            name = e.get("name")
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise AuthConfigError(f"{where}.name: 1-64 letters, digits and . _ @ + : / - (starting with a "
                                      "letter or digit)")
            if name in names:
                raise AuthConfigError(f"{where}.name: {name!r} is also the name of token[{names[name]}]")
            names[name] = i
            if ("token" in e) == ("sha256" in e):
                raise AuthConfigError(f"{where} ({name}): give either token or sha256")
            if "token" in e:
                tok = e["token"]
                if not isinstance(tok, str) or len(tok) < MIN_TOKEN_CHARS or not tok.isprintable() or \
                        tok != tok.strip():
                    raise AuthConfigError(f"{where}.token ({name}): must be at least {MIN_TOKEN_CHARS} printable "
                                          "characters without surrounding spaces (e.g. `openssl rand -hex 32`)")
                d = digest(tok)
            else:
                h = e["sha256"]
                if not isinstance(h, str) or not _HEX64.fullmatch(h.lower()):
                    raise AuthConfigError(f"{where}.sha256 ({name}): must be 64 hex digits, the SHA-256 of the "
                                          "token (`printf %s TOKEN | sha256sum`)")
                d = bytes.fromhex(h)
            role = e.get("role")
            if role not in ROLES:
                raise AuthConfigError(f"{where}.role ({name}): must be \"read\" or \"write\", got {role!r}")
            runs = e.get("runs")
            if not isinstance(runs, list) or not runs or not all(isinstance(p, str) and len(p) <= 128 for p in runs):
                raise AuthConfigError(f"{where}.runs ({name}): a non-empty list of run-id prefixes (each up to "
                                      "128 characters; \"\" covers every run)")
            if d in by_digest:
                raise AuthConfigError(f"{where} ({name}): the same token as {by_digest[d].name}")
            by_digest[d] = Principal(name, role, tuple(dict.fromkeys(runs)))
        return cls(by_digest)

    @classmethod
    def load(cls, path: str | None, environ: Mapping[str, str] | None = None) -> "Tokens | None":
        """The tokens of `path`, else of $TRAINGUARD_AUTH_TOKENS, else None (no authentication)."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        env = os.environ if environ is None else environ
        if path:
            source = f"auth_tokens_file {path}"
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as e:
                raise AuthConfigError(f"auth_tokens_file: cannot read {path}: {e.strerror}") from None
        elif env.get(TOKENS_ENV):
            source, raw = f"${TOKENS_ENV}", env[TOKENS_ENV].encode("utf-8", "replace")
        else:
            return None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise AuthConfigError(f"{source}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as e:
            # The decoder's message gives a line and column, never the text there.
            raise AuthConfigError(f"{source}: not valid TOML ({e})") from None
        return cls.parse(data, source)


class Refused(Exception):
    """A request this principal (or no one) may not make: answered 401/UNAUTHENTICATED or 403/PERMISSION_DENIED."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def unauthenticated(self) -> bool:
        return self.reason in ("missing_token", "unknown_token", "malformed")


class Auth:
    """Checks each request's bearer token and counts every refusal, by listener and reason."""

    def __init__(self, tokens: Tokens | None, metrics_open: bool = True, healthz_open: bool = True):
        self.tokens = tokens
        self.metrics_open = metrics_open
        self.healthz_open = healthz_open
        self._lock = threading.Lock()
        self.refused: collections.Counter[tuple[str, str]] = collections.Counter()

    @property
    def enabled(self) -> bool:
        return self.tokens is not None

    def count(self, listener: str, reason: str) -> None:
        with self._lock:
            self.refused[(listener, reason)] += 1

    def refusals(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.refused)

    def authenticate(self, header: str | None, listener: str) -> Principal | None:
        """The principal of an `authorization` header value; None when authentication is off.

        Raises Refused (counted) when the header is missing, malformed or names no known token.
        """
        if self.tokens is None:
            return None
        if not header:
            raise self._refuse(listener, "missing_token", "no bearer token: send `authorization: Bearer TOKEN` "
                                                          "(the client reads TRAINGUARD_TOKEN)")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise self._refuse(listener, "malformed", "authorization: expected `Bearer TOKEN`")
        p = self.tokens.lookup(token)
        if p is None:
            raise self._refuse(listener, "unknown_token", "the bearer token is not one this daemon accepts")
        return p

    def require(self, principal: Principal | None, run: str, write: bool, listener: str) -> None:
        """Raise Refused (counted) unless `principal` may read (or write) `run`; None means auth is off."""
        if principal is None:
            return
        if write and principal.role != "write":
            raise self._refuse(listener, "read_only", f"token {principal.name!r} may only read; writing needs a "
                                                      "token with role \"write\"")
        ok = principal.every_run if run == "*" else principal.can_read(run)
        if not ok:
            what = "every run ('*')" if run == "*" else f"run {run!r}"
            raise self._refuse(listener, "run_scope", f"token {principal.name!r} covers runs starting with "
                                                      f"{principal.scope()}, not {what}")

    def _refuse(self, listener: str, reason: str, message: str) -> Refused:
        self.count(listener, reason)
        return Refused(reason, message)


def readable(principal: Principal | None) -> Callable[[str], bool]:
    """A test of run ids: those `principal` may read (every run when auth is off)."""
    if principal is None or principal.every_run:
        return lambda run: True
    return principal.can_read


# -- TLS -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """The PEM contents of the daemon's certificate, key and (for mutual TLS) client CA, read once at start."""

    cert_file: str
    key_file: str
    client_ca_file: str | None
    cert: bytes
    key: bytes
    client_ca: bytes | None

    @classmethod
    def load(cls, cert_file: str | None, key_file: str | None, client_ca_file: str | None) -> "TlsFiles | None":
        """Read and check the files (None when TLS is off); AuthConfigError names the setting at fault."""
        if not cert_file and not key_file:
            if client_ca_file:
                raise AuthConfigError("tls_client_ca_file: mutual TLS needs the daemon's own tls_cert_file and "
                                      "tls_key_file too")
            return None
        if not cert_file or not key_file:
            missing = "tls_cert_file" if not cert_file else "tls_key_file"
            raise AuthConfigError(f"{missing}: TLS needs both tls_cert_file and tls_key_file")
        parts = {}
        for setting, path in (("tls_cert_file", cert_file), ("tls_key_file", key_file),
                              ("tls_client_ca_file", client_ca_file)):
            if path:
                try:
                    with open(path, "rb") as f:
                        parts[setting] = f.read()
                except OSError as e:
                    raise AuthConfigError(f"{setting}: cannot read {path}: {e.strerror}") from None
        files = cls(cert_file, key_file, client_ca_file or None, parts["tls_cert_file"], parts["tls_key_file"],
                    parts.get("tls_client_ca_file"))
        files.ssl_context()  # the same checks as the listeners will make, with errors that name the file
        return files

    def ssl_context(self) -> ssl.SSLContext:
        """The HTTP listener's context: TLS 1.2 or later, client certificates required with a client CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as e:
            raise AuthConfigError(f"tls_cert_file, tls_key_file: {self.cert_file} and {self.key_file} are not a "
                                  f"PEM certificate and its private key ({e.reason or e})") from None
        except OSError as e:
            raise AuthConfigError(f"tls_cert_file: cannot read {self.cert_file}: {e.strerror}") from None
        if self.client_ca_file:
            try:
                ctx.load_verify_locations(cafile=self.client_ca_file)
            except (ssl.SSLError, OSError) as e:
                raise AuthConfigError(f"tls_client_ca_file: {self.client_ca_file} holds no PEM CA certificate "
                                      f"({getattr(e, 'reason', None) or e})") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def grpc_credentials(self) -> Any:
        import grpc

        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


# -- where it listens ------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether `host` reaches this machine only ("" and 0.0.0.0 listen everywhere: not loopback)."""
    h = host.strip().strip("[]")
    if not h:
        return False
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        pass
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(h, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def exposure(host: str, authenticated: bool) -> str | None:
    """What is wrong with listening on `host` (None if nothing): others can reach it and no one is
    authenticated. The daemon refuses it unless told --insecure, and then warns."""
    if authenticated or is_loopback(host):
        return None
    return (f"host: {host or '(every interface)'} can be reached from other machines, and no client is "
            "authenticated (set auth_tokens_file or $TRAINGUARD_AUTH_TOKENS, or tls_client_ca_file for mutual "
            "TLS): anyone on the network could write into and read every run. Configure authentication, or "
            "pass --insecure (insecure = true) to listen without it")

