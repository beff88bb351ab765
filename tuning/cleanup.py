"""Give back the CPUs of Ray Train runs whose Tune trial was stopped.

When ASHA stops a trial, Tune ends the trial's actor; the Ray Train controller it owns dies with it
before it can remove its workers' placement group, and a placement group made by a (non-detached)
actor lives as long as the job. Ray Train's own ``PlacementGroupCleaner`` watches for this through
the dashboard's State API, which embedded and test setups (``include_dashboard=False``) lack; then
the stopped trial's CPUs stay reserved, and on a small machine the next trial's Ray Data never gets
a core. The sweep driver therefore removes this job's placement groups whose creator actor has died
(never those created by the driver itself, such as Tune's own trial reservations).

It reads the GCS placement-group table through Ray's private ``global_state_accessor`` (public
``placement_group_table()`` does not show the creator); on any mismatch with another Ray version
it warns once and does nothing.
"""
from __future__ import annotations

import logging
import time

from ray.tune import Callback

logger = logging.getLogger("emotion_ray.tuning")


def orphaned_placement_groups() -> list:
    """This job's live placement groups whose creator was an actor that is now dead."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    table = gcs_pb2.PlacementGroupTableData
    orphans = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        info = table.FromString(raw)
        if (info.state != table.REMOVED and info.creator_actor_dead and not info.is_detached
                and not ray.ActorID(info.creator_actor_id).is_nil() and info.creator_job_id.hex() == job):
            orphans.append(ray.PlacementGroupID(info.placement_group_id))
    return orphans


def release_orphaned_placement_groups() -> int:
    """Remove the placement groups of :func:`orphaned_placement_groups`; returns how many."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        orphans = orphaned_placement_groups()
    except Exception as exc:  # noqa: BLE001 - a private API: never let it break a sweep
        if not getattr(release_orphaned_placement_groups, "warned", False):
            logger.warning("cannot inspect placement groups (%s): stopped trials may keep their CPUs", exc)
            release_orphaned_placement_groups.warned = True  # type: ignore[attr-defined]
        return 0
    for pg_id in orphans:
        try:
            remove_placement_group(PlacementGroup(pg_id))
        except Exception as exc:  # noqa: BLE001 - e.g. Ray Train's own cleaner removed it first
            logger.debug("placement group %s: %s", pg_id.hex(), exc)
    return len(orphans)


class ReleaseStoppedTrials(Callback):
    """For ``window_s`` after any trial ends, release orphaned placement groups every ``interval_s``
    (the trial's controller dies a moment after Tune reports the trial done)."""

    def __init__(self, interval_s: float = 1.0, window_s: float = 120.0):
        self.interval_s, self.window_s = interval_s, window_s
        self.until = self.last = 0.0

    def _arm(self) -> None:
        self.until = time.monotonic() + self.window_s

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._arm()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._arm()

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now < self.until and now - self.last >= self.interval_s:
            self.last = now
            release_orphaned_placement_groups()


def settle(timeout_s: float = 15.0, poll_s: float = 0.5) -> None:
    """After the sweep: release orphans until every CPU of the cluster is free again (the last
    stopped trial's controller may die after Tune's loop has ended), or ``timeout_s`` passes."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        release_orphaned_placement_groups()
        if ray.available_resources().get("CPU", 0.0) >= ray.cluster_resources().get("CPU", 0.0) - 1e-6 \
                or time.monotonic() > deadline:
            return
        time.sleep(poll_s)
