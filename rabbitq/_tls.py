"""TLS for `amqps://` URLs: which files and checks a URL asks for, the `ssl.SSLContext` that
makes them, and one line saying why a handshake failed.

The URL's query takes RabbitMQ's own names (rabbitmq.com/docs/uri-query-parameters, the names
the Erlang client, Shovel and Federation read): `cacertfile`, `certfile`, `keyfile`,
`verify=verify_peer|verify_none`, `server_name_indication`. The environment can give the three
files (`RABBITQ_TLS_CACERTFILE`, `RABBITQ_TLS_CERTFILE`, `RABBITQ_TLS_KEYFILE`); the URL wins.
aiormq reads other names from the query (`cafile`, `no_verify_ssl`, ...) and would be handed
ours: they are taken out of the URL before it reaches aio-pika, and aiormq's own are refused,
so no option is read one way here and another way there.

`tls_settings` and `describe_failure` are pure (the environment is handed in); `tls_context`
reads the files. No message here carries a file's contents or the URL's password.
"""

from __future__ import annotations

import socket
import ssl
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

ENV_CACERTFILE = "RABBITQ_TLS_CACERTFILE"
ENV_CERTFILE = "RABBITQ_TLS_CERTFILE"
ENV_KEYFILE = "RABBITQ_TLS_KEYFILE"
OURS = ("cacertfile", "certfile", "keyfile", "verify", "server_name_indication")
# what aiormq would read (and we would not): refused, with the name to use instead
AIORMQ_NAMES = {
    "cafile": "cacertfile",
    "capath": "cacertfile",
    "cadata": "cacertfile",
    "no_verify_ssl": "verify=verify_none",
}
FILE_HINT = "give the CA with ?cacertfile=PATH or RABBITQ_TLS_CACERTFILE"
CLIENT_CERT_HINT = (
    "give a certificate the broker's CA signed with ?certfile=PATH&keyfile=PATH or "
    "RABBITQ_TLS_CERTFILE and RABBITQ_TLS_KEYFILE"
)


