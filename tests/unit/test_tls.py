"""TLS options from an `amqps://` URL and the environment, the context they make, and the one
line a failed handshake becomes (rabbitq/_tls.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from rabbitq._management import Management, ManagementUnavailable
from rabbitq._tls import (
    TlsProblem,
    TlsSettings,
    describe_failure,
    describe_verify_failure,
    tls_context,
    tls_settings,
)

ENV = {
    "RABBITQ_TLS_CACERTFILE": "/env/ca.pem",
    "RABBITQ_TLS_CERTFILE": "/env/client.pem",
    "RABBITQ_TLS_KEYFILE": "/env/client.key",
}
HOST = "amqps://u:p@mq.example:5671/vh"


@pytest.mark.parametrize(
    ("url", "env", "stripped", "settings"),
    [
        pytest.param("amqp://u:p@h/", ENV, "amqp://u:p@h/", None, id="amqp-ignores-env"),
        pytest.param(
            "amqp://u:p@h/?heartbeat=5", {}, "amqp://u:p@h/?heartbeat=5", None, id="amqp-query"
        ),
        pytest.param(HOST, {}, HOST, TlsSettings(), id="defaults-verify-system-cas"),
        pytest.param(
            HOST + "?cacertfile=/q/ca.pem&heartbeat=5",
            {},
            HOST + "?heartbeat=5",
            TlsSettings(cacertfile="/q/ca.pem"),
            id="ours-stripped-others-kept",
        ),
        pytest.param(
            HOST,
            ENV,
            HOST,
            TlsSettings("/env/ca.pem", "/env/client.pem", "/env/client.key"),
            id="env",
        ),
        pytest.param(
            HOST + "?cacertfile=/q/ca.pem&certfile=/q/c.pem",
            ENV,
            HOST,
            TlsSettings("/q/ca.pem", "/q/c.pem", "/env/client.key"),
            id="url-wins-per-file",
        ),
        pytest.param(
            HOST + "?certfile=/q/c.pem",
            {},
            HOST,
            TlsSettings(certfile="/q/c.pem"),
            id="key-inside-the-cert-file",
        ),
        pytest.param(
            HOST + "?verify=verify_none",
            {},
            HOST,
            TlsSettings(verify=False),
            id="verify-none",
        ),
        pytest.param(
            HOST + "?verify=verify_peer&server_name_indication=mq.internal",
            {},
            HOST,
            TlsSettings(server_name="mq.internal"),
            id="sni",
        ),
    ],
)
def test_tls_settings_come_from_the_url_then_the_environment(url, env, stripped, settings):
    """RabbitMQ's query names are read and taken out; the URL wins over RABBITQ_TLS_*."""
    assert tls_settings(url, env) == (stripped, settings)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (HOST + "?cafile=/ca.pem", "?cafile= is not read by rabbitq; use RabbitMQ's ?cacertfile"),
        (HOST + "?no_verify_ssl=1", "use RabbitMQ's ?verify=verify_none"),
        ("amqp://h/?cacertfile=/ca.pem", "?cacertfile= is a TLS option but the URL is amqp://"),
        (HOST + "?verify=yes", "?verify='yes' must be verify_peer or verify_none"),
        (HOST + "?server_name_indication=disable", "server_name_indication=disable is not"),
        (HOST + "?keyfile=/k.pem", "a keyfile without a certfile"),
    ],
)
def test_a_wrong_tls_option_is_refused_by_name(url, says):
    """aiormq's names, TLS options on amqp://, bad values: one line naming the option."""
    with pytest.raises(TlsProblem) as problem:
        tls_settings(url, {})
    assert says in str(problem.value)


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (20, "not signed by a trusted CA (m); give the CA with ?cacertfile=PATH"),
        (19, "not signed by a trusted CA"),  # a self-signed CA in the chain
        (18, "not signed by a trusted CA"),  # the certificate is self-signed
        (21, "not signed by a trusted CA"),
        (62, "does not name 'mq.example' (hostname mismatch)"),
        (64, "does not name 'mq.example' (hostname mismatch)"),  # an IP address
        (10, "the broker's certificate has expired"),
        (9, "is not valid yet; check the clocks"),
        (23, "has been revoked"),
        (7, "failed verification (m)"),  # anything else: OpenSSL's words
    ],
)
def test_a_verify_code_becomes_what_to_do(code, says):
    """OpenSSL's X509_V_ERR codes grouped into what the reader can act on."""
    assert says in describe_verify_failure(code, "m", "mq.example")


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code, error.verify_message = code, message
    return error


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    error.reason = reason
    return error


