"""The five diagnostics of ``rpsft diagnose``, each a :class:`~rpsft.evaluation.diagnostics.protocol.Diagnostic`.

========== ====================================== ===============================================
name       ``diagnostics.json`` entries           figures
========== ====================================== ===============================================
energy     ``energy``                             ``energy.png``
rotation   ``rotation``, ``rotation_rankwise``    ``rotation_layerwise.png``, ``rotation_rankwise.png``
first-order ``first_order``                       ``first_order.png``
hidden     ``hidden``                             ``hidden_pca.png``
entropy    ``entropy``                            ``entropy_kde.png``
========== ====================================== ===============================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from rpsft.core.model_parts import resolve_names
from rpsft.core.rank_rule import energy_curves
from rpsft.evaluation.diagnostics import entropy as entropy_mod
from rpsft.evaluation.diagnostics import first_order as fo_mod
from rpsft.evaluation.diagnostics import hidden as hidden_mod
from rpsft.evaluation.diagnostics import plots
from rpsft.evaluation.diagnostics import rotation as rot_mod
from rpsft.evaluation.diagnostics.protocol import DiagnoseContext, Diagnostic, FigureMaker
from torch import nn


class Energy(Diagnostic):
    """The rank rule's energy curve of the probed matrices on the OOD prompts (all prompts without OOD ones)."""

    name = "energy"
    needs_tuned = False

    def start(self, context: DiagnoseContext) -> None:
        settings = context.settings
        ood = [k for k, v in context.datasets.items() if v.role == "ood"] or list(context.datasets)
        examples = [e for k in ood for e in context.datasets[k].examples]
        context.log(
            f"energy: {len(context.probes)} matrix(es) on {len(examples)} prompt(s) of {', '.join(ood)}"
        )
        report = energy_curves(
            context.base_model,
            context.tokenizer,
            examples,
            context.probes,
            target=settings.energy_target,
            batch_size=settings.batch_size,
            max_length=settings.max_length,
        )
        self._energy = {**report.to_dict(points=256), "datasets": ood}

    def results(self) -> dict[str, Any]:
        return {"energy": self._energy}

    def figures(self, results: Mapping[str, Any]) -> dict[str, FigureMaker]:
        return {"energy.png": lambda path: plots.plot_energy(results["energy"], path)}


class Rotation(Diagnostic):
    """Top-K left-subspace rotation per matrix and layer, and by prefix rank for the case-study matrix."""

    name = "rotation"
    needs_data = False

    def start(self, context: DiagnoseContext) -> None:
        self._context = context
        settings = context.settings
        self._names = resolve_names(context.base_model, settings.layers)
        context.log(f"rotation: base top-{settings.top_k} subspaces of {len(self._names)} matrices")
        self._base_subspaces = rot_mod.left_subspaces(
            context.base_model, self._names, top_k=settings.top_k, method=settings.basis_method
        )
        self._summaries: dict[str, Any] = {}
        self._rankwise: dict[str, Any] = {}

    def measure(self, label: str, model: nn.Module) -> None:
        context, settings = self._context, self._context.settings
        summary = rot_mod.rotation_summary(
            context.base_weights,
            model,
            self._names,
            top_k=settings.top_k,
            method=settings.basis_method,
            base_subspaces=self._base_subspaces,
        )
        self._summaries[label] = summary
        case = context.case_matrix
        tuned_weight = dict(model.named_parameters(remove_duplicate=False))[case]
        self._rankwise[label] = rot_mod.rankwise_rotation(
            context.base_weights[case],
            tuned_weight,
            top_k=settings.top_k,
            method=settings.basis_method,
            ranks=rot_mod.rank_grid(
                rot_mod.rotation_rank(tuned_weight.shape, settings.top_k), settings.rank_points
            ),
        )
        context.log(
            f"rotation: {label} mean {summary['mean_deg']:.4f} deg over {summary['n_matrices']} matrices"
        )

    def results(self) -> dict[str, Any]:
        return {
            "rotation": self._summaries,
            "rotation_rankwise": {"matrix": self._context.case_matrix, "models": self._rankwise},
        }

    def figures(self, results: Mapping[str, Any]) -> dict[str, FigureMaker]:
        rankwise = results["rotation_rankwise"]
        return {
            "rotation_layerwise.png": lambda path: plots.plot_rotation_layerwise(results["rotation"], path),
            "rotation_rankwise.png": lambda path: plots.plot_rotation_rankwise(
                rankwise["models"], rankwise["matrix"], path
            ),
        }


