"""Diagnostics of RPSFT checkpoints (paper App. F): rotation, first-order signal, hidden drift, entropy, plots.

The rank rule that chooses ``k`` (``k: auto``, the energy curve) is part of the method and lives in the core,
:mod:`rpsft.core.rank_rule`; ``rpsft diagnose --what energy`` reports it beside these.

* :mod:`~rpsft.evaluation.diagnostics.rotation`: principal angles between base and tuned top-K left subspaces,
  per matrix, layerwise (:func:`rotation_summary`) and rankwise.
* :mod:`~rpsft.evaluation.diagnostics.first_order`: ``<g_W, W_tuned - W_base>`` per layer on ID / OOD data.
* :mod:`~rpsft.evaluation.diagnostics.hidden`: pooled hidden states, centroid drift, 2-D PCA.
* :mod:`~rpsft.evaluation.diagnostics.entropy`: greedy-decoding token entropy and its KDE.
* :mod:`~rpsft.evaluation.diagnostics.protocol`: the :class:`Diagnostic` protocol every diagnostic follows;
  :mod:`~rpsft.evaluation.diagnostics.catalog`: the five diagnostics of ``rpsft diagnose``.
* :mod:`~rpsft.evaluation.diagnostics.run`: :func:`diagnose`, the loop behind ``rpsft diagnose``.
* :mod:`~rpsft.evaluation.diagnostics.plots`: the PNG figures (matplotlib, the ``diagnostics`` extra).

Nothing here imports Ray or MLflow; :func:`rotation_metrics` flattens a rotation summary for any logger.
"""

from rpsft.evaluation.diagnostics.entropy import generation_entropy, kde
from rpsft.evaluation.diagnostics.first_order import dataset_gradients, first_order_signal
from rpsft.evaluation.diagnostics.hidden import centroid_drift, pca_2d, pooled_hidden_states
from rpsft.evaluation.diagnostics.protocol import DiagnoseContext, Diagnostic
from rpsft.evaluation.diagnostics.rotation import (
    left_subspace,
    left_subspaces,
    matrix_rotation,
    mean_angle_deg,
    principal_angles,
    protected_drift,
    rankwise_rotation,
    rotation_metrics,
    rotation_summary,
)
from rpsft.evaluation.diagnostics.run import diagnose, format_table

__all__ = [
    "DiagnoseContext",
    "Diagnostic",
    "centroid_drift",
    "dataset_gradients",
    "diagnose",
    "first_order_signal",
    "format_table",
    "generation_entropy",
    "kde",
    "left_subspace",
    "left_subspaces",
    "matrix_rotation",
    "mean_angle_deg",
    "pca_2d",
    "pooled_hidden_states",
    "principal_angles",
    "protected_drift",
    "rankwise_rotation",
    "rotation_metrics",
    "rotation_summary",
]
