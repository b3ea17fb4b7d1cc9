"""The typed sweep configuration, one module per part: :mod:`~rpsft.sweeps.config.sweep` (``SweepConfig`` and its
readers), :mod:`~rpsft.sweeps.config.space` (the searched space and the references),
:mod:`~rpsft.sweeps.config.evaluation`, :mod:`~rpsft.sweeps.config.sections` (objective, search, scheduler,
failure, keep, storage) and :mod:`~rpsft.sweeps.config.errors` (the error and the sweep name)."""