class TlsProblem(Exception):
    """A TLS option is wrong or a file cannot be used; `str()` is one line without secrets."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """What an `amqps://` connection verifies and presents.

    `server_name` is the name the broker's certificate must carry (and the SNI sent); None is
    the URL's host.
    """

    cacertfile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    server_name: str | None = None


def tls_settings(url: str, env: Mapping[str, str]) -> tuple[str, TlsSettings | None]:
    """The URL without rabbitq's TLS query names, and its TLS settings (None for `amqp://`).

    Raises:
        TlsProblem: an option is unknown, has a bad value, or asks for TLS on `amqp://`.
    """
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in pairs if k in OURS}
    rest = [(k, v) for k, v in pairs if k not in OURS]
    for key, _ in rest:
        if key in AIORMQ_NAMES:
            raise TlsProblem(
                f"the URL's ?{key}= is not read by rabbitq; use RabbitMQ's "
                f"?{AIORMQ_NAMES[key]} (rabbitmq.com/docs/uri-query-parameters)"
            )
    stripped = urlunsplit(parts._replace(query=urlencode(rest, safe="/:,")))
    if parts.scheme != "amqps":
        if ours:
            raise TlsProblem(
                f"the URL's ?{next(iter(ours))}= is a TLS option but the URL is "
                f"{parts.scheme}://; use amqps://"
            )
        return url, None
    verify = ours.get("verify", "verify_peer")
    if verify not in ("verify_peer", "verify_none"):
        raise TlsProblem(f"the URL's ?verify={verify!r} must be verify_peer or verify_none")
    server_name = ours.get("server_name_indication") or None
    if server_name == "disable":
        # Python sends as SNI the very name it checks the certificate against
        raise TlsProblem(
            "?server_name_indication=disable is not supported; give the name the broker's "
            "certificate carries, or leave it out to use the URL's host"
        )
    settings = TlsSettings(
        cacertfile=ours.get("cacertfile") or env.get(ENV_CACERTFILE) or None,
        certfile=ours.get("certfile") or env.get(ENV_CERTFILE) or None,
        keyfile=ours.get("keyfile") or env.get(ENV_KEYFILE) or None,
        verify=verify == "verify_peer",
        server_name=server_name,
    )
    if settings.keyfile and not settings.certfile:
        raise TlsProblem("a keyfile without a certfile; give the client certificate too")
    return stripped, settings


class _Context(ssl.SSLContext):
    """A client context that checks (and sends as SNI) `server_name` instead of the host
    connected to: aio-pika hands asyncio the URL's host and takes no `server_hostname`, and
    urllib does the same."""

    server_name: str | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        name = self.server_name or server_hostname
        return super().wrap_bio(incoming, outgoing, server_side, name, session)

    def wrap_socket(  # what urllib uses, for the management API
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        name = self.server_name or server_hostname
        return super().wrap_socket(
            sock, server_side, do_handshake_on_connect, suppress_ragged_eofs, name, session
        )


def tls_context(settings: TlsSettings) -> ssl.SSLContext:
    """The client context for `settings`: certificates verified against `cacertfile` (else the
    system's CAs), the host name checked, the client certificate loaded if given.

    Raises:
        TlsProblem: a file is missing, unreadable or not what it should be.
    """
    context = _Context(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    context.server_name = settings.server_name
    if sys.version_info >= (3, 13):  # as ssl.create_default_context (and so aiormq) does there
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.cacertfile:
        _load("cacertfile", settings.cacertfile, context.load_verify_locations)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.certfile:
        certfile, keyfile = settings.certfile, settings.keyfile
        _load("certfile", certfile, lambda path: _load_chain(context, path, keyfile))
    return context


def _load_chain(context: ssl.SSLContext, certfile: str, keyfile: str | None) -> None:
    def no_passphrase() -> str:
        # without a callback OpenSSL would prompt on the terminal, and a consumer would hang
        raise TlsProblem(
            f"the keyfile {keyfile or certfile!r} is encrypted; give an unencrypted key "
            "(rabbitq reads no passphrase)"
        )

    if keyfile:
        try:
            open(keyfile, "rb").close()
        except OSError as exc:
            raise TlsProblem(f"cannot read keyfile {keyfile!r}: {exc.strerror}") from None
    context.load_cert_chain(certfile, keyfile, password=no_passphrase)


def _load(what: str, path: str, load: Callable[[str], object]) -> None:
    try:
        load(path)
    except TlsProblem:
        raise
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            raise TlsProblem(f"the keyfile does not belong to the certfile {path!r}") from None
        if reason in ("NO_CERTIFICATE_OR_CRL_FOUND", "NO_START_LINE"):
            raise TlsProblem(f"the {what} {path!r} holds no PEM certificate or key") from None
        raise TlsProblem(f"cannot load the {what} {path!r} ({reason})") from None
    except OSError as exc:
        raise TlsProblem(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None


# OpenSSL's X509_V_ERR_* codes (x509_vfy.h), grouped by what the reader should do
_UNTRUSTED = {2, 18, 19, 20, 21, 27}
_EXPIRED, _NOT_YET_VALID, _REVOKED = 10, 9, 23
_NAME_MISMATCH = {62, 63, 64}
# what the broker's alert says about our client certificate
_CLIENT_REFUSED = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the broker requires a client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the broker refused the client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the broker does not trust the client certificate's CA",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the broker says the client certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the broker refused the client certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the broker refused the client certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "the broker refused the client certificate",
}


def describe_verify_failure(code: int, message: str, name: str) -> str:
    """One line for the broker's certificate failing verification (OpenSSL's code and text)
    when connecting to `name`."""
    if code in _UNTRUSTED:
        return f"the broker's certificate is not signed by a trusted CA ({message}); {FILE_HINT}"
    if code in _NAME_MISMATCH:
        return (
            f"the broker's certificate does not name {name!r} (hostname mismatch); connect by a "
            "name the certificate carries, or set ?server_name_indication=NAME"
        )
    if code == _EXPIRED:
        return "the broker's certificate has expired; the broker needs a renewed certificate"
    if code == _NOT_YET_VALID:
        return "the broker's certificate is not valid yet; check the clocks of both machines"
    if code == _REVOKED:
        return "the broker's certificate has been revoked"
    return f"the broker's certificate failed verification ({message})"


def describe_failure(exc: BaseException, name: str, client_cert: bool = True) -> str | None:
    """One line for a TLS failure anywhere in `exc`'s chain (aiormq re-raises the `ssl` error
    as its own), connecting to `name`; None when no TLS error is in it.

    A connection reset is taken as the broker refusing the client certificate, or asking for
    one when there is none (`client_cert` false): over TLS 1.3 the broker checks it after the
    client considers the handshake done, and its alert can be lost to the reset that follows.
    """
    seen: set[int] = set()
    reset = False
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            code = current.verify_code if isinstance(current.verify_code, int) else 0
            message = str(current.verify_message or "certificate verify failed")
            return describe_verify_failure(code, message, name)
        if isinstance(current, ssl.SSLError):
            return _describe_ssl_error(current)
        reset = (
            reset or isinstance(current, ConnectionResetError) or "connection reset" in str(current)
        )
        current = current.__cause__ or current.__context__
    if reset:
        maybe = "have refused the client" if client_cert else "require a client"
        return (
            f"the broker closed the connection during the TLS handshake: it may {maybe} "
            f"certificate; {CLIENT_CERT_HINT}"
        )
    return None


def _describe_ssl_error(exc: ssl.SSLError) -> str:
    reason = str(exc.reason or "") if isinstance(exc.reason, str) else ""
    if reason in _CLIENT_REFUSED:
        return f"{_CLIENT_REFUSED[reason]} ({reason.lower()}); {CLIENT_CERT_HINT}"
    if reason in ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"):
        return "the port does not speak TLS (is it the plain AMQP port, 5672?)"
    return f"TLS handshake failed ({(reason or str(exc)).lower()})"
