"""Causality audit: do outputs at positions <= t depend on tokens after t?

For several cut points ``t``, the tokens after ``t`` are replaced by fresh random tokens and the
logits at positions ``<= t`` are compared with those of the original sequence. A causal model
gives the same logits up to floating-point noise (the same kernels run on the same shapes, so
the tolerance is tight). The audit length is chosen long enough that a sparse attention's
block schedule is really exercised (blocks beyond the dense prefix, cut points inside them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class CausalityReport:
    causal: bool
    declared_causal: bool
    length: int
    cut_points: list[int]
    max_abs_diff: float
    tolerance: float

    def as_dict(self) -> dict:
        return asdict(self)


def audit_length(model, minimum: int = 64) -> int:
    """A length at which every core's pattern is exercised (``AttentionCore.audit_length``)."""
    return max(core.audit_length(minimum) for core in model.cores)


def declared_causal(model) -> bool:
    return all(core.causal for core in model.cores)


@torch.no_grad()
def causality_audit(
    model, *, length: int | None = None, n_cuts: int = 4, seed: int = 0, device="cpu"
) -> CausalityReport:
    was_training = model.training
    model.eval()
    try:
        L = length or audit_length(model)
        g = torch.Generator().manual_seed(seed)
        V = model.config.vocab_size
        x = torch.randint(0, V, (1, L), generator=g)
        # Cut points spread over the sequence, avoiding region boundaries so that a cut falls
        # inside a region and inside a block.
        cuts = sorted({int(L * f) + 3 for f in torch.linspace(0.3, 0.9, n_cuts).tolist()})
        cuts = [t for t in cuts if t < L - 1]
        base = model(x.to(device)).float()
        scale = float(base.abs().max())
        tol = 1e-4 * max(1.0, scale)
        worst = 0.0
        for t in cuts:
            y = x.clone()
            y[:, t + 1 :] = torch.randint(0, V, (1, L - t - 1), generator=g)
            out = model(y.to(device)).float()
            worst = max(worst, float((out[:, : t + 1] - base[:, : t + 1]).abs().max()))
        return CausalityReport(
            causal=worst <= tol, declared_causal=declared_causal(model), length=L,
            cut_points=cuts, max_abs_diff=worst, tolerance=tol,
        )  # fmt: skip
    finally:
        model.train(was_training)
