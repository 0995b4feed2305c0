"""attn_ops.MultiheadAttention against torch.nn.MultiheadAttention loaded with the same state_dict."""

import pytest
import torch

import attn_ops
import attn_ops.mha
from truth import DEVICES

# float32 on CPU: both sides run the same projections and float32 attention math, differing only
# in summation order (a few ulp of ~1e-7 over sums of at most a few hundred terms).
TOL = dict(atol=1e-5, rtol=1e-5)
EMBED, HEADS, BATCH, LEN_Q, LEN_K = 16, 4, 2, 5, 7


def _pair(**kwargs):
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, **kwargs)
    ours = attn_ops.MultiheadAttention(EMBED, HEADS, **kwargs)
    with torch.no_grad():  # torch initialises these biases to zeros: random ones make them count
        for name, param in theirs.named_parameters():
            if name in ("in_proj_bias", "out_proj.bias"):
                param.normal_(std=0.1)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _inputs(batch_first=True, kdim=EMBED, vdim=EMBED, unbatched=False):
    def make(length, dim):
        shape = (length, dim) if unbatched else (BATCH, length, dim) if batch_first else (length, BATCH, dim)
        return torch.randn(shape, requires_grad=True)

    return make(LEN_Q, EMBED), make(LEN_K, kdim), make(LEN_K, vdim)


def _masks(kind):
    """torch.nn.MultiheadAttention's conventions: bool True = may NOT attend; float added."""
    padding = torch.zeros(BATCH, LEN_K, dtype=torch.bool)
    padding[0, 4:] = True
    blocked = torch.rand(BATCH * HEADS, LEN_Q, LEN_K) > 0.6
    blocked[..., 0] = False  # every query keeps a key: torch would give NaN rows, we zeros
    return {
        "none": {},
        "key_padding_bool": dict(key_padding_mask=padding),
        "key_padding_float": dict(key_padding_mask=torch.randn(BATCH, LEN_K).masked_fill(padding, float("-inf"))),
        "attn_2d_bool": dict(attn_mask=blocked[0]),
        "attn_2d_float": dict(attn_mask=torch.randn(LEN_Q, LEN_K)),
        "attn_3d_bool": dict(attn_mask=blocked),
        "attn_3d_float": dict(attn_mask=torch.randn(BATCH * HEADS, LEN_Q, LEN_K)),
        "both_bool": dict(attn_mask=blocked[0], key_padding_mask=padding),
        "both_float": dict(
            attn_mask=torch.randn(BATCH * HEADS, LEN_Q, LEN_K), key_padding_mask=torch.randn(BATCH, LEN_K)
        ),
    }[kind]


MASK_KINDS = ["none", "key_padding_bool", "key_padding_float", "attn_2d_bool", "attn_2d_float", "attn_3d_bool",
              "attn_3d_float", "both_bool", "both_float"]


def _assert_same_forward_and_backward(theirs, ours, inputs, **kwargs):
    expected = theirs(*inputs, **kwargs)
    # Random cotangents for the output and (when returned) the weights: both backward paths count.
    returned = [t for t in expected if t is not None]
    cotangents = [torch.randn_like(t) for t in returned]
    expected_grads = torch.autograd.grad(returned, (*inputs, *theirs.parameters()), cotangents)
    actual = ours(*inputs, **kwargs)
    actual_returned = [t for t in actual if t is not None]
    actual_grads = torch.autograd.grad(actual_returned, (*inputs, *ours.parameters()), cotangents)
    torch.testing.assert_close(actual[0], expected[0], **TOL)
    if expected[1] is None:
        assert actual[1] is None
    else:
        torch.testing.assert_close(actual[1], expected[1], **TOL)
    for a, b in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_outputs_weights_and_gradients_match_torch(batch_first, mask_kind):
    theirs, ours = _pair(batch_first=batch_first)
    _assert_same_forward_and_backward(theirs, ours, _inputs(batch_first), **_masks(mask_kind))


@pytest.mark.parametrize("mask_kind", ["none", "both_bool", "attn_3d_float"])
@pytest.mark.parametrize("average", [True, False])
def test_per_head_and_averaged_weights_match_torch(mask_kind, average):
    theirs, ours = _pair(batch_first=True)
    _assert_same_forward_and_backward(theirs, ours, _inputs(), average_attn_weights=average, **_masks(mask_kind))


@pytest.mark.parametrize(
    "options",
    [dict(kdim=6, vdim=10), dict(add_bias_kv=True), dict(add_zero_attn=True), dict(bias=False),
     dict(add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=10)],
    ids=["kdim_vdim", "add_bias_kv", "add_zero_attn", "no_bias", "all"],
)
@pytest.mark.parametrize("mask_kind", ["none", "both_bool", "both_float"])
def test_module_options_match_torch(options, mask_kind):
    theirs, ours = _pair(batch_first=False, **options)
    inputs = _inputs(False, kdim=options.get("kdim", EMBED), vdim=options.get("vdim", EMBED))
    _assert_same_forward_and_backward(theirs, ours, inputs, **_masks(mask_kind))


def test_self_attention_matches_torch():
    theirs, ours = _pair(batch_first=True)
    x = torch.randn(BATCH, LEN_Q, EMBED, requires_grad=True)
    padding = torch.zeros(BATCH, LEN_Q, dtype=torch.bool)
    padding[1, -2:] = True
    _assert_same_forward_and_backward(theirs, ours, (x, x, x), key_padding_mask=padding)


