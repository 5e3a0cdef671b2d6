"""HTTPS for the page: browsers give the webcam only to secure contexts (HTTPS or localhost), so a server that
others open by name or address needs a certificate. `--https-self-signed` makes one for this machine's names and
addresses and keeps it in the cache directory, so a browser's exception for it survives restarts.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

import ifaddr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
RENEW_DAYS = 30  # a cached certificate closer than this to its end is replaced


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "liveportrait-live" / "tls"


def host_names(host: str = "") -> tuple[set[str], set[str]]:
    """(DNS names, IP addresses) this server can be reached by: localhost, the host name, every interface's
    address, and --host itself. Read from the machine, without any DNS lookup."""
    names, addresses = {"localhost", socket.gethostname()}, {"127.0.0.1", "::1"}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                addresses.add(ip.ip)
            elif ip.ip[2] == 0:  # IPv6 without a scope id (link-local addresses are not usable in URLs)
                addresses.add(ip.ip[0])
    if host and host not in ("0.0.0.0", "::"):
        try:
            addresses.add(str(ipaddress.ip_address(host)))
        except ValueError:
            names.add(host)
    return names, addresses


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate, as browsers show it (AB:CD:…)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _covers(cert: x509.Certificate, names: set[str], addresses: set[str]) -> bool:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    have_ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    fresh = cert.not_valid_after_utc - datetime.timedelta(days=RENEW_DAYS) > datetime.datetime.now(datetime.UTC)
    return fresh and names <= set(san.get_values_for_type(x509.DNSName)) and addresses <= have_ips


def self_signed(host: str = "", directory: Path | None = None) -> tuple[Path, Path, x509.Certificate, bool]:
    """(certfile, keyfile, certificate, created): the cached self-signed certificate when it still covers every
    name and address of this machine (and `host`), else a new one (EC P-256, valid VALID_DAYS days)."""
    directory = Path(directory or default_dir())
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    names, addresses = host_names(host)
    if certfile.exists() and keyfile.exists():
        cert = x509.load_pem_x509_certificate(certfile.read_bytes())
        if _covers(cert, names, addresses):
            return certfile, keyfile, cert, False
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, socket.gethostname()),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "LivePortrait Live (self-signed)")])
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName(n) for n in sorted(names)] + [x509.IPAddress(ipaddress.ip_address(a)) for a in sorted(addresses)]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:  # owner only
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return certfile, keyfile, cert, True


def advice(certfile: Path, cert: x509.Certificate, host: str, port: int, created: bool) -> str:
    """What `--https-self-signed` prints: where to open the page, the fingerprint, and what the browser will say."""
    addresses = host_names(host)[1]
    if host in ("127.0.0.1", "localhost", "::1", ""):
        urls = [f"https://localhost:{port}"]
    elif host in ("0.0.0.0", "::"):
        urls = [f"https://{socket.gethostname()}:{port}"] + [
            f"https://{a}:{port}" for a in sorted(addresses - {"127.0.0.1", "::1"}) if ":" not in a]
    else:
        urls = [f"https://{host}:{port}"]
    return (f"* HTTPS with a self-signed certificate ({'new' if created else 'cached'}: {certfile}):\n"
            + "".join(f"    {u}\n" for u in urls)
            + f"  SHA-256 fingerprint {fingerprint(cert)}\n"
            "  The browser will warn that the certificate is not trusted: check that it shows this fingerprint, "
            "then choose Advanced > Proceed (once per browser).")
