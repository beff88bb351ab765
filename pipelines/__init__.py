"""Training pipelines on Ray Train V2.

The pipelines use Ray Train V2's API (the controller, ``ray.train.get_context`` / ``report`` semantics
and the placement-group lifecycle). It is the default from Ray 2.60 (the pinned minimum); the variable
is set here too, before any ``ray.train`` import in this package, so that the driver and the local Ray
it starts (whose workers inherit the environment) agree on it.
"""
import os

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
