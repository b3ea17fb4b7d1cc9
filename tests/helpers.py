"""Shared test helpers: matrices with a decaying spectrum and subspace angles (independent of rpsft.core), a
scripted lm-eval model."""

from collections import defaultdict

import torch


def decaying_matrix(
    m: int, n: int, *, decay: float = 0.9, seed: int = 0, dtype=torch.float64
) -> torch.Tensor:
    """W = U diag(s) V^T with s_i = decay^i (a clear spectral gap at every index)."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    s = decay ** torch.arange(r, dtype=torch.float64)
    return (u * s) @ v.T if dtype is None else ((u * s) @ v.T).to(dtype)


def mean_angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean principal angle between the column spaces of two orthonormal bases."""
    cos = torch.linalg.svdvals(a.double().T @ b.double()).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos)).mean().item()


def tradeoff_by_hand(base, record, benches, indices=None):
    """G_id and F_ood computed by hand, independently of rpsft.evaluation.intervals: per benchmark the weighted mean of
    the tuned minus the base model's NLL item scores (ID) or the base's minus the tuned (OOD), on ``indices``
    (``{(suite, bench): item indices}``) or all items; then the mean over each suite's ``benches``."""
    import numpy as np

    out = {}
    for suite, sign in (("id", 1.0), ("ood", -1.0)):
        diffs = []
        for bench in benches[suite]:
            b = np.asarray(base[f"{suite}_nll"][bench])
            t = np.asarray(record[f"{suite}_nll"][bench])
            idx = slice(None) if indices is None else indices[(suite, bench)]
            diffs.append(sign * (t[idx, 0].sum() / t[idx, 1].sum() - b[idx, 0].sum() / b[idx, 1].sum()))
        out[suite] = float(np.mean(diffs))
    return out["id"], out["ood"]


def scripted_lm(respond):
    """An lm-eval LM whose i-th sample for a prompt is ``respond(doc, i)``; it keeps the prompts it saw
    (``contexts``) and counts its calls. It cannot score log-likelihoods."""
    from lm_eval.api.model import LM

    class ScriptedLM(LM):
        def __init__(self):
            super().__init__()
            self.seen = defaultdict(int)
            self.calls = 0
            self.contexts = []

        def generate_until(self, requests, disable_tqdm=False):
            self.calls += 1
            out = []
            for req in requests:
                context, _ = req.args
                i = self.seen[context]
                self.seen[context] += 1
                self.contexts.append(context)
                out.append(respond(req.doc, i))
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return "".join(f"<{m['role']}>{m['content']}" for m in chat_history) + "<assistant>"

        @property
        def tokenizer_name(self):
            return "scripted"

    return ScriptedLM()
