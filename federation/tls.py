"""Per-cluster TLS material: a cluster's own CA and the certificates it signs.

Each FederatedCluster makes a fresh CA; the scheduler, the client and every lease's worker get a
certificate from it. A worker's key is made by the agent on the provider machine, which sends
only a signing request; the cluster signs it, so no private key ever passes through the broker.
The certificate's organisational unit says its role and, for a worker, the common name is the
lease id, so the scheduler can tell who is on the other end of a connection.
Elliptic-curve keys keep signing cheap enough to issue one certificate per lease on demand.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROLE_SCHEDULER = "parallex-scheduler"
ROLE_CLIENT = "parallex-client"
ROLE_WORKER = "parallex-worker"

_VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True)
class CertKey:
    """A PEM certificate and its PEM private key."""

    cert: str
    key: str


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _name(common_name: str, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Parallex"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class ClusterAuthority:
    """The certificate authority of one cluster; it lives only in the user's process."""

    def __init__(self, cluster_name: str | None = None):
        self._key: Any = _new_key()
        now = dt.datetime.now(dt.UTC)
        subject = _name(f"parallex-ca-{cluster_name or uuid.uuid4().hex[:8]}", "parallex-ca")
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_pem = self._cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> str:
        """The CA's private key; it travels only to this cluster's own scheduler process."""
        return _key_pem(self._key)

    @classmethod
    def from_pem(cls, ca_pem: str, key_pem: str) -> ClusterAuthority:
        """The same authority in another process of the user (the scheduler's)."""
        authority = cls.__new__(cls)
        authority._key = serialization.load_pem_private_key(key_pem.encode(), password=None)
        authority._cert = x509.load_pem_x509_certificate(ca_pem.encode())
        authority.ca_pem = ca_pem
        return authority

    def issue(self, common_name: str, role: str) -> CertKey:
        """Sign a new key pair for ``common_name`` in ``role``."""
        key = _new_key()
        return CertKey(self._certify(common_name, role, key.public_key()), _key_pem(key))

    def _certify(self, common_name: str, role: str, public_key) -> str:
        """A PEM certificate of this CA naming ``common_name`` in ``role`` over ``public_key``."""
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, role))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    def worker_credentials(self, lease_id: str) -> CertKey:
        """A key and the certificate a lease's worker presents: CN = lease id. (Agents make
        their workers' keys themselves; see sign_worker_request.)"""
        return self.issue(lease_id, ROLE_WORKER)

    def sign_worker_request(self, lease_id: str, csr_pem: str) -> str:
        """The worker certificate for ``lease_id`` over the public key of the agent's signing
        request; whatever name the request asks for, the certificate names the lease."""
        csr = load_worker_request(csr_pem, lease_id)
        return self._certify(lease_id, ROLE_WORKER, csr.public_key())


class BadSigningRequest(ValueError):
    """A certificate signing request that is malformed, forged or for another lease."""


def worker_key_and_request(lease_id: str) -> tuple[str, str]:
    """(private key PEM, signing request PEM) for a lease's worker, made where it will run:
    the private key never leaves the provider machine."""
    key = _new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(lease_id, ROLE_WORKER))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM).decode()


def load_worker_request(csr_pem: str, lease_id: str) -> x509.CertificateSigningRequest:
    """The signing request, checked: it parses, its signature holds (its maker has the key),
    it asks for ``lease_id`` and its key is a P-256 elliptic-curve key."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except (ValueError, TypeError) as exc:
        raise BadSigningRequest("the signing request is not a PEM certificate request") \
            from exc
    if not csr.is_signature_valid:
        raise BadSigningRequest("the signing request's signature does not hold")
    name = _subject_field(csr.subject, NameOID.COMMON_NAME)
    if name != lease_id:
        raise BadSigningRequest(f"the signing request names {name!r}, not lease {lease_id}")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise BadSigningRequest("worker keys must be P-256 elliptic-curve keys")
    return csr


def certificate_matches_request(cert_pem: str, csr_pem: str) -> bool:
    """True when the certificate certifies the public key of the signing request."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except (ValueError, TypeError):
        return False
    return cert.public_key().public_numbers() == csr.public_key().public_numbers()


def certificate_identity(cert_pem: str) -> tuple[str, str]:
    """Return (common name, role) of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return _subject_field(cert.subject, NameOID.COMMON_NAME), _subject_field(
        cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME
    )


def signed_by(cert_pem: str, ca_pem: str) -> bool:
    """True when ``cert_pem`` was issued and signed by the CA in ``ca_pem``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def is_ca_certificate(ca_pem: str) -> bool:
    """True when ``ca_pem`` parses as a CA certificate."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        return bool(ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (ValueError, x509.ExtensionNotFound):
        return False


def key_matches(cert_pem: str, key_pem: str) -> bool:
    """True when ``key_pem`` is the private key of ``cert_pem``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        return False
    return cert.public_key().public_numbers() == key.public_key().public_numbers()


def peer_identity(peercert: dict | None) -> tuple[str | None, str | None]:
    """(common name, role) from the dict that ``ssl.SSLSocket.getpeercert()`` returns."""
    if not peercert:
        return None, None
    fields = {k: v for rdn in peercert.get("subject", ()) for (k, v) in rdn}
    return fields.get("commonName"), fields.get("organizationalUnitName")


def _subject_field(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    attrs = name.get_attributes_for_oid(oid)
    return str(attrs[0].value) if attrs else ""
