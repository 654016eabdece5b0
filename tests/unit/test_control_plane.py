"""The control plane as a unit, on a real sqlite store and real certificates: identity by
serial, the permission table, token and CIDR rules, renewal and revocation."""

from __future__ import annotations

import ipaddress

import pytest

import ncctl

ADMIN = ncctl.Identity(ncctl.ADMIN, ncctl.RESERVED_NODE_TOKEN, ncctl.DEFAULT_NETWORK)


def join(control: ncctl.ControlPlane, network: str = "") -> tuple[str, ncctl.NodeCredentials]:
    token, _, _ = control.create_bootstrap_token(ADMIN, 10, network=network)
    return control.admit_join(token)


def cert_of(pair: ncctl.CertPair | bytes) -> ncctl.PeerCert:
    return ncctl.peer_cert(pair.cert_pem if isinstance(pair, ncctl.CertPair) else pair)


def test_a_joined_node_is_a_live_identity_until_unregistered(control: ncctl.ControlPlane) -> None:
    token, creds = join(control)
    for pair, kind in ((creds.grpc, "grpc"), (creds.network, "network")):
        assert control.identify(cert_of(pair), kind) == ncctl.Identity(ncctl.NODE, token, ncctl.DEFAULT_NETWORK)
    control.unregister(ADMIN, token)
    for pair, kind in ((creds.grpc, "grpc"), (creds.network, "network")):
        with pytest.raises(ncctl.Unauthenticated, match="no registered node"):
            control.identify(cert_of(pair), kind)


def test_the_admin_certificate_on_disk_is_the_only_admin(control: ncctl.ControlPlane) -> None:
    on_disk = ncctl.peer_cert(control.pki.admin_cert_path.read_bytes())
    assert control.identify(on_disk, "grpc").role == ncctl.ADMIN
    other, _ = control.pki.grpc.issue(ncctl.RESERVED_NODE_TOKEN, client=True)  # signed by the CA, never recorded
    with pytest.raises(ncctl.Unauthenticated):
        control.identify(cert_of(other), "grpc")


def test_a_certificate_for_one_node_cannot_speak_for_another(control: ncctl.ControlPlane) -> None:
    token, creds = join(control)
    other, _ = join(control)
    with pytest.raises(ncctl.BadRequest, match="does not match"):
        control.admit_session(cert_of(creds.network), other, "")
    overlay, ip = control.admit_session(cert_of(creds.network), token, "")
    assert overlay == ncctl.DEFAULT_NETWORK and ip in ipaddress.IPv4Network("10.1.1.0/24")


def test_permission_table(control: ncctl.ControlPlane) -> None:
    b_token, b_creds = join(control, "edge-b")
    d_token, _ = join(control)
    b = control.identify(cert_of(b_creds.grpc), "grpc")
    assert b.network == "edge-b"
    assert control.node_state(b, b_token).token == b_token
    with pytest.raises(ncctl.BadRequest, match="not registered"):
        control.node_state(b, d_token)  # another network reads as not found
    with pytest.raises(ncctl.PermissionDenied, match="only itself"):
        control.unregister(b, d_token)
    with pytest.raises(ncctl.PermissionDenied, match="admin credentials"):
        control.list_nodes(b)
    with pytest.raises(ncctl.BadRequest, match="own network"):
        control.create_bootstrap_token(b, 5, network=ncctl.DEFAULT_NETWORK)
    with pytest.raises(ncctl.PermissionDenied):
        control.renew(ADMIN, b"", b"")
    assert {row.token for row in control.list_nodes(ADMIN)} >= {b_token, d_token}


