"""The output directory: complete files, private keys, one atomic switch per generation,
and readers that never see a key that does not match the certificate."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from identityd.keys.certs import CertificateAuthority
from identityd.keys.csr import public_key_sha256
from identityd.sia.files import (
    DATA_LINK,
    Material,
    current_generation,
    generations,
    read_current,
    write_material,
)

CA = CertificateAuthority("files test CA")


def material(cn: str = "sports.web.api") -> Material:
    issued = CA.issue(cn)
    return Material(key_pem=issued.key_pem, cert_pem=issued.cert_pem, ca_pem=CA.cert_pem)


def matches(key_pem: bytes, cert_pem: bytes) -> bool:
    key = serialization.load_pem_private_key(key_pem, password=None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    return public_key_sha256(key.public_key()) == public_key_sha256(cert.public_key())


def test_layout_modes_and_links(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    first = material()
    generation = write_material(out, first)
    assert os.readlink(out / DATA_LINK) == generation.name
    for name in ("key.pem", "cert.pem", "ca.pem", "bundle.pem"):
        assert os.readlink(out / name) == f"{DATA_LINK}/{name}"
    assert (out / "key.pem").read_bytes() == first.key_pem
    assert (out / "cert.pem").read_bytes() == first.cert_pem
    assert (out / "ca.pem").read_bytes() == CA.cert_pem
    assert (out / "bundle.pem").read_bytes() == first.key_pem + first.cert_pem + CA.cert_pem
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in generation.iterdir()}
    assert modes == {"key.pem": 0o600, "bundle.pem": 0o600, "cert.pem": 0o644, "ca.pem": 0o644}


def test_read_current_and_generations_pruned(tmp_path: Path) -> None:
    assert read_current(tmp_path) is None
    written = [material(f"svc{i}.x") for i in range(4)]
    dirs = [write_material(tmp_path, m) for m in written]
    assert generations(tmp_path) == dirs[-2:]  # the current one and the one before
    found = read_current(tmp_path)
    assert found is not None
    assert found == (dirs[-1], written[-1])
    assert current_generation(tmp_path) == dirs[-1]
    # no temporary links or files left behind
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("..gen-")) == [
        DATA_LINK,
        "bundle.pem",
        "ca.pem",
        "cert.pem",
        "key.pem",
    ]


def test_a_plain_file_in_the_way_is_replaced_by_the_link(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("old layout")
    write_material(tmp_path, material())
    assert (tmp_path / "key.pem").is_symlink()


def test_concurrent_readers_never_see_a_mismatched_pair(tmp_path: Path) -> None:
    """Readers of bundle.pem and of one resolved generation race 40 swaps."""
    pool = [material() for _ in range(6)]
    write_material(tmp_path, pool[0])
    stop = threading.Event()
    problems: list[str] = []
    reads = {"bundle": 0, "generation": 0}

    def read_bundle() -> None:
        while not stop.is_set():
            data = (tmp_path / "bundle.pem").read_bytes()
            key_end = data.index(b"-----END PRIVATE KEY-----") + len(b"-----END PRIVATE KEY-----\n")
            if not matches(data[:key_end], data[key_end:]):
                problems.append("bundle.pem holds a key and a certificate that do not match")
            reads["bundle"] += 1

    def read_generation() -> None:
        while not stop.is_set():
            generation = current_generation(tmp_path)
            assert generation is not None
            try:
                key = (generation / "key.pem").read_bytes()
                cert = (generation / "cert.pem").read_bytes()
            except FileNotFoundError:
                continue  # pruned two swaps later: retry, never a mismatch
            if not matches(key, cert):
                problems.append("one generation holds a mismatched pair")
            reads["generation"] += 1

    threads = [threading.Thread(target=read_bundle), threading.Thread(target=read_generation)]
    for thread in threads:
        thread.start()
    try:
        for i in range(40):
            write_material(tmp_path, pool[i % len(pool)])
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert problems == []
    assert reads["bundle"] > 0
    assert reads["generation"] > 0


def test_links_planted_in_the_directory_are_replaced_never_written_through(
    tmp_path: Path,
) -> None:
    out = tmp_path / "certs"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "key.pem").write_text("not yours")
    os.symlink(victim / "key.pem", out / "key.pem")
    os.symlink(victim / "key.pem", out / "bundle.pem")
    os.symlink(victim, out / DATA_LINK)
    first = material()
    generation = write_material(out, first)
    assert (victim / "key.pem").read_text() == "not yours"
    assert sorted(p.name for p in victim.iterdir()) == ["key.pem"]
    assert (out / "key.pem").resolve() == (generation / "key.pem").resolve()
    assert (out / "key.pem").read_bytes() == first.key_pem
