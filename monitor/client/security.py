"""How a client proves itself to the daemon: a bearer token, and TLS with the CA to trust (and a client
certificate for mutual TLS). Read from arguments, else from the environment:

    TRAINGUARD_TOKEN        the bearer token (or TRAINGUARD_TOKEN_FILE: a file holding it)
    TRAINGUARD_TLS_CA       PEM file of the CA that signed the daemon's certificate (turns TLS on)
    TRAINGUARD_TLS_CERT     PEM client certificate, for mutual TLS (with TRAINGUARD_TLS_KEY)
    TRAINGUARD_TLS_KEY      its private key
    TRAINGUARD_TLS=1        TLS with the system's trusted CAs

The token is sent as `authorization: Bearer ...` on every call and never written to a log.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Any, Mapping

_ON = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ClientSecurity:
    """A token and TLS settings (the token is left out of repr, so the object is safe to log)."""

    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls: bool = False

    @classmethod
    def resolve(cls, token: str | None = None, token_file: str | None = None, ca_file: str | None = None,
                cert_file: str | None = None, key_file: str | None = None, tls: bool | None = None,
                environ: Mapping[str, str] | None = None) -> "ClientSecurity":
        """Arguments first, then the environment; ValueError names the setting that cannot be used."""
        env = os.environ if environ is None else environ
        token = token if token is not None else (env.get("TRAINGUARD_TOKEN") or None)
        token_file = token_file or env.get("TRAINGUARD_TOKEN_FILE") or None
        if token is None and token_file:
            try:
                with open(token_file, encoding="utf-8") as f:
                    token = f.read().strip() or None
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"TRAINGUARD_TOKEN_FILE: cannot read {token_file}: "
                                 f"{getattr(e, 'strerror', None) or e}") from None
            if token is None:
                raise ValueError(f"TRAINGUARD_TOKEN_FILE: {token_file} is empty")
        if token is not None:
            token = token.strip()
            if not token or not token.isprintable() or " " in token:
                raise ValueError("TRAINGUARD_TOKEN: a token is printable text without spaces")
        ca_file = ca_file or env.get("TRAINGUARD_TLS_CA") or None
        cert_file = cert_file or env.get("TRAINGUARD_TLS_CERT") or None
        key_file = key_file or env.get("TRAINGUARD_TLS_KEY") or None
        if bool(cert_file) != bool(key_file):
            raise ValueError("TRAINGUARD_TLS_CERT, TRAINGUARD_TLS_KEY: a client certificate needs its key, and "
                             "the key its certificate")
        if tls is None:
            tls = env.get("TRAINGUARD_TLS", "").strip().lower() in _ON
        tls = bool(tls or ca_file or cert_file)
        for name, path in (("TRAINGUARD_TLS_CA", ca_file), ("TRAINGUARD_TLS_CERT", cert_file),
                           ("TRAINGUARD_TLS_KEY", key_file)):
            if path and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file: {path}")
        return cls(token, ca_file, cert_file, key_file, tls)

    # -- gRPC ----------------------------------------------------------------------------------------

    def grpc_credentials(self) -> Any:
        """Channel credentials for TLS, or None for a plaintext channel."""
        if not self.tls:
            return None
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca_file),
                                            private_key=_read(self.key_file),
                                            certificate_chain=_read(self.cert_file))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, address: str, options: list[tuple[str, Any]]) -> Any:
        """A channel to `address` that carries the token on every call."""
        import grpc

        creds = self.grpc_credentials()
        if self.token and creds is None and not _local(address):
            _warn_once(f"trainguard: sending a bearer token to {address} without TLS; set TRAINGUARD_TLS_CA (or "
                       "TRAINGUARD_TLS=1) so it does not cross the network in the clear")
        ch = grpc.secure_channel(address, creds, options=options) if creds is not None else \
            grpc.insecure_channel(address, options=options)
        if self.token:
            ch = grpc.intercept_channel(ch, _interceptor_class()(self.metadata()))
        return ch

    # -- HTTP ----------------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext | None:
        """For https:// URLs: trusts ca_file (else the system's CAs) and presents the client certificate."""
        if not self.tls:  # resolve() turns TLS on with a CA or a client certificate
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logging.getLogger("trainguard.client").warning("%s", msg)


def _local(address: str) -> bool:
    """Whether a host:port (or [v6]:port) names this machine."""
    host = address.rsplit(":", 1)[0].strip("[]").lower() if ":" in address else address.lower()
    return host in ("localhost", "::1") or host.startswith("127.") or host.startswith("unix")


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def _interceptor_class() -> Any:
    """The interceptor that adds the token (a class made on first use: grpc is imported only when sending)."""
    import grpc

    class Details(grpc.ClientCallDetails):
        def __init__(self, d: Any, metadata: list[tuple[str, str]]):
            self.method = d.method
            self.timeout = d.timeout
            self.metadata = metadata
            self.credentials = d.credentials
            self.wait_for_ready = getattr(d, "wait_for_ready", None)
            self.compression = getattr(d, "compression", None)

    class TokenInterceptor(grpc.UnaryUnaryClientInterceptor):
        def __init__(self, metadata: tuple[tuple[str, str], ...]):
            self._metadata = metadata

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(Details(details, list(details.metadata or ()) + list(self._metadata)), request)

    return TokenInterceptor
