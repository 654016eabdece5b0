"""Per-node and per-session budgets (section 7): the token bucket, the Budget that owns
buckets by key, and the renewal budget as the control plane spends it."""

from __future__ import annotations

import logging

import pytest

import ncctl


def test_a_bucket_takes_its_burst_then_refills_at_its_rate() -> None:
    bucket = ncctl.TokenBucket(3, now=0.0)
    assert [bucket.take(3, 0.5, 0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(3, 0.5, 1.9)  # 0.95 of one back
    assert bucket.take(3, 0.5, 2.0)
    assert not bucket.take(3, 0.5, 2.0)
    assert [bucket.take(3, 0.5, 100.0) for _ in range(4)] == [True, True, True, False]  # never above the burst


def test_a_clock_that_steps_back_refills_nothing() -> None:
    bucket = ncctl.TokenBucket(1, now=10.0)
    assert bucket.take(1, 1.0, 10.0)
    assert not bucket.take(1, 1.0, 5.0)


def test_past_its_budget_a_key_is_refused_counted_and_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = ncctl.Budget("control-budget", "control frames", burst=5, per_s=1 / 6)
    for _ in range(5):
        budget.spend("node-a", "node a", now=0.0)
    with caplog.at_level(logging.WARNING, logger="nc"):
        for at in range(100):
            with pytest.raises(ncctl.OverBudget) as refused:
                budget.spend("node-a", "node a", now=at / 1000)
    assert refused.value.reason == "control-budget"
    assert "over 5 control frames at once or 10 per minute" in str(refused.value)
    assert budget.refused == 100
    assert len(caplog.records) == 1 and "node a refused" in caplog.records[0].getMessage()
    budget.spend("node-b", "node b", now=0.1)  # another key has its own bucket
    budget.spend("node-a", "node a", now=6.0)  # one back after 6 s
    with caplog.at_level(logging.WARNING, logger="nc"):
        with pytest.raises(ncctl.OverBudget):
            budget.spend("node-a", "node a", now=6.0)
        with pytest.raises(ncctl.OverBudget):  # the interval over: logged again
            for _ in range(ncctl.CONTROL_FRAME_BURST):
                budget.spend("node-a", "node a", now=ncctl.Budget.LOG_EVERY_S + 1)
    assert len(caplog.records) == 2  # the one within the interval was held back


def test_full_buckets_are_forgotten_so_the_table_stays_small() -> None:
    budget = ncctl.Budget("bad-frames", "malformed frames", burst=10, per_s=10)
    for key in range(1000):
        budget.spend(key, "a session", now=0.0)
    assert len(budget) == 1000
    budget.spend("late", "a session", now=ncctl.Budget.PRUNE_EVERY_S + 1)
    assert len(budget) == 1
    budget.forget("late")
    assert len(budget) == 0


def test_a_per_use_rate_overrides_the_budgets() -> None:
    budget = ncctl.Budget("renewal-budget", "renewals", burst=1, per_s=1 / 3600)
    budget.spend("n", "node n", per_s=1.0, now=0.0)
    budget.spend("n", "node n", per_s=1.0, now=1.0)
    with pytest.raises(ncctl.OverBudget, match="1 per second"):
        budget.spend("n", "node n", per_s=1.0, now=1.5)


def test_renewals_a_few_per_hour_or_three_per_renewal_interval() -> None:
    assert ncctl.renewals_per_s(365 * 86400) == ncctl.RENEWALS_PER_HOUR / 3600
    assert ncctl.renewals_per_s(30) == pytest.approx(3 / 20)  # renewed every 20 s: three per 20 s


def test_renewals_in_a_loop_are_refused_past_the_budget_with_two_live_certificates_per_kind(
    control: ncctl.ControlPlane,
) -> None:
    admin = ncctl.Identity(ncctl.ADMIN, ncctl.RESERVED_NODE_TOKEN, ncctl.DEFAULT_NETWORK)
    bootstrap, _, _ = control.create_bootstrap_token(admin, 10)
    token, creds = control.admit_join(bootstrap)
    node = control.identify(ncctl.peer_cert(creds.grpc.cert_pem), "grpc")
    key = ncctl.new_key()
    csr = ncctl.new_csr(key, token)
    for _ in range(ncctl.RENEWAL_BURST):
        control.renew(node, csr, csr)
    with pytest.raises(ncctl.BadRequest, match="renewed too often"):
        control.renew(node, csr, csr)
    assert control.budgets.renewals.refused == 1
    live = control.store._query(
        "SELECT kind, count(*) FROM nc_cert WHERE node_token = ? AND revoked = 0 GROUP BY kind", (token,)
    )
    assert dict(live) == {"grpc": 2, "network": 2}
    # the certificates in use still count: the node is not locked out by its own renewals
    assert control.identify(ncctl.peer_cert(creds.network.cert_pem), "network").node_token == token
