"""Diagnostics of RPSFT (paper App. C.5 and F): choosing k, rotation, first-order signal, drift, entropy.

* :mod:`~rpsft_core.diagnostics.energy`: per-sample gradients from layer hooks, the Fisher-projected energy
  curve ``y(r)`` and the rank rule (``k: auto`` / ``auto@0.3`` via :func:`parse_k_spec`, :func:`resolve_auto_k`).
* :mod:`~rpsft_core.diagnostics.rotation`: principal angles between base and tuned top-K left subspaces,
  per matrix, layerwise (:func:`rotation_summary`) and rankwise.
* :mod:`~rpsft_core.diagnostics.first_order`: ``<g_W, W_tuned - W_base>`` per layer on ID / OOD data.
* :mod:`~rpsft_core.diagnostics.hidden`: pooled hidden states, centroid drift, 2-D PCA.
* :mod:`~rpsft_core.diagnostics.entropy`: greedy-decoding token entropy and its KDE.
* :mod:`~rpsft_core.diagnostics.run`: :func:`diagnose`, behind ``rpsft diagnose``.

Nothing here imports Ray or MLflow; :func:`rotation_metrics` flattens a rotation summary for any logger.
"""

from rpsft_core.diagnostics.energy import (
    DEFAULT_PROBE,
    AutoK,
    EnergyAccumulator,
    EnergyCurve,
    EnergyReport,
    capture_layer_io,
    energy_curves,
    gradient_energy,
    is_auto_k,
    parse_k_spec,
    per_sample_gradients,
    resolve_auto_k,
    suggested_rank,
)
from rpsft_core.diagnostics.entropy import generation_entropy, kde
from rpsft_core.diagnostics.first_order import dataset_gradients, first_order_signal
from rpsft_core.diagnostics.hidden import centroid_drift, pca_2d, pooled_hidden_states
from rpsft_core.diagnostics.prompts import PromptExample, load_prompt_examples, read_prompt_examples
from rpsft_core.diagnostics.rotation import (
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
from rpsft_core.diagnostics.run import diagnose, format_table

__all__ = [
    "DEFAULT_PROBE",
    "AutoK",
    "EnergyAccumulator",
    "EnergyCurve",
    "EnergyReport",
    "PromptExample",
    "capture_layer_io",
    "centroid_drift",
    "dataset_gradients",
    "diagnose",
    "energy_curves",
    "first_order_signal",
    "format_table",
    "generation_entropy",
    "gradient_energy",
    "is_auto_k",
    "kde",
    "left_subspace",
    "left_subspaces",
    "load_prompt_examples",
    "matrix_rotation",
    "mean_angle_deg",
    "parse_k_spec",
    "pca_2d",
    "per_sample_gradients",
    "pooled_hidden_states",
    "principal_angles",
    "protected_drift",
    "rankwise_rotation",
    "read_prompt_examples",
    "resolve_auto_k",
    "rotation_metrics",
    "rotation_summary",
    "suggested_rank",
]
