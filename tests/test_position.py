"""Position schemes: frequencies and ids against HF and closed forms, CRD NTK's schedule, configs.

Shapes: B batch, L tokens, H heads, D head_dim; ids int64 [B, L]; tables float32 [B, L, D].
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ctxlab.kernels.rope import apply_rotary
from ctxlab.position import (
    CRDNTK,
    MAX_EXACT_POSITION,
    DynamicNTK,
    LinearPI,
    NTKAware,
    PoSE,
    PositionScheme,
    Rope,
    Selected,
    YaRN,
)

CFG_DIR = Path(__file__).resolve().parents[1] / "cfg" / "position"


def closed_form_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """base^(-2i/D) in float64, written out independently of the code under test."""
    values = [base ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    return torch.tensor(values, dtype=torch.float64)


def reference_cos_sin(ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0):
    """float64 tables [B, L, D] for these ids and frequencies."""
    angles = ids.double()[..., None] * inv_freq.double()
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def hf_rotary(scheme: PositionScheme, max_position_embeddings: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=2 * scheme.head_dim,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=scheme.head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=dict(scheme.hf_rope_scaling()),
    )
    return LlamaRotaryEmbedding(config)


def offset_ids(length: int, offsets: list[int]) -> torch.Tensor:
    return torch.arange(length) + torch.tensor(offsets)[:, None]  # [B, L]


HF_CASES = {
    "rope-D64": (lambda: Rope(64, 10000.0), 128, [0, 1000]),
    "rope-D60-theta1e5": (lambda: Rope(60, 1e5), 128, [0, 2500]),
    "pi-s4": (lambda: LinearPI(64, 10000.0, 4.0), 128, [0, 1000]),
    "pi-s2.5-D100": (lambda: LinearPI(100, 5e5, 2.5), 128, [7, 3000]),
    "ntk-s4": (lambda: NTKAware(64, 10000.0, 4.0), 128, [0, 1000]),
    "dynamic-below-original": (lambda: DynamicNTK(64, 10000.0, 4.0, 256), 256, [0, 100]),
    "dynamic-above-original": (lambda: DynamicNTK(64, 10000.0, 4.0, 128), 128, [0, 1000]),
    "dynamic-s8-D60": (lambda: DynamicNTK(60, 1e5, 8.0, 64), 64, [5, 700]),
    "yarn-s4": (lambda: YaRN(64, 10000.0, 4.0, 128), 512, [0, 1000]),
    "yarn-s16-no-truncate": (lambda: YaRN(64, 1e4, 16.0, 2048, truncate=False), 32768, [0, 3000]),
    "yarn-deepseek-mscale": (
        lambda: YaRN(60, 1e5, 8.0, 4096, mscale=1.0, mscale_all_dim=0.707),
        32768,
        [0, 3000],
    ),
    "yarn-attention-factor": (
        lambda: YaRN(64, 10000.0, 4.0, 256, beta_fast=16.0, beta_slow=2.0, attention_factor=1.3),
        1024,
        [0, 900],
    ),
}


@pytest.mark.parametrize("case", list(HF_CASES), ids=list(HF_CASES))
def test_matches_hf_llama_rotary_embedding(case):
    make, max_position_embeddings, offsets = HF_CASES[case]
    scheme = make()
    ids = offset_ids(97, offsets)
    hf = hf_rotary(scheme, max_position_embeddings)
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), ids)

    ours = scheme._inv_freq_for(ids)
    torch.testing.assert_close(ours, hf.inv_freq.double(), rtol=1e-6, atol=0.0)
    assert scheme.attention_scaling == pytest.approx(hf.attention_scaling, rel=1e-12)

    # HF forms angles as float32 products, so tables may differ by the frequency difference
    # and float32's rounding of the largest angle; ours must agree within exactly that.
    p_max = float(ids.max())
    slack = p_max * ((ours - hf.inv_freq.double()).abs().max() + ours.max() * 2.0**-23)
    tol = float(slack) * scheme.attention_scaling + 1e-6
    cos, sin = scheme.cos_sin(ids)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (2, 97, scheme.head_dim)
    torch.testing.assert_close(cos, hf_cos, rtol=0.0, atol=tol)
    torch.testing.assert_close(sin, hf_sin, rtol=0.0, atol=tol)


@pytest.mark.parametrize(
    "scheme,seq_len",
    [
        (LinearPI(64, 1e4, 3.0), None),
        (DynamicNTK(64, 1e4, 4.0, 512), 2000),
        (YaRN(64, 1e4, 4.0, 128), None),
        (YaRN(100, 5e5, 32.0, 8192, beta_fast=64.0, beta_slow=0.5), None),
    ],
    ids=["linear", "dynamic", "yarn", "yarn-D100"],
)
def test_hf_rope_init_functions_agree(scheme, seq_len):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = scheme.hf_rope_scaling()
    hf = hf_rotary(scheme, 512)
    init = ROPE_INIT_FUNCTIONS[params["rope_type"]]
    inv_freq, attention = init(hf.config, torch.device("cpu"), seq_len=seq_len)
    ids = torch.arange((seq_len or 1) - 1, (seq_len or 1))[None]  # largest id seq_len - 1
    torch.testing.assert_close(scheme._inv_freq_for(ids), inv_freq.double(), rtol=1e-6, atol=0.0)
    assert scheme.attention_scaling == pytest.approx(attention, rel=1e-12)


@pytest.mark.parametrize("head_dim,base,scale", [(64, 1e4, 4.0), (60, 5e5, 16.0), (4, 1e4, 2.0)])
def test_ntk_is_plain_rope_with_the_ntk_base(head_dim, base, scale):
    scheme = NTKAware(head_dim, base, scale)
    scaled_base = base * scale ** (head_dim / (head_dim - 2))
    assert scheme.rope_base == pytest.approx(scaled_base, rel=1e-12)
    expected = closed_form_inv_freq(head_dim, scaled_base)
    torch.testing.assert_close(scheme.inv_freq, expected, rtol=1e-12, atol=0.0)
    plain = closed_form_inv_freq(head_dim, base)
    assert scheme.inv_freq[0] == plain[0] == 1.0  # highest frequency kept
    assert float(plain[-1] / scheme.inv_freq[-1]) == pytest.approx(scale, rel=1e-12)  # lowest / s


def test_linear_pi_is_positions_divided_by_scale():
    scheme = LinearPI(32, 1e4, 4.0)
    ids = offset_ids(63, [0, 4000])
    cos, sin = scheme.cos_sin(ids)
    ref_cos, ref_sin = reference_cos_sin(ids.double() / 4.0, closed_form_inv_freq(32, 1e4))
    torch.testing.assert_close(cos.double(), ref_cos, rtol=0.0, atol=1e-6)
    torch.testing.assert_close(sin.double(), ref_sin, rtol=0.0, atol=1e-6)


def test_dynamic_ntk_base_follows_the_largest_id():
    scheme = DynamicNTK(32, 1e4, 2.0, original_max_position=100)
    short = offset_ids(50, [0])
    torch.testing.assert_close(scheme._inv_freq_for(short), closed_form_inv_freq(32, 1e4))
    long = offset_ids(50, [0, 250])  # largest id 299: n = 300
    base = 1e4 * (2.0 * 300 / 100 - 1.0) ** (32 / 30)
    torch.testing.assert_close(scheme._inv_freq_for(long), closed_form_inv_freq(32, base))


def test_tables_stay_exact_at_millions_of_positions():
    scheme = Rope(128, 1e4)
    ids = torch.tensor([[4_194_303, 4_194_304, 16_777_215]])
    cos, sin = scheme.cos_sin(ids)
    ref_cos, ref_sin = reference_cos_sin(ids, closed_form_inv_freq(128, 1e4))
    torch.testing.assert_close(cos.double(), ref_cos, rtol=0.0, atol=1e-6)
    torch.testing.assert_close(sin.double(), ref_sin, rtol=0.0, atol=1e-6)


def test_yarn_temperature_and_ramp_ends():
    scheme = YaRN(64, 1e4, 8.0, 256)
    assert scheme.attention_scaling == pytest.approx(0.1 * math.log(8.0) + 1.0, rel=1e-12)
    plain = closed_form_inv_freq(64, 1e4)
    # Fastest dimension kept, slowest fully interpolated by the scale.
    assert float(scheme.inv_freq[0]) == pytest.approx(float(plain[0]), rel=1e-12)
    assert float(scheme.inv_freq[-1]) == pytest.approx(float(plain[-1]) / 8.0, rel=1e-12)


@pytest.mark.parametrize(
    "scheme",
    [Rope(16), LinearPI(16, 1e4, 2.0), NTKAware(16, 1e4, 2.0), YaRN(16, 1e4, 2.0, 64), CRDNTK(16)],
    ids=["rope", "pi", "ntk", "yarn", "crd_ntk"],
)
def test_decoding_ids_match_the_full_forward(scheme):
    # A KV-cache step at `start` must see the same tables as those tokens in a full pass.
    scheme.eval()
    full_cos, full_sin = scheme.cos_sin(scheme.position_ids(2, 40))
    step_ids = scheme.position_ids(2, 5, start=31)
    assert step_ids.tolist() == [list(range(31, 36))] * 2
    step_cos, step_sin = scheme.cos_sin(step_ids)
    torch.testing.assert_close(step_cos, full_cos[:, 31:36], rtol=0.0, atol=0.0)
    torch.testing.assert_close(step_sin, full_sin[:, 31:36], rtol=0.0, atol=0.0)


def test_rotate_applies_the_schemes_tables_in_q_and_k_dtypes():
    scheme = YaRN(16, 1e4, 4.0, 32)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 37, 4, 16, generator=gen, dtype=torch.bfloat16)
    k = torch.randn(2, 37, 2, 16, generator=gen, dtype=torch.bfloat16)
    ids = offset_ids(37, [0, 90])
    q_rot, k_rot = scheme.rotate(q, k, ids)
    cos, sin = scheme.cos_sin(ids)
    assert q_rot.dtype == k_rot.dtype == torch.bfloat16
    torch.testing.assert_close(q_rot, apply_rotary(q, cos, sin), rtol=0.0, atol=0.0)
    torch.testing.assert_close(k_rot, apply_rotary(k, cos, sin), rtol=0.0, atol=0.0)


def test_rotation_preserves_relative_positions():
    # RoPE's defining property: q.k depends only on the id difference.
    scheme = NTKAware(16, 1e4, 4.0)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=gen, dtype=torch.float64)
    dots = []
    for shift in (0, 1000, 123_456):
        q_rot, _ = scheme.rotate(q, q, torch.tensor([[shift + 7]]))
        k_rot, _ = scheme.rotate(k, k, torch.tensor([[shift]]))
        dots.append(float((q_rot * k_rot).sum()))
    assert dots[1:] == pytest.approx([dots[0]] * 2, abs=1e-5)


def test_selected_leaves_q_and_k_to_ms_attention():
    scheme = Selected(16, 5e4)
    q, k = torch.randn(1, 9, 2, 16), torch.randn(1, 9, 1, 16)
    q_out, k_out = scheme.rotate(q, k, scheme.position_ids(1, 9))
    assert q_out is q and k_out is k
    assert scheme.applies_in_attention and scheme.rope_base == 5e4
    assert scheme.hf_rope_scaling() is None


@pytest.mark.parametrize(
    "q_shape,k_shape,ids,match",
    [
        ((1, 8, 2, 16), (1, 8, 2, 16), torch.arange(8.0)[None], "int64"),
        ((1, 8, 2, 16), (1, 8, 2, 16), torch.arange(8, dtype=torch.int32)[None], "int64"),
        ((1, 8, 2, 16), (1, 8, 2, 16), torch.arange(7)[None], r"position_ids must be \[1, 8\]"),
        ((1, 8, 2, 16), (1, 8, 2, 16), torch.arange(8), r"\[B, L\]"),
        ((1, 8, 2, 12), (1, 8, 2, 12), torch.arange(8)[None], "head_dim=16"),
        ((1, 8, 2, 16), (1, 9, 2, 16), torch.arange(8)[None], "does not match"),
        ((8, 2, 16), (8, 2, 16), torch.arange(8)[None], r"\[B, L, H, D\]"),
    ],
    ids=["float-ids", "int32-ids", "short-ids", "1d-ids", "head-dim", "k-length", "rank"],
)
def test_rotate_rejects_bad_inputs(q_shape, k_shape, ids, match):
    with pytest.raises(ValueError, match=match):
        Rope(16).rotate(torch.randn(q_shape), torch.randn(k_shape), ids)


def test_tables_stay_float64_through_casts():
    scheme = CRDNTK(16, scale_init=2.0, scale_max=8.0, grow_every=1)
    scheme.set_scale(4.0)
    expected_train, expected_eval = scheme.inv_freq.clone(), scheme.inv_freq_eval.clone()
    for cast in (torch.bfloat16, torch.float16, torch.float32):
        scheme.to(cast)
        assert scheme.inv_freq.dtype == scheme.inv_freq_eval.dtype == torch.float64
        torch.testing.assert_close(scheme.inv_freq, expected_train, rtol=0.0, atol=0.0)
        torch.testing.assert_close(scheme.inv_freq_eval, expected_eval, rtol=0.0, atol=0.0)
    assert scheme.scale == 4.0
    pose = PoSE(16, 1e4, 8, 64, frequencies=YaRN(16, 1e4, 2.0, 8)).half()
    assert pose.frequencies.inv_freq.dtype == torch.float64


@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_pose_ids_skip_within_the_target(chunks):
    L, T = 64, 1000
    scheme = PoSE(16, 1e4, L, T, chunks=chunks).train()
    ids = scheme.position_ids(512, L, generator=torch.Generator().manual_seed(chunks))
    steps = ids.diff(dim=1)
    assert ids.dtype == torch.int64 and ids.shape == (512, L)
    assert (ids[:, 0] == 0).all(), "the first chunk keeps bias 0"
    assert (steps >= 1).all(), "ids strictly increase"
    assert (ids[:, -1] <= T - 1).all(), "ids stay inside the target context"
    assert ((steps > 1).sum(dim=1) <= chunks - 1).all(), "at most one skip per chunk boundary"
    # The draws use the room: some rows reach the end of the target.
    assert int(ids[:, -1].max()) >= T - 1 - 10
    if chunks == 2:  # the single cut falls anywhere in 1 .. L-1
        cut = torch.where(steps > 1, torch.arange(1, L), L).min(dim=1).values
        assert int(cut.min()) == 1 and int(cut[cut < L].max()) >= L - 2


def test_pose_is_reproducible_and_natural_in_eval():
    scheme = PoSE(16, 1e4, 32, 512).train()
    a = scheme.position_ids(4, 32, generator=torch.Generator().manual_seed(7))
    b = scheme.position_ids(4, 32, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    scheme.eval()
    assert scheme.position_ids(2, 32).tolist() == [list(range(32))] * 2


def test_pose_rejects_bad_windows():
    scheme = PoSE(16, 1e4, 32, 128).train()
    with pytest.raises(ValueError, match="start"):
        scheme.position_ids(1, 32, start=3)
    with pytest.raises(ValueError, match="target_length"):
        scheme.position_ids(1, 129)
    with pytest.raises(ValueError, match="train_length=32"):
        scheme.check_lengths(64, 128, torch.float32)


def test_crd_ids_are_offset_then_wrapped():
    C, L, R = 100, 64, 1000
    scheme = CRDNTK(16, cycle=C, max_offset=R).train()
    ids = scheme.position_ids(256, L, generator=torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int64 and ((ids >= 0) & (ids < C)).all()
    offset = (ids - torch.arange(L)) % C  # [B, L], constant along a row: (t + r) mod C
    assert (offset == offset[:, :1]).all()
    steps = ids.diff(dim=1)
    wraps = steps != 1
    assert wraps.any(dim=1).float().mean() > 0.3, "many rows cross the cycle boundary"
    assert (steps[wraps] == 1 - C).all(), "a wrap goes from C-1 back to 0"
    assert (wraps.sum(dim=1) <= 1).all()


def test_crd_offsets_cover_their_range():
    scheme = CRDNTK(16, max_offset=50, cyclic=False).train()
    ids = scheme.position_ids(4000, 8, generator=torch.Generator().manual_seed(0))
    assert set(ids[:, 0].tolist()) == set(range(51))
    assert (ids - ids[:, :1] == torch.arange(8)).all()
    paper = CRDNTK(16, cyclic=False).train()
    offsets = paper.position_ids(20000, 1, generator=torch.Generator().manual_seed(1))[:, 0]
    assert int(offsets.min()) >= 0 and int(offsets.max()) <= 4194304
    assert float(offsets.double().mean()) == pytest.approx(4194304 / 2, rel=0.02)
    assert float(offsets.double().std()) == pytest.approx(4194304 / math.sqrt(12), rel=0.02)


def test_crd_switches_off_give_natural_training_ids():
    scheme = CRDNTK(16, cyclic=False, random_offset=False, dynamic=False).train()
    assert scheme.position_ids(2, 6, start=3).tolist() == [list(range(3, 9))] * 2
    assert scheme.scale_at(10**6) == scheme.scale_init


def test_crd_schedule_doubles_at_the_right_step():
    scheme = CRDNTK(16, scale_init=16.0, grow_every=2000, scale_max=64.0)
    seen = {}
    for step in range(0, 9001):  # a simulated run, one optimizer step at a time
        scale = scheme.scale_at(step)
        if scale != scheme.scale:
            scheme.set_scale(scale)
            seen[step] = scale
    assert seen == {2000: 32.0, 4000: 64.0}
    assert scheme.scale == 64.0 and scheme.scale_at(10**12) == 64.0
    capped = CRDNTK(16, scale_init=16.0, grow_every=10, scale_max=48.0)
    assert [capped.scale_at(s) for s in (0, 9, 10, 19, 20, 10**9)] == [16, 16, 32, 32, 48, 48]


def test_crd_set_scale_rebuilds_the_same_buffer():
    scheme = CRDNTK(32, base=1e4)
    buffer = scheme.inv_freq
    scheme.set_scale(32.0)
    assert scheme.inv_freq is buffer
    expected = closed_form_inv_freq(32, 1e4 * 32.0 ** (32 / 30))
    torch.testing.assert_close(scheme.inv_freq, expected, rtol=1e-12, atol=0.0)
    with pytest.raises(ValueError, match="scale"):
        scheme.set_scale(0.5)


def test_crd_trains_with_current_scale_and_evaluates_naturally_with_scale_inf():
    scheme = CRDNTK(16, base=1e4, scale_init=2.0, scale_max=8.0, scale_inf=32.0).train()
    scheme.set_scale(4.0)
    ids = scheme.position_ids(2, 24, generator=torch.Generator().manual_seed(3))
    cos, sin = scheme.cos_sin(ids)
    ref_cos, ref_sin = reference_cos_sin(ids, closed_form_inv_freq(16, 1e4 * 4.0 ** (16 / 14)))
    torch.testing.assert_close(cos.double(), ref_cos, rtol=0.0, atol=1e-6)
    assert scheme.rope_base == pytest.approx(1e4 * 4.0 ** (16 / 14))

    scheme.eval()
    ids = scheme.position_ids(2, 24, start=10)
    assert ids.tolist() == [list(range(10, 34))] * 2
    cos, sin = scheme.cos_sin(ids)
    ref_cos, ref_sin = reference_cos_sin(ids, closed_form_inv_freq(16, 1e4 * 32.0 ** (16 / 14)))
    torch.testing.assert_close(cos.double(), ref_cos, rtol=0.0, atol=1e-6)
    torch.testing.assert_close(sin.double(), ref_sin, rtol=0.0, atol=1e-6)
    assert scheme.rope_base == pytest.approx(1e4 * 32.0 ** (16 / 14))
    assert scheme.hf_rope_scaling() == {"rope_type": "default", "rope_theta": scheme.rope_base}


def test_check_lengths_enforces_cycle_and_precision():
    CRDNTK(64).check_lengths(16384, 4194304, torch.bfloat16)  # the paper's setting
    with pytest.raises(ValueError, match=r"cycle=32768 .*train_length=65536"):
        CRDNTK(64).check_lengths(65536, 65536, torch.bfloat16)
    with pytest.raises(ValueError, match="max_offset=16777216"):
        CRDNTK(64, max_offset=2**24, cyclic=False).check_lengths(1024, 1024, torch.float32)
    CRDNTK(64, max_offset=2**24, cyclic=True).check_lengths(1024, 1024, torch.float32)
    with pytest.raises(ValueError, match="eval_max_length"):
        Rope(64).check_lengths(1024, MAX_EXACT_POSITION + 1, torch.float64)
    Rope(64).check_lengths(1024, MAX_EXACT_POSITION, torch.float16)
    with pytest.raises(ValueError, match="target_length"):
        PoSE(16, 1e4, 64, MAX_EXACT_POSITION + 1).check_lengths(64, 64, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        Rope(64).check_lengths(64, 64, torch.int64)


def test_check_attention_names_both_settings():
    Selected(16).check_attention(attention="ms", pe="selected")
    Rope(16).check_attention(attention="ms", pe="pre")
    CRDNTK(16).check_attention(attention="dense", pe=None)
    with pytest.raises(ValueError, match=r"position=selected.*attention=dense"):
        Selected(16).check_attention(attention="dense", pe=None)
    with pytest.raises(ValueError, match=r"position=crd_ntk.*attention=ms.*'selected'"):
        CRDNTK(16).check_attention(attention="ms", pe="selected")


BAD_SETTINGS = {
    "pi-scale-below-1": (lambda: LinearPI(16, 1e4, 0.5), "scale"),
    "ntk-scale-below-1": (lambda: NTKAware(16, 1e4, 0.9), "scale"),
    "ntk-head-dim-2": (lambda: NTKAware(2, 1e4, 2.0), "head_dim"),
    "dynamic-scale": (lambda: DynamicNTK(16, 1e4, 0.0, 64), "scale"),
    "dynamic-original": (lambda: DynamicNTK(16, 1e4, 2.0, 0), "original_max_position"),
    "yarn-scale": (lambda: YaRN(16, 1e4, 0.5, 64), "scale"),
    "yarn-betas": (lambda: YaRN(16, 1e4, 2.0, 64, beta_fast=1.0, beta_slow=2.0), "beta_slow"),
    "yarn-lone-mscale": (lambda: YaRN(16, 1e4, 2.0, 64, mscale=1.0), "mscale_all_dim"),
    "rope-odd-head-dim": (lambda: Rope(15), "head_dim"),
    "rope-base": (lambda: Rope(16, 1.0), "base"),
    "pose-target": (lambda: PoSE(16, 1e4, 64, 32), "target_length"),
    "pose-chunks": (lambda: PoSE(16, 1e4, 4, 32, chunks=5), "chunks"),
    "pose-frequencies-base": (lambda: PoSE(16, 1e4, 8, 32, frequencies=Rope(16, 5e5)), "base"),
    "pose-frequencies-kind": (lambda: PoSE(16, 1e4, 8, 32, frequencies=CRDNTK(16)), "frequencies"),
    "crd-scale-init": (lambda: CRDNTK(16, scale_init=0.5), "scale_init"),
    "crd-scale-max": (lambda: CRDNTK(16, scale_init=16.0, scale_max=8.0), "scale_max"),
    "crd-scale-inf": (lambda: CRDNTK(16, scale_inf=0.0), "scale_inf"),
    "crd-scale-overflow": (lambda: CRDNTK(16, scale_max=1e300), "scale_max"),
    "crd-grow-every": (lambda: CRDNTK(16, grow_every=0), "grow_every"),
    "crd-offset": (lambda: CRDNTK(16, max_offset=-1), "max_offset"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS), ids=list(BAD_SETTINGS))
def test_bad_settings_raise_naming_the_argument(case):
    make, name = BAD_SETTINGS[case]
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"length": 0}, {"start": -1}], ids=str)
def test_position_ids_reject_bad_arguments(kwargs):
    args = {"batch": 1, "length": 4} | kwargs
    start = args.pop("start", 0)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Rope(16).position_ids(args["batch"], args["length"], start=start)


EXPECTED_OPTIONS = {"rope", "pi", "ntk", "dynamic_ntk", "yarn", "pose", "crd_ntk", "selected"}


def compose_position(option: str, **overrides):
    root = OmegaConf.create({"model": {"head_dim": 16}, "data": {"seq_len": 64}})
    root.position = OmegaConf.load(CFG_DIR / f"{option}.yaml")
    for key, value in overrides.items():
        root.position[key] = value
    return instantiate(root.position)


def test_every_option_of_the_group_has_a_config():
    assert {path.stem for path in CFG_DIR.glob("*.yaml")} == EXPECTED_OPTIONS


@pytest.mark.parametrize("option", sorted(EXPECTED_OPTIONS))
def test_config_option_instantiates_and_trains(option):
    scheme = compose_position(option)
    assert isinstance(scheme, PositionScheme) and scheme.name == option
    assert scheme.head_dim == 16 and scheme.describe().startswith(option)
    scheme.check_lengths(64, 1024, torch.bfloat16)
    scheme.train()
    ids = scheme.position_ids(2, 64, generator=torch.Generator().manual_seed(0))
    q, k = torch.randn(2, 64, 2, 16), torch.randn(2, 64, 1, 16)
    q_rot, k_rot = scheme.rotate(q, k, ids)
    assert q_rot.shape == q.shape and torch.isfinite(q_rot).all() and torch.isfinite(k_rot).all()


def test_crd_config_holds_the_paper_defaults():
    scheme = compose_position("crd_ntk")
    assert (scheme.cycle, scheme.max_offset, scheme.scale_init, scheme.grow_every) == (
        32768,
        4194304,
        16.0,
        2000,
    )
    assert scheme.cyclic and scheme.random_offset and scheme.dynamic


def test_config_with_a_bad_value_fails_at_composition():
    with pytest.raises(Exception, match="scale"):
        compose_position("pi", scale=0.5)


def test_only_a_growing_crd_asks_for_the_growth_callback():
    from ctxlab.position.callbacks import NTKGrowth

    assert isinstance(CRDNTK(16).growth_callback(), NTKGrowth)
    assert CRDNTK(16, dynamic=False).growth_callback() is None
    assert Rope(16).growth_callback() is None and PoSE(16, 1e4, 8, 64).growth_callback() is None


def _tiny_run(tmp_path, max_steps, ckpt_path=None):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.position = CRDNTK(8, scale_init=2.0, grow_every=2, scale_max=8.0, scale_inf=8.0)
            self.layer = torch.nn.Linear(8, 1)
            self.seen: list[tuple[int, float]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.trainer.global_step, self.position.scale))
            ids = self.position.position_ids(1, 4)
            cos, _ = self.position.cos_sin(ids)
            return self.layer(cos).mean() + self.layer(batch[0]).mean()

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8)))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Tiny()
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[module.position.growth_callback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module


def test_growth_callback_sets_scale_per_step_and_survives_resume(tmp_path):
    trainer, module = _tiny_run(tmp_path, max_steps=7)
    assert module.seen == [(0, 2.0), (1, 2.0), (2, 4.0), (3, 4.0), (4, 8.0), (5, 8.0), (6, 8.0)]
    assert float(trainer.callback_metrics["position/ntk_scale"]) == 8.0

    trainer, _ = _tiny_run(tmp_path, max_steps=3)
    ckpt = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(ckpt)
    _, resumed = _tiny_run(tmp_path, max_steps=6, ckpt_path=str(ckpt))
    assert resumed.seen == [(3, 4.0), (4, 8.0), (5, 8.0)]


def test_growth_callback_refuses_a_model_without_crd_ntk():
    import lightning.pytorch as pl

    from ctxlab.position.callbacks import NTKGrowth

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.position = Rope(8)

    with pytest.raises(ValueError, match="crd_ntk"):
        NTKGrowth().setup(trainer=None, pl_module=Plain(), stage="fit")
