"""Named benchmark cases for MS attention and their FLOP counts.

A case is one shape (B, L, Hq, Hkv, D) with one MS setting (region w, budget T, merge m,
scope, pe). FLOPs are counted, not measured: attention does 2 matmuls of 2*D flops per
query-key pair forward and 5 backward (FlashAttention's convention: backward = 2.5 x forward).
``dense_pairs`` counts the causal pairs of dense attention; ``ms_pairs`` the pairs MS attention
actually computes (dense prefix, then per block its selected tokens plus its own causal part).
Reporting both keeps a sparse kernel's speed honest: TFLOP/s on computed pairs is its
efficiency; "dense-equivalent" TFLOP/s is the speed a user sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ms_attention.torch_impl import ms_pair_count

KILO = 1024

SETTINGS = {
    "paper": (16, 512, 64),  # w, T, m: the paper's fine-tuning default
    "sparse": (64, 64, 8),
    "tiny": (4, 4, 2),  # the CPU smoke run's
    "prefix": (16, 16384, 64),  # dense causal through MS's kernels (n <= T up to 256K): a diagnostic
}
LENGTHS = {
    "8K": 8 * KILO,
    "32K": 32 * KILO,
    "64K": 64 * KILO,
    "128K": 128 * KILO,
    "256K": 256 * KILO,
    "61": 61,
}


@dataclass(frozen=True)
class Case:
    """One benchmark case; ``name`` is its id in result files."""

    name: str
    L: int
    Hkv: int
    setting: str
    B: int = 1
    Hq: int = 32
    D: int = 128
    scope: str = "head"
    pe: str = "pre"

    @property
    def region(self) -> int:
        return SETTINGS[self.setting][0]

    @property
    def budget(self) -> int:
        return SETTINGS[self.setting][1]

    @property
    def merge(self) -> int:
        return SETTINGS[self.setting][2]

    def dense_pairs(self) -> int:
        return self.B * self.Hq * self.L * (self.L + 1) // 2

    def s2_group(self) -> int:
        """LongLoRA's S2 group: a quarter of the length (its default ratio)."""
        return self.L // 4

    def s2_pairs(self) -> int:
        """S2 (with LongLoRA's wrap): causal attention inside groups of G for every head."""
        G = self.s2_group()
        return self.B * self.Hq * (self.L // G) * G * (G + 1) // 2

    def ms_pairs(self) -> int:
        return self.B * self.Hq * ms_pair_count(self.L, self.region, self.budget, self.merge)

    def flops(self, pairs: int, pass_: str) -> float:
        """FLOPs of ``pass_`` in {"fwd", "bwd", "fwd+bwd"} over ``pairs`` query-key pairs."""
        fwd = 4.0 * self.D * pairs
        return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[pass_]


def registry(
    lengths=("8K", "32K", "64K", "128K"),
    kv_heads=(8, 32),
    settings=("paper", "sparse"),
    scope: str = "head",
    pe: str = "pre",
    Hq: int = 32,
    D: int = 128,
) -> dict[str, Case]:
    """The issue's grid: B=1, 32 query heads, D=128, bf16, by length, kv heads and setting."""
    cases = {}
    for length in lengths:
        for hkv in kv_heads:
            for setting in settings:
                name = f"{setting}-L{length}-kv{hkv}-{scope}-{pe}"
                cases[name] = Case(name, LENGTHS[length], hkv, setting, Hq=Hq, D=D, scope=scope,
                                   pe=pe)  # fmt: skip
    return cases


PRESETS = {
    # Cases run in this order: the lengths the targets name come before 64K.
    "h100": dict(lengths=("8K", "32K", "128K", "64K")),
    "h100_long": dict(lengths=("32K", "128K", "256K")),
    # Issue 14's lengths and kv heads: both settings at 32K-256K, 8 kv heads.
    "h100_issue14": dict(lengths=("32K", "64K", "128K", "256K"), kv_heads=(8,)),
    "smoke": dict(lengths=("8K",), kv_heads=(8,)),
    "cpu": dict(lengths=("61",), kv_heads=(1,), settings=("tiny",), Hq=2, D=32),
}