def test_a_join_whose_reply_was_lost_is_retried_with_its_single_use_token(control: ncctl.ControlPlane) -> None:
    """The first reply never arrived: the retry gets a working node, the lost credentials
    never work, and the token is spent only once the retry's node was heard from."""
    bootstrap, _, _ = control.create_bootstrap_token(ADMIN, 10, single_use=True)
    lost, lost_creds = control.admit_join(bootstrap)
    retried, creds = control.admit_join(bootstrap)
    assert [row.uses for row in control.list_bootstrap_tokens(ADMIN)] == [0]
    with pytest.raises(ncctl.Unauthenticated, match="join again"):
        control.identify(cert_of(lost_creds.network), "network")
    overlay, ip = control.admit_session(cert_of(creds.network), retried, "")
    assert overlay == ncctl.DEFAULT_NETWORK and control.store.node(retried).bind_ip == str(ip)
    assert not control.store.node(retried).pending and control.store.node(lost) is None
    assert [row.uses for row in control.list_bootstrap_tokens(ADMIN)] == [1]
    with pytest.raises(ncctl.BadRequest, match="single-use"):
        control.admit_join(bootstrap)
    assert control.identify(cert_of(creds.grpc), "grpc").node_token == retried, "confirming again changes nothing"


def test_node_mints_are_capped_counted_and_attributed(control: ncctl.ControlPlane) -> None:
    token, creds = join(control, "edge-b")
    node = control.identify(cert_of(creds.grpc), "grpc")
    with pytest.raises(ncctl.BadRequest, match="never-expiring"):
        control.create_bootstrap_token(node, -1)
    with pytest.raises(ncctl.BadRequest, match="over a year"):
        control.create_bootstrap_token(node, 10**7)
    _, _, overlay = control.create_bootstrap_token(node, 10**5)  # capped at nodeTokenMaxLife, not refused
    with pytest.raises(ncctl.BadRequest, match="0 minutes is not allowed"):
        control.create_bootstrap_token(node, 0)  # refused, not silently 10 minutes
    control.create_bootstrap_token(node, 1)
    assert overlay.name == "edge-b"
    with pytest.raises(ncctl.BadRequest, match="nodeMintRate"):
        control.create_bootstrap_token(node, 5)
    minted = [row for row in control.list_bootstrap_tokens(ADMIN) if row.minted_by == token]
    assert len(minted) == 2 and {row.network for row in minted} == {"edge-b"}
    # A join with a node's token records who brought the newcomer in; unregistering the
    # minter deletes its tokens nobody used.
    newcomer, newcomer_creds = control.admit_join(minted[0].token)
    assert control.store.node(newcomer).minted_by == token
    control.identify(cert_of(newcomer_creds.grpc), "grpc")  # heard from: the token's use counts
    control.unregister(ADMIN, token)
    left = [row for row in control.list_bootstrap_tokens(ADMIN) if row.minted_by == token]
    assert [row.token for row in left] == [minted[0].token], "only the used token stays"


def test_admin_token_life_is_bounded(control: ncctl.ControlPlane) -> None:
    with pytest.raises(ncctl.BadRequest, match="ten years"):
        control.create_bootstrap_token(ADMIN, 2**62)
    _, expire, _ = control.create_bootstrap_token(ADMIN, -1)
    assert expire == ncctl.NEVER_EXPIRES
    with pytest.raises(ncctl.BadRequest, match="0 minutes is not allowed"):
        control.create_bootstrap_token(ADMIN, 0)


def test_renewal_revokes_the_old_certificates_once_the_new_ones_are_used(control: ncctl.ControlPlane) -> None:
    token, creds = join(control)
    node = control.identify(cert_of(creds.grpc), "grpc")
    keys = {kind: ncctl.new_key() for kind in ("grpc", "network")}
    grpc_pem, network_pem = control.renew(
        node, ncctl.new_csr(keys["grpc"], token), ncctl.new_csr(keys["network"], token)
    )
    assert control.identify(cert_of(creds.network), "network").node_token == token  # not switched yet
    control.identify(cert_of(network_pem), "network")
    with pytest.raises(ncctl.Unauthenticated, match="revoked"):
        control.identify(cert_of(creds.network), "network")
    assert control.identify(cert_of(creds.grpc), "grpc").node_token == token  # grpc switches on its own use
    control.identify(cert_of(grpc_pem), "grpc")
    with pytest.raises(ncctl.Unauthenticated, match="revoked"):
        control.identify(cert_of(creds.grpc), "grpc")


