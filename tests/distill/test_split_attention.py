"""Split attention: the split modules compute what open_clip's fused ones do, and fuse back exactly."""

import copy

import pytest
import torch
from torch import nn

from distill.split_attention import SplitAttentionPool2d, SplitMultiheadAttention, fuse_attention, split_attention

KINDS = ["rn", "vit"]


def _causal(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)


MASK_CASES = {
    "none": {},
    "causal_float": {"attn_mask": _causal(5)},
    "bool": {"attn_mask": torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) > 0.7},
    "per_head_3d": {"attn_mask": torch.randn(2 * 4, 5, 5, generator=torch.Generator().manual_seed(1))},
    "key_padding": {"key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2])},
    "causal_flag": {"attn_mask": _causal(5), "is_causal": True},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_split_multihead_attention_equals_stock(case, need_weights, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    nn.init.normal_(mha.in_proj_bias)
    split = SplitMultiheadAttention.from_mha(mha).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kwargs = {**MASK_CASES[case], "need_weights": need_weights}
    expected, expected_weights = mha(x, x, x, **kwargs)
    got, weights = split(x, x, x, **kwargs)
    assert (got - expected).abs().max() <= 1e-5
    if need_weights:
        assert (weights - expected_weights).abs().max() <= 1e-6
    else:
        assert weights is None and expected_weights is None
    assert split.to_mha().state_dict().keys() == mha.state_dict().keys()


def test_split_attention_handles_cross_attention_and_unbatched_input():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True).eval()
    split = SplitMultiheadAttention.from_mha(mha)
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 7, 8), torch.randn(2, 7, 12)
    assert (split(q, k, v, need_weights=False)[0] - mha(q, k, v, need_weights=False)[0]).abs().max() <= 1e-5
    assert (split(q[0], k[0], v[0])[0] - mha(q[0], k[0], v[0])[0]).abs().max() <= 1e-5
    fused = split.to_mha()
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in mha.state_dict().items()}
    assert all(torch.equal(fused.state_dict()[k], t) for k, t in mha.state_dict().items())


@pytest.mark.parametrize("kind", [*KINDS, "custom_text"])
def test_split_attention_keeps_embeddings_and_fuse_restores_the_stock_model(kind, clip_kit):
    bundle = clip_kit.bundle("vit" if kind == "custom_text" else kind, custom_text=kind == "custom_text")
    model, inputs = bundle.model, clip_kit.inputs(bundle)
    before, state = clip_kit.embed(model, inputs), copy.deepcopy(model.state_dict())
    stock_types = clip_kit.attention_types(model)

    split_attention(model)
    split_types = {SplitMultiheadAttention, *([SplitAttentionPool2d] if kind == "rn" else [])}
    assert clip_kit.attention_types(model) == split_types
    assert clip_kit.max_diff(clip_kit.embed(model, inputs), before) <= 1e-5  # the text side includes the causal mask

    fuse_attention(model)
    assert clip_kit.attention_types(model) == stock_types
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
