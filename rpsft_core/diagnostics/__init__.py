"""Deprecated: the names ``rpsft_core.diagnostics`` held now live in two places.

* The rank rule of ``k: auto`` stays in the core: :mod:`rpsft_core.rank_rule` (``parse_k_spec``, ``AutoK``,
  ``resolve_auto_k``, the energy curves) and :mod:`rpsft_core.prompts` (the prompts it reads). Reading them
  from here still works, with a ``DeprecationWarning``.
* The analysis tools (rotation, first-order signal, hidden drift, entropy, plots, ``diagnose``) moved to
  :mod:`evaluation.diagnostics`; the core does not import them, so reading one from here raises an
  ``AttributeError`` that names its new module.
"""

from __future__ import annotations

import warnings

_RANK_RULE = (
    "DEFAULT_PROBE",
    "AutoK",
    "EnergyAccumulator",
    "EnergyCurve",
    "EnergyReport",
    "capture_layer_io",
    "energy_curves",
    "gradient_energy",
    "is_auto_k",
    "parse_k_spec",
    "per_sample_gradients",
    "resolve_auto_k",
    "suggested_rank",
)
_PROMPTS = ("PromptExample", "load_prompt_examples", "read_prompt_examples")
_MOVED_TO_EVALUATION = {
    "evaluation.diagnostics.entropy": ("generation_entropy", "kde"),
    "evaluation.diagnostics.first_order": ("dataset_gradients", "first_order_signal"),
    "evaluation.diagnostics.hidden": ("centroid_drift", "pca_2d", "pooled_hidden_states"),
    "evaluation.diagnostics.rotation": (
        "left_subspace",
        "left_subspaces",
        "matrix_rotation",
        "mean_angle_deg",
        "principal_angles",
        "protected_drift",
        "rankwise_rotation",
        "rotation_metrics",
        "rotation_summary",
    ),
    "evaluation.diagnostics.run": ("diagnose", "format_table"),
}

__all__ = [*_RANK_RULE, *_PROMPTS]


def __getattr__(name: str):
    if name in _RANK_RULE or name in _PROMPTS:
        from rpsft_core import prompts, rank_rule

        home = rank_rule if name in _RANK_RULE else prompts
        warnings.warn(
            f"rpsft_core.diagnostics.{name} moved to {home.__name__}.{name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(home, name)
    for module, names in _MOVED_TO_EVALUATION.items():
        if name in names:
            raise AttributeError(
                f"rpsft_core.diagnostics.{name} moved to {module}.{name} (the analysis tools live beside "
                f"evaluation now). Fix: from {module} import {name}"
            )
    raise AttributeError(f"module 'rpsft_core.diagnostics' has no attribute {name!r}")
