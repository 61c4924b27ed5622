"""Runbooks right after a count change (the twin over HTTP, virtual time). Every Scale API
count change is a new job version: Nomad updates the workers it keeps in place into a new
deployment and clears and re-watches their health for min_healthy_time (10 s here, the
default update block), while they keep serving. A runbook in that window waits for the
deployment before it scales (Nomad refuses the Scale API meanwhile) and counts the re-watched
workers as serving in its drain capacity check."""

from __future__ import annotations

from typing import Any

from tests.healing.conftest import ZONES, Rig
from tests.healing.test_e2e import check_runbook_text, running_in_zone

JOB, NS = "ml-worker", "ekyc"

SURGE_AND_DRAIN = """name: surge-and-drain
policy: ekyc-ml
parameters: {node: {}}
steps:
  - action: mark_ineligible
  - action: surge
    count: 1
  - action: wait_condition
    condition: surge_healthy
    timeout: 20m
  - action: drain
  - action: wait_condition
    condition: node_drained
  - action: mark_eligible
  - action: release_surge
on_failure:
  - action: release_surge
"""


def _scale_other_zone(rig: Rig) -> str:
    """The autoscaler's count change in zone b, a moment before: returns its deployment id."""
    rig.nomad.scale(JOB, "ml-worker-b", 1, message="autoscaler", namespace=NS)
    status = rig.nomad.job_status(JOB, namespace=NS)
    assert status.active_deployment is not None
    assert {g.name: g.healthy for g in status.groups.values()} == {
        "ml-worker-a": 0, "ml-worker-b": 0,
    }  # fmt: skip
    return status.active_deployment


def _zone_a_node(rig: Rig) -> str:
    return running_in_zone(rig, ZONES[0], exclude="")[0].node_id  # type: ignore[no-any-return]


def test_surge_waits_for_the_deployment_of_a_count_change(rig_factory: Any, tmp_path: Any) -> None:
    rig = rig_factory()
    rb = check_runbook_text(tmp_path, SURGE_AND_DRAIN)
    rig.engine.runbooks[rb.name] = rb
    node = _zone_a_node(rig)
    dep = _scale_other_zone(rig)
    scaled_at = rig.twin.clock.now()

    run = rig.engine.submit(rb.name, {"node": node})
    done = rig.engine.run(run["id"])

    assert done["status"] == "succeeded", done
    surge = next(e for e in rig.twin.cluster.events
                 if e["type"] == "scale" and e["group"] == "ml-worker-a")  # fmt: skip
    assert (surge["time"] - scaled_at).total_seconds() >= 10  # after Nomad's re-watch
    assert rig.nomad.deployment(dep).status == "successful"
    details = {r["action"]: r["detail"] for r in done["results"]}
    assert details["surge"] == "scaled ml-worker/ml-worker-a 2 -> 3 in zone asia-southeast2-a"
    assert details["release_surge"] == "released surge: ml-worker/ml-worker-a -> 2"
    groups = rig.nomad.job_status(JOB, namespace=NS).groups
    assert (groups["ml-worker-a"].desired, groups["ml-worker-b"].desired) == (2, 1)


def test_drain_check_counts_rewatched_workers_as_serving(rig_factory: Any, tmp_path: Any) -> None:
    """Zone a keeps 2 workers, its floor is 1: draining one of them is safe, also while Nomad
    re-watches their health after zone b's count change (Healthy 0 then)."""
    rig = rig_factory()
    rb = check_runbook_text(
        tmp_path,
        "name: drain-only\npolicy: ekyc-ml\nparameters: {node: {}}\n"
        "steps:\n  - action: mark_ineligible\n  - action: drain\n",
    )
    rig.engine.runbooks[rb.name] = rb
    node = _zone_a_node(rig)
    _scale_other_zone(rig)

    done = rig.engine.run(rig.engine.submit(rb.name, {"node": node})["id"])

    assert done["status"] == "succeeded", done
    assert rig.nomad.node(node).draining
