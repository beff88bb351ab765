"""Ray Tune sweeps over lr, decay and alpha of a pipeline; every trial an MLflow child run.

    python -m tuning --num-samples 4                       # the embedded demo, two_stage
    python -m tuning --pipeline sticker --num-samples 8 --search optuna --data-root SER_Dataset
    python -m tuning --dataname FI --dimensional Emotion6 --lr-range 1e-6 1e-4 --space space.yaml

What a trial covers:

- ``two_stage``: stage two from one fixed stage-one checkpoint. Stage one is trained once at the
  start with the base flags (into the sweep folder, reused when the sweep resumes), or given with
  ``--stage1-checkpoint DIR``; lr and decay are stage two's (``--stage2-lr``, ``--stage2-decay``)
  and alpha is the stage-two multi-task weight (``--alpha2``, swept with ``--task multi`` only). With ``--mode one_stage`` a trial is stage one and alpha is ``--alpha``.
  Default metric ``val_pearson_mean``.
- ``sticker``: the LORA / LORA-V training run; alpha is LORA's integer token multiplier.
  Default metric ``val_accuracy``.

Every trial copies the base flags, sets its lr / decay / alpha (and ``--space`` extras), builds the
stage with the pipeline's own functions and fits it on Ray Train; its workers report the validation
metrics every epoch, which ``TuneReportCallback`` hands to Tune (one Tune iteration per epoch:
ASHA's ``max_t`` is the trial's epochs, rungs at ``grace``, ``2 x grace``, ...). Trials never touch
the test splits: selection uses validation data only. Every trial is an MLflow child run of the sweep's
parent run, logged from Tune's results by Ray's MLflow integration (:mod:`tuning.runs`): params are
the trial's config, the curves its epochs; ASHA-stopped trials end KILLED with
``stopped_by_scheduler=true``, the others FINISHED (or FAILED), with ``best_<metric>`` and ``best_epoch``.

Resources: the trial function only drives, so it reserves no CPU, only 256 MiB of memory
(``tune.with_resources``: Tune refuses an empty request, and a CPU share would leave Ray Data less
than the whole core each of its tasks needs); each trial's trainer takes ``--num-workers x
--cpus-per-worker`` CPUs. By default as many trials run at once as fit in half the cluster's CPUs
(and, with ``--use-gpu``, in its GPUs), at least one, the other half being left to Ray Data. On a
2-core machine: one trial of 2 workers x 0.5 CPU at a time.

``--space FILE``: extra or overriding dimensions, see :mod:`tuning.space`.

Outputs in ``<storage>/<sweep name>/``: ``trials.csv``, ``best_config.yaml`` (the pipeline's flags
with the best values: ``python pipelines/two_stage.py --config best_config.yaml`` retrains), and the
ranked table on stdout. Re-running the same command resumes an interrupted sweep.
"""
