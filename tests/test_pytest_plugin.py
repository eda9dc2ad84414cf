"""The pytest plugin: a user's test of their own workflow fits in a few lines.

Each test writes a user's test file with ``pytester`` and runs pytest on it;
the plugin comes in through its ``pytest11`` entry point, as in any project
that installs actorflow.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]


def test_the_fixtures_run_a_users_workflow_under_fake_time(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import actorflow as af

        class Trial(af.Workflow):
            def run(self, event, step):
                step.sleep("trial", "14 days")
                return step.do("convert", lambda: "paid")

        def test_trial_converts(actorflow_runtime, fake_clock):
            inst = actorflow_runtime.register(Trial).create(id="c1")
            inst.wait_for_status("waiting")
            fake_clock.advance("13 days")
            assert inst.status().status == "waiting"
            fake_clock.advance("1 day")
            assert inst.wait(timeout=10).output == "paid"

        def test_each_test_gets_a_fresh_runtime(actorflow_runtime, tmp_path):
            assert actorflow_runtime.data_dir == str(tmp_path / "actorflow-data")
            assert actorflow_runtime.register(Trial).list() == []
        """
    )
    result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_the_marker_configures_clock_and_runtime(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        import actorflow as af

        class Nap(af.Workflow):
            def run(self, event, step):
                step.sleep("nap", "1 year")
                return "rested"

        @pytest.mark.actorflow(autojump=True, limits=af.Limits(max_concurrent=1))
        def test_autojump_and_limits(actorflow_runtime, fake_clock):
            assert actorflow_runtime.limits.max_concurrent == 1
            start = fake_clock.now()
            assert actorflow_runtime.register(Nap).create().wait(timeout=10).output == "rested"
            assert fake_clock.now() - start >= 365 * 86400

        @pytest.mark.actorflow(1)
        def test_positional_options_are_refused(actorflow_runtime):
            pass
        """
    )
    result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*keyword options only*"])


def test_actorflow_faults_are_cleared_after_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        import actorflow as af

        class Counter(af.DurableObject):
            def add(self):
                n = self.ctx.storage.get("n", 0) + 1
                self.ctx.storage.put("n", n)
                return n

        def test_a_lost_reply(actorflow_runtime, actorflow_faults):
            stub = actorflow_runtime.durable_objects(Counter).get_by_name("c")
            actorflow_faults.drop_calls(stub, reply=True, times=None)
            with pytest.raises(af.DeliveryError):
                stub.add()
            pytest.shared = (actorflow_runtime, stub)

        def test_then_nothing_is_left(actorflow_runtime):
            rt, _ = pytest.shared
            assert rt.closed
            stub = actorflow_runtime.durable_objects(Counter).get_by_name("c")
            assert stub.add() == 1
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_node_factory_runs_a_users_app_and_kills_its_nodes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        shop_app="""
        import actorflow as af

        class Order(af.Workflow):
            def run(self, event, step):
                step.do("reserve", lambda: "reserved")
                ok = step.wait_for_event("payment", "paid", timeout="1 hour")
                return step.do("ship", lambda: f"shipped {ok.payload['ref']}")

        def factory(data_dir):
            rt = af.Runtime(data_dir)
            rt.register(Order, name="order")
            return rt
        """,
        test_shop="""
        def test_an_order_survives_a_killed_node(node_factory):
            first = node_factory("shop_app:factory", lease_timeout=1)
            first.create("order", id="o1")
            assert first.wait_until_idle(timeout=30)
            first.kill()                              # SIGKILL mid-workflow
            second = node_factory("shop_app:factory", lease_timeout=1)
            second.send_event("order", "o1", "paid", {"ref": "p-1"})
            st = second.wait_for_status("order", "o1", "complete", timeout=60)
            assert st["output"] == "shipped p-1"
            with open("pids.txt", "w") as f:
                f.write(f"{first.pid} {second.pid}")
            assert {n.data_dir for n in node_factory.nodes} == {str(node_factory.data_dir)}
        """,
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    for pid in (pytester.path / "pids.txt").read_text().split():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)  # killed and reaped at teardown