@pytest.mark.parametrize("mask_kind", ["none", "attn_2d_bool"])
@pytest.mark.parametrize("average", [True, False])
def test_unbatched_inputs_match_torch(mask_kind, average):
    theirs, ours = _pair(batch_first=True)
    mask = _masks(mask_kind)
    _assert_same_forward_and_backward(theirs, ours, _inputs(unbatched=True), average_attn_weights=average, **mask)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask_kind", ["attn_2d_bool", "both_bool"])
def test_is_causal_hint_picks_the_same_mask_as_torch(need_weights, mask_kind):
    # attn_mask is deliberately not causal: torch trusts the hint (and ignores attn_mask) only
    # without key_padding_mask and need_weights, so each case shows which of the two was used.
    theirs, ours = _pair(batch_first=True)
    _assert_same_forward_and_backward(
        theirs, ours, _inputs(), is_causal=True, need_weights=need_weights, **_masks(mask_kind)
    )


def test_is_causal_hint_uses_the_ops_causal_rule_as_torch_does(op_calls):
    seen = op_calls(attn_ops.mha)
    _, ours = _pair(batch_first=True)
    causal = torch.ones(LEN_Q, LEN_K, dtype=torch.bool).triu(1)
    ours(*_inputs(), attn_mask=causal, is_causal=True, need_weights=False)
    assert seen["causal"] is True and seen["mask"] is None


def test_is_causal_without_attn_mask_raises():
    _, ours = _pair()
    with pytest.raises(ValueError, match="attn_mask"):
        ours(*_inputs(False), is_causal=True)


@pytest.mark.parametrize("is_causal", ["False", "no", "0", 1, None])
def test_is_causal_must_be_a_bool(is_causal):
    # A truthy string would otherwise turn on the causal rule the caller switched off.
    _, ours = _pair()
    with pytest.raises(TypeError, match="is_causal"):
        ours(*_inputs(), attn_mask=torch.zeros(LEN_Q, LEN_K), is_causal=is_causal, need_weights=False)


@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_input_of_the_wrong_embedding_size_is_named(name):
    _, ours = _pair(batch_first=True)
    inputs = dict(zip(("query", "key", "value"), _inputs()))
    inputs[name] = torch.randn(BATCH, LEN_Q if name == "query" else LEN_K, EMBED + 3)
    with pytest.raises(ValueError, match=f"{name}'s last dimension must be {EMBED}"):
        ours(**inputs)


def test_3d_attn_mask_reaches_the_op_as_a_view(op_calls):
    seen = op_calls(attn_ops.mha)
    _, ours = _pair(batch_first=True)
    attn_mask = torch.randn(BATCH * HEADS, LEN_Q, LEN_K)
    ours(*_inputs(), attn_mask=attn_mask)
    assert seen["mask"].shape == (BATCH, HEADS, LEN_Q, LEN_K)
    assert seen["mask"].data_ptr() == attn_mask.data_ptr()


def test_state_dicts_are_interchangeable():
    theirs, ours = _pair(kdim=6, vdim=10, add_bias_kv=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    torch.nn.MultiheadAttention(EMBED, HEADS, kdim=6, vdim=10, add_bias_kv=True).load_state_dict(ours.state_dict())


def test_dropout_is_ignored_in_eval_mode():
    theirs, ours = _pair(dropout=0.5, batch_first=True)
    theirs.eval(), ours.eval()
    _assert_same_forward_and_backward(theirs, ours, _inputs(), need_weights=False)


def test_dropout_is_applied_in_training_mode():
    _, ours = _pair(dropout=0.5, batch_first=True)
    inputs = _inputs()
    trained = ours(*inputs, need_weights=False)[0]
    assert not torch.allclose(trained, ours.eval()(*inputs, need_weights=False)[0])


def test_fully_masked_query_gives_zeros_where_torch_gives_nan():
    theirs, ours = _pair(batch_first=True, bias=False)
    blocked = torch.zeros(LEN_Q, LEN_K, dtype=torch.bool)
    blocked[2] = True
    out, weights = ours(*_inputs(), attn_mask=blocked)
    assert theirs(*_inputs(), attn_mask=blocked)[0][:, 2].isnan().all()
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))  # no out_proj bias: zero attention, zero output
    assert torch.equal(weights[:, 2], torch.zeros_like(weights[:, 2]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["both_bool", "attn_3d_float"])
def test_kernel_path_matches_torch(mask_kind, device):
    # Tiny shapes: the Triton interpreter runs each program block step in Python.
    theirs, ours = (module.to(device) for module in _pair(batch_first=True))
    inputs = [t.detach().to(device).requires_grad_() for t in _inputs()]
    masks = {name: m.to(device) for name, m in _masks(mask_kind).items()}
    with attn_ops.use_backend("triton"):
        _assert_same_forward_and_backward(theirs, ours, inputs, **masks)


def test_float64_module_matches_torch():
    theirs, ours = (module.double() for module in _pair(batch_first=True))
    inputs = [t.detach().double().requires_grad_() for t in _inputs()]
    masks = {name: m.double() if m.is_floating_point() else m for name, m in _masks("both_float").items()}
    _assert_same_forward_and_backward(theirs, ours, inputs, **masks)
