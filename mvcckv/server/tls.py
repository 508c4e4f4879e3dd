"""TLS for the client listeners, as etcd's ``--cert-file``, ``--key-file``,
``--trusted-ca-file``, ``--client-cert-auth`` and ``--auto-tls`` give it.

Every file is read and checked once, at startup, before the store is
opened: a missing or unreadable file, a file without a certificate or key,
or a key that does not belong to the certificate stops the server with a
:class:`TLSError` naming the flag, the path and the problem.  (gRPC itself
would accept such files and then fail every handshake.)

Client certificates are required and verified against ``--trusted-ca-file``
when ``--client-cert-auth`` is on or a trusted CA file is given (etcd does
the same); :func:`common_name` reads the verified certificate's
Common Name, which etcd's auth takes as the user name when a request
carries no token.  gRPC's TLS accepts TLS 1.2 and 1.3 only, etcd's minimum.

With ``--auto-tls`` and no certificate given, a self-signed certificate for
the listen hosts is made in ``<data-dir>/fixtures/client`` (``cert.pem``,
``key.pem`` readable by the owner only) and reused by later starts while it
is still valid and still names every listen host.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mvcckv.server.config import Config

log = logging.getLogger("mvcckv.server")

AUTO_TLS_DIR = os.path.join("fixtures", "client")
AUTO_CERT_VALIDITY = datetime.timedelta(days=365)
# Clients whose clock runs a little behind still accept a certificate that
# was just made.
_BACKDATE = datetime.timedelta(minutes=5)

GATEWAY_METADATA_KEY = "grpcgateway-accept"


class TLSError(Exception):
    """A TLS setting or file the server cannot start with (a startup error:
    it never reaches a client)."""


@dataclass(frozen=True)
class ServerTLS:
    """What the https listeners serve with, checked and loaded."""

    certificate_chain: bytes
    private_key: bytes
    trusted_ca: bytes | None
    require_client_cert: bool

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.trusted_ca,
            require_client_auth=self.require_client_cert,
        )


def server_tls(config: Config) -> ServerTLS | None:
    """The TLS of the https listeners, or None when every listener is http.

    Blocking (file I/O, and key generation for ``--auto-tls``); raises
    :class:`TLSError`.  The flag combinations were already checked by
    :meth:`Config.from_args`.
    """
    if config.client_cert_auth:
        for listener in config.all_listeners:
            if not listener.secure:
                log.warning("--client-cert-auth does not apply to the http:// listener %s", listener.url)
    if not any(listener.secure for listener in config.all_listeners):
        if config.cert_file or config.key_file or config.auto_tls:
            log.warning("every listen URL is http://: the TLS flags are not used")
        return None
    cert_file, key_file = config.cert_file, config.key_file
    if not (cert_file and key_file):
        # Config allows https:// without files only with --auto-tls.
        hosts = [listener.host for listener in config.all_listeners]
        cert_file, key_file = self_cert(os.path.join(config.data_dir, AUTO_TLS_DIR), hosts)
    elif config.auto_tls:
        log.warning("--auto-tls is ignored: --cert-file and --key-file are given")
    chain, key = load_key_pair(cert_file, key_file)
    trusted = load_trusted_ca(config.trusted_ca_file) if config.trusted_ca_file else None
    require = config.client_cert_auth or trusted is not None
    log.info("client TLS: certificate %s; client certificates %s", cert_file,
             f"required, signed by {config.trusted_ca_file}" if require else "not asked for")
    return ServerTLS(certificate_chain=chain, private_key=key, trusted_ca=trusted, require_client_cert=require)


# --- loading and checking ---------------------------------------------------------


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise TLSError(f"{flag} {path}: {err.strerror or err}") from None


def _certificates(flag: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSError(f"{flag} {path}: no PEM certificate in the file, or one that cannot be parsed") from None
    return certs


def load_key_pair(cert_file: str, key_file: str) -> tuple[bytes, bytes]:
    """The PEM certificate chain and private key, checked to belong together."""
    chain = _read("--cert-file", cert_file)
    key_pem = _read("--key-file", key_file)
    leaf = _certificates("--cert-file", cert_file, chain)[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TLSError(f"--key-file {key_file}: the private key is encrypted; "
                       "the server needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSError(f"--key-file {key_file}: no PEM private key in the file, "
                       "or one that cannot be parsed") from None
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise TLSError(f"--key-file {key_file} does not match the certificate in --cert-file {cert_file} "
                       "(private key does not match public key)")
    now = datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc <= now:
        # Served anyway, as etcd does; clients that verify will refuse it.
        log.warning("the certificate in --cert-file %s expired on %s", cert_file, leaf.not_valid_after_utc)
    return chain, key_pem


def load_trusted_ca(path: str) -> bytes:
    data = _read("--trusted-ca-file", path)
    _certificates("--trusted-ca-file", path, data)
    return data


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- auto-tls ---------------------------------------------------------------------


def self_cert(dirpath: str, hosts: Iterable[str]) -> tuple[str, str]:
    """Paths of a self-signed certificate and its key for ``hosts``: the
    ones in ``dirpath`` if they are still good, else new ones.

    IP hosts become IP subject alternative names, others DNS names.  The
    key is ECDSA P-256.  Files are written to temporary names and renamed,
    so a crash never leaves half a key behind.
    """
    hosts = sorted(set(hosts))
    cert_path = os.path.abspath(os.path.join(dirpath, "cert.pem"))
    key_path = os.path.abspath(os.path.join(dirpath, "key.pem"))
    if _reusable(cert_path, key_path, hosts):
        log.info("auto-tls: using the self-signed certificate %s", cert_path)
        return cert_path, key_path
    try:
        os.makedirs(dirpath, mode=0o700, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert_pem = _self_signed(key, hosts)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        _write_atomically(key_path, key_pem, mode=0o600)
        _write_atomically(cert_path, cert_pem, mode=0o644)
    except OSError as err:
        raise TLSError(f"--auto-tls: cannot write the certificate to {dirpath}: {err.strerror or err}") from None
    log.warning("auto-tls: made a self-signed certificate for %s, valid until %s: %s",
                ", ".join(hosts), (datetime.datetime.now(datetime.timezone.utc) + AUTO_CERT_VALIDITY).date(),
                cert_path)
    return cert_path, key_path


def _self_signed(key: ec.EllipticCurvePrivateKey, hosts: list[str]) -> bytes:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mvcckv")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + AUTO_CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        # Its own CA, so that a client can trust it directly by passing it
        # as the root (--cacert) instead of skipping verification.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _reusable(cert_path: str, key_path: str, hosts: list[str]) -> bool:
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return False
    if _spki(key.public_key()) != _spki(cert.public_key()):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    named = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    named |= set(san.get_values_for_type(x509.DNSName))
    return all(_canonical(host) in named for host in hosts)


def _canonical(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --- the client's certificate -----------------------------------------------------


def common_name(context: grpc.aio.ServicerContext) -> str | None:
    """The Common Name of the client's verified TLS certificate, or None.

    None on plaintext connections and TLS ones without a client certificate
    (the server only asks for one when it verifies it).  A certificate
    without a Common Name gives ``""``.  As in etcd, requests that came
    through a gRPC gateway (``grpcgateway-accept`` metadata) get None: the
    gateway connects with its own certificate, which must not stand for the
    user behind it.
    """
    auth = context.auth_context()
    if not auth.get("x509_pem_cert"):
        return None
    for key, _ in context.invocation_metadata() or ():
        if key == GATEWAY_METADATA_KEY:
            return None
    names = auth.get("x509_common_name")
    if not names:
        return ""
    name = names[0]
    return name.decode("utf-8", errors="replace") if isinstance(name, bytes) else name
