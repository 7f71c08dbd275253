"""The dev CA's key material: loaded from PEM, kept across restarts, keys private."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from identityd.devca.state import DevCAFiles, load_or_create_authority, prepare_state
from identityd.errors import ConfigError
from identityd.keys.ca_pem import authority_from_pem, cert_facts
from identityd.keys.certs import CertificateAuthority
from identityd.keys.csr import generate_key, key_to_pem


def test_authority_from_pem_signs_certificates_that_chain_to_it() -> None:
    original = CertificateAuthority("test CA")
    loaded = authority_from_pem(original.cert_pem, key_to_pem(original.key))
    leaf = loaded.sign(generate_key("EC").public_key(), common_name="sports.web.api")
    leaf.verify_directly_issued_by(original.certificate)
    assert cert_facts(leaf).common_name == "sports.web.api"


def test_authority_from_pem_refuses_a_key_of_another_ca_and_a_leaf() -> None:
    ca, other = CertificateAuthority("a"), CertificateAuthority("b")
    with pytest.raises(ConfigError, match="does not match"):
        authority_from_pem(ca.cert_pem, key_to_pem(other.key))
    leaf = ca.issue("leaf")
    with pytest.raises(ConfigError, match="not a CA"):
        authority_from_pem(leaf.cert_pem, leaf.key_pem)
    with pytest.raises(ConfigError, match="do not parse"):
        authority_from_pem(b"junk", b"junk")


def test_the_ca_survives_a_restart_and_its_key_is_private(tmp_path: Path) -> None:
    files = DevCAFiles(tmp_path)
    first = load_or_create_authority(files)
    second = load_or_create_authority(files)
    assert first.cert_pem == second.cert_pem
    assert stat.S_IMODE(files.ca_key.stat().st_mode) == 0o600


def test_prepare_state_issues_server_and_client_certificates(tmp_path: Path) -> None:
    _, files = prepare_state(
        tmp_path / "state",
        client_cn="dev-ca.zts",
        server_names=("localhost",),
        server_ips=("127.0.0.1",),
    )
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    client = x509.load_pem_x509_certificate(files.client_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    assert cert_facts(server).dns == ("localhost",)
    assert cert_facts(server).ips == ("127.0.0.1",)
    assert cert_facts(client).common_name == "dev-ca.zts"
    for key in (files.server_key, files.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
