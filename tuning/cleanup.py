"""Give back the CPUs of Ray Train runs whose Tune trial was stopped, with Ray's public APIs only.

When ASHA stops a trial, Tune ends the trial's actor, and the Ray Train controller it owns dies with
it before it can remove its workers' placement group; a placement group made by a non-detached actor
lives as long as the job. Ray Train starts a detached ``PlacementGroupCleaner`` for this, which asks
the State API (served by the dashboard) whether the controller is alive. It calls the State API
without an address, and Ray then looks the cluster up on the host: where more than one Ray instance
runs (a shared machine, parallel test sessions) that lookup raises ``ConnectionError``, which the
cleaner's monitor thread does not catch, so the thread dies and the placement group is never
removed; without the dashboard it cannot ask at all. Then the stopped trial's CPUs stay reserved,
and on a small machine the next trial's Ray Data may never get a core.

So the sweep driver does the cleaner's job itself, through the public State API with this cluster's
address given explicitly: a placement group whose Ray Train workers are all dead (their controller
is gone: workers are owned by it) and that is still there on two looks ``interval_s`` apart (a
controller that ends normally removes it within moments of its workers) is removed. If the State
API is unavailable it warns once and does nothing.
"""
from __future__ import annotations

import logging
import time

from ray.tune import Callback

logger = logging.getLogger("emotion_ray.tuning")

TRAIN_WORKER_CLASS = "RayTrainWorker"   # the actor class of Ray Train's workers, as the State API shows it


def orphaned_placement_groups() -> set[str]:
    """Ids (hex) of live placement groups whose Ray Train workers are all dead."""
    import ray
    from ray.util.state import list_actors

    workers = list_actors(address=ray.get_runtime_context().gcs_address,
                          filters=[("class_name", "=", TRAIN_WORKER_CLASS)], limit=10_000, detail=True,
                          raise_on_missing_output=False)
    states: dict[str, list[str]] = {}
    for worker in workers:
        if worker.placement_group_id:
            states.setdefault(worker.placement_group_id, []).append(worker.state)
    dead = {pg for pg, s in states.items() if all(state == "DEAD" for state in s)}
    if not dead:
        return set()
    table = ray.util.placement_group_table()
    return {pg for pg in dead if table.get(pg, {}).get("state") == "CREATED"}


class Releaser:
    """Removes the placement groups :func:`orphaned_placement_groups` finds on two looks in a row."""

    def __init__(self):
        self.suspects: set[str] = set()
        self.warned = False

    def __call__(self) -> int:
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        try:
            found = orphaned_placement_groups()
        except Exception as exc:  # noqa: BLE001 - no dashboard, or it is busy: never break a sweep
            if not self.warned:
                logger.warning("cannot list Ray Train workers (%s): stopped trials may keep their CPUs", exc)
                self.warned = True
            return 0
        orphans, self.suspects = found & self.suspects, found - self.suspects
        for pg in orphans:
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))
            except Exception as exc:  # noqa: BLE001 - e.g. Ray Train's own cleaner removed it first
                logger.debug("placement group %s: %s", pg, exc)
        return len(orphans)


class ReleaseStoppedTrials(Callback):
    """For ``window_s`` after any trial ends, release orphaned placement groups every ``interval_s``
    (the trial's controller dies a moment after Tune reports the trial done)."""

    def __init__(self, interval_s: float = 2.0, window_s: float = 60.0):
        self.interval_s, self.window_s = interval_s, window_s
        self.until = self.last = 0.0
        self.release = Releaser()

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
            self.release()

    def __getstate__(self):  # pickled with the Tuner's run config: no state worth keeping
        return {"interval_s": self.interval_s, "window_s": self.window_s}

    def __setstate__(self, state):
        self.__init__(**state)


def settle(timeout_s: float = 30.0, interval_s: float = 2.0) -> bool:
    """After the sweep: release orphans until every CPU of the cluster is free again (the last
    stopped trial's controller may die after Tune's loop has ended), at most ``timeout_s``; whether
    every CPU is free."""
    import ray

    release = Releaser()
    deadline = time.monotonic() + timeout_s
    while True:
        if ray.available_resources().get("CPU", 0.0) >= ray.cluster_resources().get("CPU", 0.0) - 1e-6:
            return True
        if time.monotonic() > deadline:
            return False
        release()
        time.sleep(interval_s)