class FirstOrder(Diagnostic):
    """``<g_W, W_tuned - W_base>`` per layer, ``g_W`` the base model's loss gradient on each prompt set."""

    name = "first-order"

    def start(self, context: DiagnoseContext) -> None:
        self._context = context
        settings = context.settings
        names = resolve_names(context.base_model, settings.layers)
        self._gradients = {}
        for key, prompts in context.datasets.items():
            context.log(f"first-order: base gradients on {key}")
            self._gradients[key] = fo_mod.dataset_gradients(
                context.base_model,
                context.tokenizer,
                prompts.examples,
                names,
                batch_size=settings.batch_size,
                max_length=settings.max_length,
            )
        self._signals: dict[str, Any] = {}

    def measure(self, label: str, model: nn.Module) -> None:
        datasets, base_weights = self._context.datasets, self._context.base_weights
        self._signals[label] = {
            key: {"role": datasets[key].role, **fo_mod.first_order_signal(grads, base_weights, model)}
            for key, grads in self._gradients.items()
        }

    def results(self) -> dict[str, Any]:
        return {"first_order": self._signals}

    def figures(self, results: Mapping[str, Any]) -> dict[str, FigureMaker]:
        roles = self._context.roles()
        return {"first_order.png": lambda path: plots.plot_first_order(results["first_order"], roles, path)}


class Hidden(Diagnostic):
    """Mean-pooled final hidden states per prompt set: each model's centroid drift from the base, 2-D PCA."""

    name = "hidden"

    def start(self, context: DiagnoseContext) -> None:
        self._context = context
        self._states: dict[str, dict[str, torch.Tensor]] = {key: {} for key in context.datasets}
        self.measure("base", context.base_model)

    def measure(self, label: str, model: nn.Module) -> None:
        settings = self._context.settings
        for key, prompts in self._context.datasets.items():
            self._states[key][label] = hidden_mod.pooled_hidden_states(
                model,
                self._context.tokenizer,
                prompts.examples,
                batch_size=settings.batch_size,
                max_length=settings.max_length,
            )

    def results(self) -> dict[str, Any]:
        hidden = {}
        for key, per_model in self._states.items():
            pca = hidden_mod.pca_2d(per_model)
            hidden[key] = {
                "role": self._context.datasets[key].role,
                "distance": hidden_mod.centroid_drift(per_model),
                "pca_distance": pca["distance"],
                "pca": pca,
            }
        return {"hidden": hidden}

    def figures(self, results: Mapping[str, Any]) -> dict[str, FigureMaker]:
        pca = {key: value["pca"] for key, value in results["hidden"].items()}
        return {"hidden_pca.png": lambda path: plots.plot_hidden_pca(pca, path)}


class Entropy(Diagnostic):
    """Mean next-token entropy along greedy decoding, per prompt, per model and prompt set."""

    name = "entropy"

    def start(self, context: DiagnoseContext) -> None:
        self._context = context
        self._entropies: dict[str, dict[str, Any]] = {key: {} for key in context.datasets}
        self.measure("base", context.base_model)

    def measure(self, label: str, model: nn.Module) -> None:
        settings = self._context.settings
        for key, prompts in self._context.datasets.items():
            self._context.log(f"entropy: {label} on {key}")
            self._entropies[key][label] = entropy_mod.generation_entropy(
                model,
                self._context.tokenizer,
                prompts.examples,
                max_new_tokens=settings.max_new_tokens,
                batch_size=settings.batch_size,
                max_length=settings.max_length,
            )

    def results(self) -> dict[str, Any]:
        datasets = self._context.datasets
        return {
            "entropy": {
                key: {label: {"role": datasets[key].role, **value} for label, value in per_model.items()}
                for key, per_model in self._entropies.items()
            }
        }

    def figures(self, results: Mapping[str, Any]) -> dict[str, FigureMaker]:
        return {"entropy_kde.png": lambda path: plots.plot_entropy(results["entropy"], path)}


DIAGNOSTICS: tuple[type[Diagnostic], ...] = (Energy, Rotation, FirstOrder, Hidden, Entropy)
"""Every diagnostic, in the order they run and appear in ``diagnostics.json``."""
