"""Statistics of an MS attention selection, for logging what the selection does.

Input: ``idx`` ``[B, Hs, G, T-m]`` from ``ms_select`` (Hs selection heads, G blocks, T-m
regions selected per block; -1 entries, if any, are ignored). Block g starts at region
``s = T + g*m``; the distance of a selected region j is ``s - j >= 1`` regions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def selection_stats(
    idx: Tensor, *, budget: int, merge: int, local_window: int | None = None
) -> dict[str, float | int | list[float] | list[int]]:
    """Distances, locality and head agreement of a selection; plain Python numbers.

    Args:
        idx: ``[B, Hs, G, T-m]`` selected regions per block (``ms_select``'s output).
        budget, merge: T and m of the selection that produced ``idx``.
        local_window: a selection is local when its distance is at most this many regions;
            default ``T - m``, the window a sliding-window selection would use, so
            ``local_share == 1`` means the selection behaved as a sliding window.

    Returns a dict with
        ``num_selections``: number of selected regions counted (entries != -1);
        ``distance_bucket_lo``: ``[1, 2, 4, ...]``, bucket b holds distances
            ``[2^b, 2^(b+1))``, up to the largest distance possible in these blocks;
        ``distance_hist``: fraction of selections in each bucket (sums to 1);
        ``mean_distance``: mean distance in regions;
        ``local_share``: fraction of selections with distance ``<= local_window``;
        ``head_jaccard``: mean over batch, blocks and pairs of selection heads of
            ``|A & B| / |A | B|`` (1: all heads select the same regions; NaN with one head).
    With no blocks (``G == 0``) the counts are 0, the lists empty and the fractions NaN.
    """
    if not isinstance(idx, Tensor) or idx.dim() != 4 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError("idx must be an integer tensor [B, Hs, G, T-m]")
    if idx.shape[-1] != budget - merge:
        raise ValueError(f"idx's last dim ({idx.shape[-1]}) must be budget - merge = {budget - merge}")
    window = budget - merge if local_window is None else local_window
    if window < 0:
        raise ValueError(f"local_window must be >= 0, got {local_window}")
    B, Hs, G, _ = idx.shape
    nan = float("nan")
    if G == 0:
        return dict(
            num_selections=0,
            distance_bucket_lo=[],
            distance_hist=[],
            mean_distance=nan,
            local_share=nan,
            head_jaccard=nan,
        )

    idx = idx.long()
    valid = idx >= 0
    block_start = budget + merge * torch.arange(G, device=idx.device)  # [G]
    distance = (block_start[:, None] - idx)[valid]  # [num_selections]
    if (distance < 1).any():
        raise ValueError("idx holds a region at or after its block's first region T + g*m")
    count = distance.numel()
    # floor(log2(d)) exactly: frexp gives d = f * 2^e with f in [0.5, 1).
    bucket = torch.frexp(distance.double()).exponent - 1
    num_buckets = int(torch.frexp(torch.tensor(float(block_start[-1]))).exponent)
    hist = torch.bincount(bucket, minlength=num_buckets).double() / max(count, 1)

    num_regions = int(block_start[-1])
    member = torch.zeros(B, G, Hs, num_regions + 1, device=idx.device)  # last column: -1 entries
    member.scatter_(-1, torch.where(valid, idx, num_regions).permute(0, 2, 1, 3), 1.0)
    member = member[..., :num_regions]
    inter = member @ member.transpose(-1, -2)  # [B, G, Hs, Hs]
    size = member.sum(-1)
    union = size[..., :, None] + size[..., None, :] - inter
    pair = torch.triu_indices(Hs, Hs, offset=1, device=idx.device)
    jaccard = (inter / union.clamp_min(1))[..., pair[0], pair[1]]

    return dict(
        num_selections=count,
        distance_bucket_lo=[2**b for b in range(num_buckets)],
        distance_hist=hist.tolist(),
        mean_distance=distance.double().mean().item() if count else nan,
        local_share=(distance <= window).double().mean().item() if count else nan,
        head_jaccard=jaccard.mean().item() if jaccard.numel() else nan,
    )