def test_a_csr_must_be_a_valid_ec_request(control: ncctl.ControlPlane) -> None:
    token, creds = join(control)
    node = control.identify(cert_of(creds.grpc), "grpc")
    good = ncctl.new_csr(ncctl.new_key(), token)
    for bad in (b"", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", good[:-40]):
        with pytest.raises(ncctl.BadRequest, match="certificate request"):
            control.renew(node, bad, good)


@pytest.mark.parametrize(
    ("curve", "accepted"),
    [("SECP256R1", True), ("SECP384R1", True), ("SECP521R1", True), ("SECP256K1", False), ("BrainpoolP256R1", False)],
)
def test_a_csr_key_is_on_a_nist_curve_as_the_refusal_says(curve: str, accepted: bool) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    csr = ncctl.new_csr(ec.generate_private_key(getattr(ec, curve)()), "abcdefghij012345")
    if accepted:
        assert ncctl.csr_public_key(csr, "grpc").curve.name == getattr(ec, curve).name
    else:
        with pytest.raises(ncctl.BadRequest, match="P-256, P-384 or P-521"):
            ncctl.csr_public_key(csr, "grpc")


@pytest.mark.parametrize(
    ("cidr", "allow_public", "why"),
    [
        ("198.18.0.0/24", False, "server's own address"),
        ("172.31.0.0/16", False, "route 172.31.5.0/24 dev side0"),
        ("8.8.8.0/24", False, "public range"),
        ("8.8.8.0/24", True, None),
        ("100.64.3.0/24", False, None),
        ("10.9.0.0/24", False, None),
    ],
)
def test_cidr_rules(cidr: str, allow_public: bool, why: str | None) -> None:
    routes = {"route 172.31.5.0/24 dev side0": ipaddress.IPv4Network("172.31.5.0/24")}
    problem = ncctl.cidr_problem(ipaddress.IPv4Network(cidr), allow_public, ("198.18.0.1",), routes)
    assert (problem is None) if why is None else (why in problem), problem


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("90m", 5400), ("12h", 43200), ("365d", 31536000), (45, 45)]
)
def test_durations(text: object, seconds: int) -> None:
    assert ncctl.parse_duration(text, "nodeCertLife") == seconds
    assert ncctl.parse_duration(ncctl.format_duration(seconds), "nodeCertLife") == seconds


@pytest.mark.parametrize("text", ["", "1y", "-5s", "5", "3s", "30000d", True])
def test_bad_durations_name_the_field(text: object) -> None:
    with pytest.raises(ncctl.ConfigError, match="nodeCertLife"):
        ncctl.parse_duration(text, "nodeCertLife", shortest=ncctl.MIN_CERT_LIFE_S)


def test_prune_takes_the_bounds_of_every_duration(control: ncctl.ControlPlane) -> None:
    """The idle time of PruneNodes is checked by the one duration parser: the same sentence
    as --idle-for's, as a refusal."""
    for seconds in (0, -3, ncctl.MAX_DURATION_S + 1):
        with pytest.raises(ncctl.BadRequest, match=r"^idleForSeconds: .* is out of range; use 1s to 7300d"):
            control.prune_nodes(ADMIN, seconds, dry_run=True)
    assert control.prune_nodes(ADMIN, ncctl.MAX_DURATION_S, dry_run=True) == []


def test_what_a_node_minted_may_not_mint_further(control: ncctl.ControlPlane) -> None:
    token, creds = join(control)
    minter = control.identify(cert_of(creds.grpc), "grpc")
    child_token, _, _ = control.create_bootstrap_token(minter, 5)
    child, child_creds = control.admit_join(child_token)
    child_identity = control.identify(cert_of(child_creds.grpc), "grpc")
    with pytest.raises(ncctl.PermissionDenied, match="may not mint further"):
        control.create_bootstrap_token(child_identity, 5)
    assert control.store.node(child).minted_by == token
    control.create_bootstrap_token(minter, 5)  # the admin's node still may