def _wrapped(inner: BaseException) -> BaseException:
    """As aiormq raises it: its own error, from the ssl one."""
    try:
        raise ConnectionError(*inner.args) from inner
    except ConnectionError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "client_cert", "says"),
    [
        (_wrapped(_verify_error(20, "unable to get local issuer certificate")), True, "trusted CA"),
        (_wrapped(_verify_error(62, "Hostname mismatch")), True, "does not name 'h'"),
        (_verify_error(10, "certificate has expired"), True, "has expired"),
        (
            _wrapped(_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED")),
            False,
            "the broker requires a client certificate (tlsv13_alert_certificate_required)",
        ),
        (_ssl_error("TLSV1_ALERT_UNKNOWN_CA"), True, "does not trust the client certificate's CA"),
        (_ssl_error("SSLV3_ALERT_BAD_CERTIFICATE"), True, "refused the client certificate"),
        (_ssl_error("WRONG_VERSION_NUMBER"), True, "the port does not speak TLS"),
        (_ssl_error("SOMETHING_ELSE"), True, "TLS handshake failed (something_else)"),
        (
            _wrapped(ConnectionResetError(104, "Connection reset by peer")),
            False,
            "it may require a client certificate",
        ),
        (
            _wrapped(ConnectionResetError(104, "Connection reset by peer")),
            True,
            "it may have refused the client certificate",
        ),
        (ConnectionRefusedError(111, "Connection refused"), False, None),
    ],
)
def test_a_failed_handshake_is_found_in_the_chain_and_described(exc, client_cert, says):
    """The ssl error under aiormq's, mapped to one line; None when it was not TLS."""
    found = describe_failure(exc, "h", client_cert)
    if says is None:
        assert found is None
    else:
        assert found is not None and says in found and "\n" not in found


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    leaf, other_leaf = ca.issue_cert("client"), other.issue_cert("client")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    leaf.private_key_pem.write_to_path(str(d / "client.key"))
    other_leaf.private_key_pem.write_to_path(str(d / "other.key"))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret-passphrase"),
    )
    (d / "encrypted.key").write_bytes(encrypted)
    (d / "not-pem.txt").write_text("hello\n")
    return {p.name: str(p) for p in Path(d).iterdir()}


def test_the_context_verifies_the_broker_and_its_name_by_default(files):
    """CERT_REQUIRED and check_hostname, the CA from the file, the client certificate loaded."""
    settings = TlsSettings(files["ca.pem"], files["client.pem"], files["client.key"])
    context = tls_context(settings)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1
    off = tls_context(TlsSettings(verify=False))
    assert off.verify_mode == ssl.CERT_NONE and not off.check_hostname


def test_the_context_sends_and_checks_the_server_name_the_url_gives():
    """server_name_indication replaces the host asyncio and urllib pass."""
    context = tls_context(TlsSettings(server_name="mq.internal"))
    bio = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="10.0.0.5")
    assert bio.server_hostname == "mq.internal"
    plain = tls_context(TlsSettings())
    assert (
        plain.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="h").server_hostname == "h"
    )


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (
            {"cacertfile": "/nonexistent/ca.pem"},
            "cannot read cacertfile '/nonexistent/ca.pem': No such file or directory",
        ),
        ({"cacertfile": "not-pem.txt"}, "the cacertfile '{bad}' holds no PEM"),
        (
            {"certfile": "client.pem", "keyfile": "/nonexistent/k.key"},
            "cannot read keyfile '/nonexistent/k.key'",
        ),
        ({"certfile": "client.pem", "keyfile": "other.key"}, "does not belong to the certfile"),
        (
            {"certfile": "client.pem", "keyfile": "encrypted.key"},
            "is encrypted; give an unencrypted",
        ),
        ({"certfile": "not-pem.txt", "keyfile": "client.key"}, "'{bad}'"),
    ],
)
def test_a_file_that_cannot_be_used_is_named_without_its_contents(files, settings, says):
    """Missing, not PEM, a key of another certificate, an encrypted key: one line each."""
    resolved = {k: files.get(v, v) for k, v in settings.items()}
    with pytest.raises(TlsProblem) as problem:
        tls_context(TlsSettings(**resolved))
    text = str(problem.value)
    assert says.format(bad=files["not-pem.txt"]) in text
    assert "\n" not in text and "secret-passphrase" not in text and "PRIVATE" not in text


def test_the_management_api_beside_an_amqps_url_is_https_with_its_tls_settings():
    """15671 over https, verified with the URL's files; an explicit API URL drops the SNI."""
    url = "amqps://u:p@10.0.0.5/?cacertfile=/ca.pem&server_name_indication=mq.internal"
    api = Management.from_urls(url)
    assert api.base == "https://10.0.0.5:15671"
    assert api.tls == TlsSettings(cacertfile="/ca.pem", server_name="mq.internal")
    other = Management.from_urls(url, "https://mgmt.example:443")
    assert other.tls == TlsSettings(cacertfile="/ca.pem")
    assert Management.from_urls("amqp://u:p@h/").tls is None


def test_a_bad_tls_option_is_said_when_the_api_is_read_not_when_it_is_located():
    """The AMQP connection reports it first (exit 1, as every connect failure); the API too."""
    api = Management.from_urls("amqps://u:p@h/?cafile=/ca.pem")
    with pytest.raises(ManagementUnavailable, match=r"\?cafile= is not read by rabbitq"):
        api._fetch("/api/overview")
