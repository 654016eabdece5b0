"""Fetching the server's gRPC CA before a join: the chain a real gRPC TLS server
presents, read the way each Python can (3.9's ssl hands over only the leaf), and
checked against the join string's pin."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest

import ncctl


@pytest.fixture
def authority(tmp_path: Path) -> ncctl.CertAuthority:
    authority = ncctl.CertAuthority(tmp_path / "grpc", "gRPC")
    authority.load_or_create()
    authority.ensure_server_cert(("127.0.0.1",))
    return authority


@pytest.fixture
def server_port(authority: ncctl.CertAuthority) -> Iterator[int]:
    """A gRPC server with no services, behind the bootstrap service's credentials."""
    grpc, _, _ = ncctl.grpc_modules()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    creds = grpc.ssl_server_credentials([(authority.server_key_path.read_bytes(), authority.server_chain_pem())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def der(cert: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)  # type: ignore[attr-defined]


def test_the_chain_is_the_leaf_then_the_ca(authority: ncctl.CertAuthority, server_port: int) -> None:
    chain = ncctl.tls_peer_chain("127.0.0.1", server_port)
    assert chain == [der(ncctl.load_cert_file(authority.server_cert_path)), der(authority.cert)]


def test_the_tls12_reading_gives_the_same_chain(authority: ncctl.CertAuthority, server_port: int) -> None:
    """The 3.9 path runs on every Python here, so newer ones keep it honest too."""
    context = ncctl.ssl.SSLContext(ncctl.ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ncctl.ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    chain = ncctl.tls12_peer_chain(context, "127.0.0.1", server_port)
    assert chain == [der(ncctl.load_cert_file(authority.server_cert_path)), der(authority.cert)]
    if sys.version_info >= (3, 10):
        assert chain == ncctl.tls_peer_chain("127.0.0.1", server_port)


def test_the_pinned_ca_is_fetched_and_a_wrong_pin_refused(authority: ncctl.CertAuthority, server_port: int) -> None:
    pin = ncctl.spki_pin(authority.cert)
    target = ncctl.JoinTarget("t" * 16, "127.0.0.1", server_port, pin)
    assert ncctl.fetch_server_ca(target) == ncctl.cert_pem(authority.cert)
    wrong = ncctl.JoinTarget("t" * 16, "127.0.0.1", server_port, "sha256:" + "0" * 64)
    with pytest.raises(ncctl.RemoteError, match="not the one in the join string"):
        ncctl.fetch_server_ca(wrong)


def test_nothing_listening_is_a_remote_error() -> None:
    with pytest.raises(ncctl.RemoteError, match="cannot reach the bootstrap service"):
        ncctl.fetch_server_ca(ncctl.JoinTarget("t" * 16, "127.0.0.1", 1, None))


def test_records_without_a_certificate_message_give_none() -> None:
    server_hello = bytes([2, 0, 0, 2, 3, 3])  # a (truncated) ServerHello handshake message
    records = bytes([22, 3, 3, 0, len(server_hello)]) + server_hello + bytes([20, 3, 3, 0, 1, 1])
    assert ncctl.tls12_certificates(records) is None
    assert ncctl.tls12_certificates(b"") is None


def test_a_certificate_message_split_across_records_is_joined() -> None:
    certs = [b"leaf-der", b"ca-der"]
    entries = b"".join(len(c).to_bytes(3, "big") + c for c in certs)
    body = len(entries).to_bytes(3, "big") + entries
    message = bytes([11]) + len(body).to_bytes(3, "big") + body
    records = b"".join(bytes([22, 3, 3]) + len(part).to_bytes(2, "big") + part for part in (message[:7], message[7:]))
    assert ncctl.tls12_certificates(records) == certs
