"""RunControl (deadline, cancellation, killing subprocesses) and ScheduledRunCapabilities."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from kernel.context import Cancelled, DeadlineExceeded, RunControl, ScheduledRunCapabilities
from kernel.models import User
from kernel.permissions import parse_permission


def test_a_fresh_control_without_deadline_never_stops() -> None:
    control = RunControl()
    control.check()
    assert control.remaining() is None


def test_check_raises_deadline_exceeded_once_the_deadline_passes() -> None:
    control = RunControl(deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        control.check()
    assert control.remaining() == 0


def test_remaining_counts_down_to_the_deadline() -> None:
    control = RunControl.with_timeout(10)
    assert 9 < control.remaining() <= 10


def test_cancel_makes_check_raise_cancelled_with_the_reason() -> None:
    control = RunControl.with_timeout(10)
    control.cancel("the owner cancelled it")
    with pytest.raises(Cancelled, match="the owner cancelled it"):
        control.check()
    assert control.cancelled


def test_cancellation_wins_over_an_expired_deadline() -> None:
    control = RunControl(deadline=time.monotonic() - 1)
    control.cancel("stop")
    with pytest.raises(Cancelled):
        control.check()


def test_wait_returns_early_when_cancelled_from_another_thread() -> None:
    control = RunControl()
    threading.Timer(0.05, control.cancel).start()
    started = time.monotonic()
    assert control.wait(10) is True
    assert time.monotonic() - started < 5


def test_a_child_is_cancelled_with_its_parent_and_never_outlives_it() -> None:
    parent = RunControl.with_timeout(1)
    child = parent.child(60)
    assert child.remaining() <= 1
    parent.cancel("bye")
    with pytest.raises(Cancelled):
        child.check()
    late_child = parent.child(5)
    assert late_child.cancelled


def test_cancel_kills_the_whole_process_group_of_a_tracked_subprocess() -> None:
    control = RunControl()
    # The shell starts a grandchild; killing only the shell would leave it running.
    process = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 30 & echo $!; wait"],
        stdout=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    grandchild = int(process.stdout.readline())
    with control.track(process):
        control.cancel("stop")
        process.wait(timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{grandchild}/stat") as stat:
                if stat.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the grandchild survived the cancellation")


def test_a_process_tracked_after_cancel_is_killed_at_once() -> None:
    control = RunControl()
    control.cancel()
    process = subprocess.Popen(["sleep", "30"], start_new_session=True)
    with control.track(process):
        assert process.wait(timeout=5) != 0


@pytest.mark.django_db
def test_a_scheduled_run_needs_both_the_snapshot_and_the_current_grant(make_user) -> None:
    owner = make_user(grant=["net:a.com", "net:b.com"])
    capabilities = ScheduledRunCapabilities(["net:a.com", "net:c.com"], owner)
    assert capabilities.allows(parse_permission("net:a.com"))
    assert not capabilities.allows(parse_permission("net:b.com"))  # not in the snapshot
    assert not capabilities.allows(parse_permission("net:c.com"))  # not in the grant


@pytest.mark.django_db
def test_revoking_the_grant_takes_effect_at_the_next_check(make_user) -> None:
    owner = make_user(grant=["net:a.com"])
    capabilities = ScheduledRunCapabilities(["net:a.com"], owner)
    assert capabilities.allows(parse_permission("net:a.com"))
    User.objects.filter(pk=owner.pk).update(grant=[])
    assert not capabilities.allows(parse_permission("net:a.com"))


@pytest.mark.django_db
def test_a_deactivated_owner_allows_nothing(make_user) -> None:
    owner = make_user(grant=["net:a.com"])
    capabilities = ScheduledRunCapabilities(["net:a.com"], owner)
    User.objects.filter(pk=owner.pk).update(is_active=False)
    assert not capabilities.allows(parse_permission("net:a.com"))


@pytest.mark.django_db
def test_an_exact_grant_needs_the_snapshot_to_name_it_exactly(make_user) -> None:
    owner = make_user(grant=["net:*", "net:localhost"])
    wildcard = ScheduledRunCapabilities(["net:*"], owner)
    exact = ScheduledRunCapabilities(["net:localhost"], owner)
    assert not wildcard.allows_exactly(parse_permission("net:localhost"))
    assert exact.allows_exactly(parse_permission("net:localhost"))


@pytest.mark.django_db
def test_an_exact_grant_needs_the_owners_grant_to_name_it_exactly_too(make_user) -> None:
    # A wildcard grant must not let a snapshot (or a chat session) unlock a private host by
    # naming it: the operator granted "any host", not "this loopback address".
    owner = make_user(grant=["net:*"])
    for host in ("net:localhost", "net:127.0.0.1", "net:169.254.169.254", "net:[::1]"):
        capabilities = ScheduledRunCapabilities([host], owner)
        assert not capabilities.allows_exactly(parse_permission(host))
    # net:* does not even allow an exact non-public address: it never covers one.
    for host in ("net:127.0.0.1", "net:10.1.2.3", "net:[::1]"):
        assert not ScheduledRunCapabilities([host], owner).allows(parse_permission(host))


@pytest.mark.django_db
def test_revoking_the_exact_grant_takes_effect_at_the_next_check(make_user) -> None:
    owner = make_user(grant=["net:*", "net:127.0.0.1"])
    capabilities = ScheduledRunCapabilities(["net:127.0.0.1"], owner)
    assert capabilities.allows_exactly(parse_permission("net:127.0.0.1"))
    User.objects.filter(pk=owner.pk).update(grant=["net:*"])
    assert not capabilities.allows_exactly(parse_permission("net:127.0.0.1"))
