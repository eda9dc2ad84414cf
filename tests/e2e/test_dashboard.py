"""The dashboard in a real headless Chromium: a failing-then-retried instance, its controls."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import actorflow as af
from actorflow.http import serving
from actorflow.testing import FakeClock

pytestmark = pytest.mark.e2e

TOKEN = "e2e-token-0123456789"
#: Set to a path (e.g. docs/img/dashboard.png) to keep the instance page's screenshot.
SCREENSHOT_ENV = "ACTORFLOW_SCREENSHOT"


class Checkout(af.Workflow):
    """Charging fails twice, then succeeds; then a sleep and an approval."""

    def run(self, event: af.WorkflowEvent, step: Any) -> Any:
        order = event.payload

        def charge(ctx: Any) -> dict[str, Any]:
            if ctx.attempt < 3:
                raise RuntimeError(f"card declined (attempt {ctx.attempt})")
            return {"charge": f"ch_{order['id']}", "amount": order["amount"]}

        charged = step.do(
            "charge card",
            charge,
            retries={"limit": 4, "delay": "1 second", "backoff": "exponential"},
        )
        step.sleep("cool down", "5 seconds")
        approval = step.wait_for_event("approval", "approved", timeout="1 hour")
        labels = step.map("label", lambda sku: f"LBL-{sku}", order["items"])
        return {
            "charge": charged["charge"],
            "approved_by": approval.payload["user"],
            "labels": labels,
        }


class Refund(af.Workflow):
    """Fails for good: its step raises NonRetryableError, which run does not catch."""

    def run(self, event: af.WorkflowEvent, step: Any) -> Any:
        def refund() -> None:
            raise af.NonRetryableError("refund window closed")

        return step.do("refund", refund)


def eventually(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition never held")
        time.sleep(0.02)


def step_status(inst: af.Instance, name: str) -> str | None:
    return next((s.status for s in inst.steps() if s.name == name), None)


def test_dashboard_shows_a_retried_step_and_controls_the_instance(
    rt: af.Runtime, clock: FakeClock, page: Any, tmp_path: Path
) -> None:
    checkout = rt.register(Checkout, name="checkout")
    for i in range(1, 4):
        checkout.create(id=f"order-{i}", params={"id": i, "amount": 10 * i, "items": ["mug"]})
        clock.advance(7)
    inst = checkout.get("order-1")
    eventually(lambda: step_status(inst, "charge card") == "retrying")

    with serving(rt) as url:
        requested: list[str] = []
        page.on("request", lambda req: requested.append(req.url))
        page.goto(url + "/")
        # workflows with their counts by status, instances with filters
        page.wait_for_selector("#workflows tr[data-workflow='checkout']")
        assert "waiting 3" in page.inner_text("#workflows tr[data-workflow='checkout']")
        page.wait_for_selector("#instances tr[data-instance='order-3']")
        assert page.locator("#instances tr[data-instance]").count() == 3
        page.select_option("#filter-status", "complete")
        page.wait_for_selector("#instances >> text=no instances")
        page.select_option("#filter-status", "waiting")
        page.wait_for_selector("#instances tr[data-instance='order-1']")
        page.select_option("#filter-workflow", "checkout")
        page.click("#instances tr[data-instance='order-1']")

        # the instance page: the failed first attempt and its retry delay
        page.wait_for_selector("#timeline .bar[data-attempt='1'][data-outcome='failed']")
        assert page.locator("#timeline .bar.retry-wait").count() == 1
        row = page.locator("#steps tr[data-step='charge card']")
        assert "card declined (attempt 1)" in row.inner_text()
        assert "retry in 1.00 s" in row.inner_text()
        assert page.inner_text("#params").replace(" ", "").startswith('{\n"id":1')

        # time passes: the page updates by itself with the retries and the success
        clock.advance("1 second")
        page.wait_for_selector("#timeline .bar[data-attempt='2'][data-outcome='failed']")
        clock.advance("2 seconds")
        eventually(lambda: step_status(inst, "cool down") is not None)
        page.wait_for_selector("#timeline .bar[data-attempt='3'][data-outcome='ok']")
        page.wait_for_selector("#timeline .bar[data-kind='sleep']")
        assert page.locator("#timeline .bar.retry-wait").count() == 2
        outcomes = page.locator("#steps tr[data-step='charge card'] li").evaluate_all(
            "els => els.map(e => e.dataset.outcome)"
        )
        assert outcomes == ["failed", "failed", "ok"]
        clock.advance("5 seconds")
        eventually(lambda: step_status(inst, "approval") == "waiting")
        page.wait_for_selector("#timeline .bar[data-kind='wait']")
        page.wait_for_selector("#status [data-status='waiting']")
        _screenshot(page, tmp_path)
        # those updates came from the instance's event stream, which the timer then leaves alone
        stream = url + "/api/workflows/checkout/instances/order-1/history/stream"
        assert stream in requested
        assert page.evaluate("view.kind === 'instance' && view.streaming()") is True

        # pause, resume, terminate (terminate asks for a second click)
        page.click("button[data-action='pause']")
        page.wait_for_selector("#status [data-status='paused']")
        assert inst.status().status == "paused"
        page.click("button[data-action='resume']")
        page.wait_for_selector("#status [data-status='waiting']")
        eventually(lambda: inst.status().status == "waiting")
        page.click("button[data-action='terminate']")
        assert page.inner_text("button[data-action='terminate']") == "Confirm terminate"
        assert inst.status().status == "waiting"
        page.click("button[data-action='terminate']")
        page.wait_for_selector("#status [data-status='terminated']")
        assert inst.status().status == "terminated"
        assert page.is_disabled("button[data-action='terminate']")

        # restart runs it again from the start: a new first attempt that fails
        page.click("button[data-action='restart']")
        page.click("button[data-action='restart']")
        eventually(lambda: step_status(inst, "charge card") == "retrying")
        page.wait_for_selector("#status [data-status='waiting']")
        page.wait_for_function(
            "document.querySelectorAll('#timeline .bar[data-attempt]').length === 1"
        )

        # send-event on another instance completes it, and its output shows
        other = checkout.get("order-2")
        clock.advance("10 seconds")
        eventually(lambda: step_status(other, "approval") == "waiting")
        page.goto(url + "/#/i/checkout/order-2")
        page.wait_for_selector("#timeline .bar[data-kind='wait']")
        page.fill("#event-type", "approved")
        page.fill("#event-payload", '{"user": "ann"}')
        page.click("#send-event")
        page.wait_for_selector("#status [data-status='complete']")
        assert '"approved_by": "ann"' in page.inner_text("#output")
        assert other.status().output["labels"] == ["LBL-mug"]

        # an errored instance shows its error
        refund = rt.register(Refund, name="refund")
        refund.create(id="refund-1", params={"order": 1})
        assert refund.get("refund-1").wait(timeout=10).status == "errored"
        page.goto(url + "/#/i/refund/refund-1")
        page.wait_for_selector("#status [data-status='errored']")
        assert page.is_visible("#error")
        assert page.inner_text("#error") == "NonRetryableError: refund window closed"
        page.wait_for_selector("#timeline .bar[data-attempt='1'][data-outcome='failed']")
        assert page.locator("#timeline .bar.retry-wait").count() == 0

        # an error from the API is shown, not swallowed
        page.fill("#event-type", "not.valid")
        page.click("#send-event")
        page.wait_for_selector("#notice.bad")
        assert "ValidationError" in page.inner_text("#notice")


def _screenshot(page: Any, tmp_path: Path) -> None:
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    keep = os.environ.get(SCREENSHOT_ENV)
    if keep:
        shutil.copyfile(shot, keep)


def test_dashboard_asks_for_the_token_and_sends_it(
    rt: af.Runtime, page: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ACTORFLOW_TOKEN", raising=False)
    checkout = rt.register(Checkout, name="checkout")
    checkout.create(id="order-7", params={"id": 7, "amount": 1, "items": []})
    with serving(rt, token=TOKEN) as url:
        page.goto(url + "/")
        page.wait_for_selector("#token-overlay:not([hidden])")
        page.fill("#token-input", "wrong")
        page.click("#token-form button")
        page.wait_for_selector("#token-overlay:not([hidden])")
        assert page.locator("#instances tr[data-instance]").count() == 0
        page.fill("#token-input", TOKEN)
        page.click("#token-form button")
        page.wait_for_selector("#instances tr[data-instance='order-7']")
        page.click("#instances tr[data-instance='order-7']")
        page.wait_for_selector("#status [data-status]")
        page.click("button[data-action='pause']")
        page.wait_for_selector("#status [data-status='paused']")
    assert checkout.get("order-7").status().status == "paused"


def test_dashboard_forks_an_instance_and_moves_to_the_fork(
    rt: af.Runtime, clock: FakeClock, page: Any
) -> None:
    checkout = rt.register(Checkout, name="checkout")
    origin = checkout.create(id="order-9", params={"id": 9, "amount": 90, "items": ["cup"]})
    clock.advance("1 second")
    clock.advance("2 seconds")
    eventually(lambda: step_status(origin, "cool down") is not None)
    clock.advance("5 seconds")
    eventually(lambda: step_status(origin, "approval") == "waiting")
    with serving(rt) as url:
        page.goto(url + "/#/i/checkout/order-9")
        page.wait_for_selector("#status [data-status='waiting']")
        # the select offers the instance's steps, by name and count
        labels = page.locator("#fork-step option").evaluate_all("els => els.map(e => e.text)")
        assert labels == [
            "fork at step…",
            "fork at charge card",
            "fork at cool down",
            "fork at approval",
        ]
        page.select_option("#fork-step", '{"name":"approval","count":1}')
        page.fill("#fork-id", "order-9b")
        page.click("button[data-action='fork']")
        assert page.inner_text("button[data-action='fork']") == "Confirm fork"
        with pytest.raises(af.InstanceNotFound):
            checkout.get("order-9b")  # nothing happens before the second click
        page.click("button[data-action='fork']")
        # (polled from here: the page's CSP refuses the eval of wait_for_function's polling)
        eventually(lambda: page.evaluate("location.hash") == "#/i/checkout/order-9b")
        page.wait_for_selector("#forked-from")
        assert page.inner_text("#forked-from") == "order-9"
        page.wait_for_selector("#status [data-status='waiting']")
        fork = checkout.get("order-9b")
        assert fork.describe().forked_from == {
            "workflow": "checkout",
            "instance": "order-9",
            "at_step": {"name": "approval", "count": 1},
        }
        assert [s.name for s in fork.steps() if s.forked] == ["charge card", "cool down"]
        # the origin's link leads back; a fork to an id that exists is refused, shown
        page.click("#forked-from")
        eventually(lambda: page.evaluate("location.hash") == "#/i/checkout/order-9")
        page.wait_for_selector("#forked-from", state="detached")
        page.wait_for_selector("#fork-step option:nth-child(4)", state="attached")
        page.select_option("#fork-step", '{"name":"approval","count":1}')
        page.fill("#fork-id", "order-9b")
        page.click("button[data-action='fork']")
        page.click("button[data-action='fork']")
        page.wait_for_selector("#notice.bad")
        assert "InstanceAlreadyExists" in page.inner_text("#notice")
    assert origin.status().status == "waiting"
