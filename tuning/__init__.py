"""Ray Tune sweeps over recipe fields of a pipeline; every trial an MLflow child run.

    python -m tuning --num-samples 4                       # the embedded demo, two_stage
    python -m tuning --pipeline sticker --num-samples 8 --search optuna --data-root SER_Dataset
    python -m tuning --dataname FI --dimensional Emotion6 --lr-range 1e-6 1e-4 --space space.yaml

A sweep drives a pipeline of the one registry (:mod:`pipelines.registry`): ``--pipeline`` is one of
``pipelines.registry.names()``, every flag the sweep does not take itself goes to the pipeline's parser,
and the :class:`~pipelines.registry.Pipeline` object says the rest: ``plan(args)`` (recipe, run options,
data), ``stage_one(plan)``, ``trial(plan, init_from)``, ``sweep_fields(plan)`` and ``sweepable(plan)``.
``python -m tuning`` is :func:`tuning.sweep.parse` then :func:`tuning.driver.run_sweep`.

What is searched: recipe fields, named by path. ``--lr-range``, ``--decay-range`` and ``--alpha-range``
set the fields ``Pipeline.sweep_fields(plan)`` names for those roles (default: a decade either side of
the recipe's value, or the field's bounds); a role the pipeline does not declare is not searched. A
``--space FILE`` adds or overrides dimensions by field path (:mod:`tuning.space`), each one checked
against ``Pipeline.sweepable(plan)``. A trial's config maps those paths to values; the trial applies it
with ``plan.recipe.with_overrides(config)`` on a copy of the plan.

What a trial covers, as the pipeline declares it:

- ``two_stage``: stage two from one fixed stage-one checkpoint (``stage2.optimizer.lr``,
  ``stage2.optimizer.weight_decay``, and with ``--task multi`` ``stage2.loss.va_weight``). Stage one
  is trained once by the driver at the start (into the sweep folder, reused when the sweep resumes),
  or given with ``--stage1-checkpoint DIR``. With ``--mode one_stage`` (or ``dimensional``) a trial is
  that stage, and its fields are ``stage1.*`` (``dimensional.*``). Default metric ``val_pearson_mean``.
- ``sticker``: the LORA / LORA-V training run (``stage.optimizer.lr`` or ``base_lr``,
  ``stage.optimizer.weight_decay``, ``stage.model.options.alpha``: LORA's integer token multiplier).
  Default metric ``val_accuracy``.

A trial's recipe selects (and stops early) on the sweep's metric and direction, and it fits on Ray
Train with ``run_stage(..., test=False)``: trials never touch the test splits. Its workers report the
validation metrics every epoch, which ``TuneReportCallback`` hands to Tune (one Tune iteration per
epoch: ASHA's ``max_t`` is the trial recipe's epochs, rungs at ``grace``, ``2 x grace``, ...). On the
demo a trial trains 4 epochs of a stage unless an epochs flag says otherwise.

MLflow: the sweep is a parent run; every trial is a child run owned by the sweep's own Tune callback
(:mod:`tuning.runs`, public ``MlflowClient`` calls): params are the trial's config (field paths), the
curves its epochs; ASHA-stopped trials end KILLED with ``stopped_by_scheduler=true``, the others
FINISHED (or FAILED), with ``best_<metric>``, ``best_epoch`` and a ``sweep_outcome`` tag.

Resources: the trial function only drives, so it reserves no CPU, only 256 MiB of memory
(``tune.with_resources``: Tune refuses an empty request, and a CPU share would leave Ray Data less
than the whole core each of its tasks needs); each trial's trainer takes ``--num-workers x
--cpus-per-worker`` CPUs. By default as many trials run at once as fit in half the cluster's CPUs
(and, with ``--use-gpu``, in its GPUs), at least one, the other half being left to Ray Data. On a
2-core machine: one trial of 2 workers x 0.5 CPU at a time. Placement groups of stopped trials are
released by :mod:`tuning.cleanup`.

Outputs in ``<storage>/<sweep name>/``: ``trials.csv``, ``best_recipe.yaml`` (the sweep's recipe with
the best trial's values: a ``--recipe`` file), ``best_config.yaml`` (``recipe: best_recipe.yaml`` and
the sweep's data and run flags: ``python pipelines/two_stage.py --config best_config.yaml`` retrains),
and the ranked table on stdout. Re-running the same command resumes an interrupted sweep (Ctrl+C:
exit 130) or reports a finished one again.
"""
