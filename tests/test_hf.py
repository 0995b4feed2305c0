"""attn_implementation="attn_ops" against "sdpa" on tiny, randomly initialised transformers models."""

import copy
import sys
import types

import pytest
import torch

import attn_ops
import attn_ops.decode
import attn_ops.hf
from truth import DEVICES

transformers = pytest.importorskip("transformers")

# float32 on CPU: per layer both implementations differ only in the attention's summation order
# (a few ulp); two layers and a vocabulary projection keep the logits within ~1e-6 of each other.
TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB, SEQ = 64, 9


@pytest.fixture(scope="module", autouse=True)
def registered():
    attn_ops.register_transformers()


@pytest.fixture
def calls(monkeypatch):
    """The masks our attention function receives, proving it (not sdpa) ran."""
    seen = []

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append(attention_mask)
        return attn_ops.hf.attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    transformers.AttentionInterface.register("attn_ops", spy)
    yield seen
    transformers.AttentionInterface.register("attn_ops", attn_ops.hf.attention_forward)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _batch(padding_side):
    """Three sequences of 9, 6 and 8 real tokens, padded on `padding_side`."""
    ids = torch.randint(0, VOCAB, (3, SEQ))
    mask = torch.ones(3, SEQ, dtype=torch.long)
    for row, pad in ((1, 3), (2, 1)):
        mask[row, :pad] = 0 if padding_side == "left" else 1
        mask[row, SEQ - pad :] = 0 if padding_side == "right" else 1
    return ids, mask


def _run(model, implementation, **inputs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_llama_with_gqa_and_padding_matches_sdpa(padding_side, calls):
    model = _llama()
    ids, mask = _batch(padding_side)
    expected = _run(model, "sdpa", input_ids=ids, attention_mask=mask).logits
    actual = _run(model, "attn_ops", input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, **TOL)
    assert calls and all(m.shape == (3, 1, 1, SEQ) for m in calls)  # the small padding mask, causal from the module


def test_llama_without_padding_matches_sdpa(calls):
    model = _llama()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    expected = _run(model, "sdpa", input_ids=ids).logits
    torch.testing.assert_close(_run(model, "attn_ops", input_ids=ids).logits, expected, **TOL)
    assert calls and all(m is None for m in calls)


@pytest.fixture
def decode_calls(monkeypatch):
    """The cache lengths of each call our attention function makes to attention_with_kvcache."""
    seen = []

    def spy(q, k_cache, v_cache, cache_seqlens, **kwargs):
        seen.append(cache_seqlens if isinstance(cache_seqlens, int) else cache_seqlens.tolist())
        return attn_ops.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, **kwargs)

    monkeypatch.setattr(attn_ops.hf, "attention_with_kvcache", spy)
    return seen


def _generate_as_sdpa(model, ids, mask, max_new_tokens, peer="sdpa", **options):
    """Greedy generation with "sdpa" (or `peer`), then "attn_ops": asserts the same tokens and logits."""
    outputs = {}
    for implementation in (peer, "attn_ops"):
        model.set_attn_implementation(implementation)
        outputs[implementation] = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            return_dict_in_generate=True, output_logits=True, pad_token_id=0, **options,
        )
    assert torch.equal(outputs["attn_ops"].sequences, outputs[peer].sequences)
    for actual, expected in zip(outputs["attn_ops"].logits, outputs[peer].logits):
        torch.testing.assert_close(actual, expected, **TOL)


@pytest.mark.parametrize("cache", ["dynamic", "static"])  # static: the dense-mask path, tensor offsets
def test_llama_greedy_generation_with_kv_cache_matches_sdpa(cache, calls, decode_calls):
    model = _llama()
    ids, mask = _batch("left")
    _generate_as_sdpa(model, ids, mask, 4, cache_implementation=cache)
    # Our function ran every step: 2 layers x (the prompt + 3 one-token steps), each with the mask
    # its cache gives (the small padding mask, or static's dense one over the whole cache).
    assert len(calls) == 2 * 4
    # (dynamic: [B, 1, 1, Lk] key padding; static: [B, 1, Lq, capacity], one row in decoding steps)
    assert all(m.dim() == 4 for m in calls)
    assert [m.shape[2] for m in calls] == [SEQ if cache == "static" else 1] * 2 + [1] * 6
    # The decoding steps on the split-KV path, the padding as a key mask read by the kernels: each row
    # visits its keys up to its last visible one, the token just written (the static cache's unused
    # tail is never visited).
    assert decode_calls == [[SEQ + step] * ids.shape[0] for step in (1, 2, 3) for _layer in range(2)]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=DEVICES[0].marks)])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decoding_steps_take_the_kv_cache_path_with_sdpa_tokens_and_logits(cache, backend, decode_calls):
    model = _llama()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    outputs = {}
    for implementation in ("sdpa", "attn_ops"):
        model.set_attn_implementation(implementation)
        with attn_ops.use_backend(backend if implementation == "attn_ops" else "auto"):
            outputs[implementation] = model.generate(
                input_ids=ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True,
                pad_token_id=0, cache_implementation=cache,
            )
    assert torch.equal(outputs["attn_ops"].sequences, outputs["sdpa"].sequences)
    for actual, expected in zip(outputs["attn_ops"].logits, outputs["sdpa"].logits):
        torch.testing.assert_close(actual, expected, **TOL)
    # 3 one-token steps x 2 layers, each row seeing the prompt and the tokens so far: all of a dynamic
    # cache's keys (an int, no host sync), the filled part of the static cache's buffer.
    lengths = [SEQ + step for step in (1, 2, 3) for _layer in range(2)]
    assert decode_calls == (lengths if cache == "dynamic" else [[n, n] for n in lengths])


def test_bert_encoder_with_padding_matches_sdpa(calls):
    model = _bert()
    ids, mask = _batch("right")
    expected = _run(model, "sdpa", input_ids=ids, attention_mask=mask).last_hidden_state
    actual = _run(model, "attn_ops", input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(actual, expected, **TOL)
    # The padding as every query's row, through stride 0 (no [Lq, Lk] tensor).
    assert calls and all(m.shape == (3, 1, SEQ, SEQ) and m.stride()[2] == 0 for m in calls)


@pytest.fixture
def op_rules(monkeypatch):
    """The mask and window each call of our attention function passes to the op (or to decoding)."""
    seen = []

    def spy_on(name):
        real = getattr(attn_ops.hf, name)

        def spy(*args, **kwargs):
            mask = kwargs.get("mask", kwargs.get("key_mask"))
            seen.append((name, None if mask is None else tuple(mask.shape), kwargs.get("window")))
            return real(*args, **kwargs)

        monkeypatch.setattr(attn_ops.hf, name, spy)

    spy_on("attention")
    spy_on("attention_with_kvcache")
    return seen


def _mistral(window=4):
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=window,
    )
    return transformers.MistralForCausalLM(config).eval()


def test_sliding_window_model_passes_its_rule_not_a_dense_mask_and_matches_sdpa(calls, op_rules):
    model = _mistral()
    ids, mask = _batch("left")
    expected = _run(model, "sdpa", input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(_run(model, "attn_ops", input_ids=ids, attention_mask=mask).logits, expected, **TOL)
    # Each layer gets the key padding alone, [B, 1, 1, Lk], and gives the op the window: no [Lq, Lk] mask.
    assert calls and all(m.shape == (3, 1, 1, SEQ) for m in calls)
    assert op_rules == [("attention", (3, 1, 1, SEQ), (3, 0))] * 2


def test_sliding_window_generation_matches_sdpa_with_the_window_in_each_decoding_step(calls, op_rules):
    """A window of 16 over a 9-token prompt and 6 new tokens: every step stays within it (the cache
    holds every key), so each takes the rule; the steps decode through the split-KV kernels."""
    ids, mask = _batch("right")
    _generate_as_sdpa(_mistral(window=16), ids, mask, 6)
    assert [name for name, _, _ in op_rules] == ["attention"] * 2 + ["attention_with_kvcache"] * 10
    assert all(window == (15, 0) for _, _, window in op_rules)


def test_a_sliding_window_generation_past_its_window_matches_sdpa():
    """Past the window the sliding cache drops keys (transformers then builds the mask over what it
    kept, an offset the rule does not take): the dense mask path, the same tokens as SDPA."""
    ids, mask = _batch("left")
    _generate_as_sdpa(_mistral(window=4), ids, mask, 5)


def test_an_unpadded_sliding_window_model_passes_no_mask_at_all(calls, op_rules):
    model = _mistral()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    expected = _run(model, "sdpa", input_ids=ids).logits
    torch.testing.assert_close(_run(model, "attn_ops", input_ids=ids).logits, expected, **TOL)
    assert calls and all(m.shape == (2, 1, 1, 0) for m in calls)  # the window rule, nothing padded
    assert op_rules == [("attention", None, (3, 0))] * 2


def test_a_mask_that_is_no_packed_rows_dense_mask_is_not_read_on_the_host(monkeypatch):
    def host_read(*args, **kwargs):
        raise AssertionError("a host read")

    monkeypatch.setattr(torch.Tensor, "nonzero", host_read)
    sliding_padding = torch.ones(1, 1, SEQ, dtype=torch.bool)
    assert attn_ops.hf._sequences_the_mask_keeps_apart(sliding_padding, torch.arange(SEQ), True) is None


def _against_sdpa(module, mask_function, padding, mask_options=None, **call):
    """Our mask function and attention function against transformers' dense mask and SDPA function,
    on random q, k, v of 12 tokens."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    q, k, v = (torch.randn(2, 2, 12, 16) for _ in range(3))
    masks = [make(2, 12, 12, 0, 0, mask_function=mask_function, attention_mask=padding, **(mask_options or {}))
             for make in (attn_ops.hf.padding_or_dense_mask, sdpa_mask)]
    assert masks[0].data_ptr() == padding.data_ptr()  # ours: a view of the key padding, no [Lq, Lk] tensor
    ours, _ = attn_ops.hf.attention_forward(module, q, k, v, masks[0], scaling=0.25, **call)
    theirs, _ = sdpa_attention_forward(module, q, k, v, masks[1], scaling=0.25, **call)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_a_bidirectional_mask_stays_bidirectional_for_a_module_that_says_causal():
    """Phi-4-multimodal's vision attention says is_causal and gets transformers' bidirectional mask."""
    from transformers.masking_utils import bidirectional_mask_function

    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, -3:] = False
    # As create_bidirectional_mask asks for it: transformers' own would then skip the dense mask too.
    _against_sdpa(types.SimpleNamespace(is_causal=True, training=False), bidirectional_mask_function, padding,
                  mask_options=dict(allow_is_bidirectional_skip=True))


def test_a_full_layer_gets_no_window_from_its_modules_sliding_window():
    """EXAONE 4 keeps `sliding_window` on every layer's module and passes None for its full layers."""
    from transformers.masking_utils import causal_mask_function

    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, :3] = False
    module = types.SimpleNamespace(is_causal=True, training=False, sliding_window=4)
    _against_sdpa(module, causal_mask_function, padding, sliding_window=None)


def _llama4(chunk=4):
    """Llama 4's text model, tiny: a chunked-attention layer (chunks of 4 < SEQ) and a full one."""
    config = transformers.Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, num_local_experts=2,
        attention_chunk_size=chunk, layer_types=["chunked_attention", "full_attention"],
    )
    return transformers.Llama4ForCausalLM(config).eval()


def _chunked_dense(mask, chunk):
    """The bool [B, 1, L, L] mask of Llama 4's chunked layers, written out: causal, within the chunk
    counted from each row's first real token, real keys only."""
    length = mask.shape[1]
    left = (mask.cumsum(-1) == 0).sum(-1)[:, None, None]
    q, kv = torch.arange(length)[:, None], torch.arange(length)[None, :]
    same_chunk = (q - left).div(chunk, rounding_mode="floor") == (kv - left).div(chunk, rounding_mode="floor")
    return (same_chunk & (kv <= q) & mask.bool()[:, None, :])[:, None]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_chunked_attention_layers_pass_a_block_mask_not_a_dense_one_and_match_sdpa(padding_side, calls):
    model = _llama4()
    ids, mask = _batch(padding_side)
    expected = _run(model, "sdpa", input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(_run(model, "attn_ops", input_ids=ids, attention_mask=mask).logits, expected, **TOL)
    # The chunked layer: its rule as a block mask (chunks shifted by the left padding, causal, the key
    # padding), never a dense [B, 1, Lq, Lk] tensor; the full layer: the key padding.
    chunked, full = calls
    assert isinstance(chunked, attn_ops.BlockMask) and chunked.shape == (3, 1, SEQ, SEQ)
    assert torch.equal(chunked.to_dense(), _chunked_dense(mask, 4))
    assert tuple(full.shape) == (3, 1, 1, SEQ)


def test_chunked_attention_continued_past_a_cache_takes_the_offsets_of_sdpa_mask(calls):
    """Three more tokens after a cached prompt: the chunked layer's cache keeps the last chunk's keys
    (kv_offset 6 of 12 positions, queries at 9 to 11): its block mask is transformers' rule at those
    offsets, the logits sdpa's."""
    model = _llama4()
    ids, mask = _batch("left")
    more, longer = torch.randint(0, VOCAB, (3, 3)), torch.cat([mask, torch.ones(3, 3, dtype=mask.dtype)], 1)
    logits = {}
    for implementation in ("sdpa", "attn_ops"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            logits[implementation] = model(input_ids=more, attention_mask=longer, past_key_values=cache).logits
    torch.testing.assert_close(logits["attn_ops"], logits["sdpa"], **TOL)
    chunked = calls[2]
    assert isinstance(chunked, attn_ops.BlockMask) and chunked.shape == (3, 1, 3, 6)
    assert torch.equal(chunked.to_dense(), _chunked_dense(longer, 4)[:, :, SEQ:, 6:])


def test_chunked_attention_within_one_chunk_is_causal_with_the_key_padding(calls):
    """Every key in the first chunk (counted from each row's first real token): no block mask to
    build, the key padding and the module's causal rule, as for a plain causal layer."""
    model = _llama4(chunk=16)
    ids, mask = _batch("left")
    expected = _run(model, "sdpa", input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(_run(model, "attn_ops", input_ids=ids, attention_mask=mask).logits, expected, **TOL)
    assert [tuple(m.shape) for m in calls] == [(3, 1, 1, SEQ)] * 2


@pytest.mark.parametrize("chunk", [8, 4])
def test_packed_sequences_on_a_chunked_layer_run_as_causal_sequences_within_the_chunk(chunk, varlen_calls):
    """flash-attn's keywords, sequences of 8 and 6 tokens: with chunks of 8 each sequence is causal
    (the separate runs' logits); with chunks of 4 they are not, and the call says so."""
    model = _llama4(chunk)
    ids, positions = torch.randint(0, VOCAB, (1, 14)), torch.cat([torch.arange(8), torch.arange(6)])[None]
    cu = torch.tensor([0, 8, 14], dtype=torch.int32)
    packed = dict(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8,
                  max_length_k=8)
    if chunk < 8:
        with pytest.raises(ValueError, match=r"max_length_q <= its attention_chunk_size \(4\)"):
            _run(model, "attn_ops", **packed)
        return
    separate = torch.cat([_run(model, "sdpa", input_ids=ids[:, a:b]).logits for a, b in ((0, 8), (8, 14))], dim=1)
    torch.testing.assert_close(_run(model, "attn_ops", **packed).logits, separate, **TOL)
    assert varlen_calls == [[0, 8, 14]] * 2


def test_chunked_attention_generation_matches_sdpa(calls, decode_calls):
    """The prompt's chunked layer takes its block mask; each decoding step's one-row mask goes to the
    split-KV kernels as a key mask."""
    ids, mask = _batch("left")
    _generate_as_sdpa(_llama4(), ids, mask, 4)
    assert isinstance(calls[0], attn_ops.BlockMask)
    assert len(decode_calls) == 2 * 3


def test_config_attn_implementation_selects_the_op(calls):
    config = _llama().config
    config._attn_implementation = "attn_ops"
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (1, SEQ)))
    assert calls


def _gemma2():
    # Layer 0 slides (window 4 < SEQ), layer 1 is global. Weights 10x the default and a cap of 1 put
    # the scores where tanh bends: without the cap the logits move by ~0.05.
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
        attn_logit_softcapping=1.0, initializer_range=0.2,
    )
    assert config.layer_types == ["sliding_attention", "full_attention"]
    return transformers.Gemma2ForCausalLM(config).eval()


def _gpt_oss():
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, num_local_experts=4, num_experts_per_tok=2,
    )
    assert config.layer_types == ["sliding_attention", "full_attention"]
    return transformers.GptOssForCausalLM(config).eval()


# Against eager, the implementation these models default to. Right padding: with left padding the
# padded queries see no key, and eager averages their values where the op (as SDPA) gives zeros.
@pytest.mark.parametrize("make", [_gemma2, _gpt_oss], ids=["gemma2_softcap", "gpt_oss_sinks"])
def test_sliding_window_models_with_score_modifiers_match_eager(make, calls):
    model = make()
    ids, mask = _batch("right")
    expected = _run(model, "eager", input_ids=ids, attention_mask=mask).logits
    actual = _run(model, "attn_ops", input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, **TOL)
    # The global and the sliding layer's key padding [B, 1, 1, Lk] (the window a rule).
    assert [tuple(m.shape) for m in calls] == [(3, 1, 1, SEQ)] * 2


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=DEVICES[0].marks)])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_t5_with_position_bias_matches_eager_logits_and_bias_gradients(padded, backend, calls):
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids, mask = _batch("right")
    inputs = dict(input_ids=ids, decoder_input_ids=ids[:, 3:])
    if padded:  # the bias joins the padding in one mask; the decoder's rows (6, 3, 5 real tokens) add causal
        inputs.update(attention_mask=mask, decoder_attention_mask=mask[:, 3:])
    biases = [stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
              for stack in (model.encoder, model.decoder)]
    results = {}
    for implementation in ("eager", "attn_ops"):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        with attn_ops.use_backend(backend if implementation == "attn_ops" else "auto"):
            logits = model(**inputs).logits
            logits.square().sum().backward()  # through the kernels' mask gradient with "triton"
        results[implementation] = logits.detach(), [bias.grad for bias in biases]
    torch.testing.assert_close(results["attn_ops"], results["eager"], **TOL)
    # 2 encoder layers, then 2 decoder layers of self and cross attention. Unpadded, the bias goes
    # in alone (its gradient from the op in its own shape), the decoder's causal rule from the module.
    encoder, decoder_self, cross = ((3, 1, SEQ, SEQ), (3, 1, 1, SEQ - 3), (3, 1, SEQ - 3, SEQ)) if padded else (None,) * 3
    assert [m if m is None else tuple(m.shape) for m in calls] == [encoder] * 2 + [decoder_self, cross] * 2


# One tiny batch each: the Triton interpreter runs each program block step in Python. gpt-oss puts
# its sinks through the kernels, in the normalizer of the sliding layer's dense mask and of the
# global layer's padding with the causal rule; it is compared with eager, its default.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make, padding_side, peer",
                         [(_llama, "left", "sdpa"), (_gpt_oss, "right", "eager"), (_llama4, "left", "sdpa")],
                         ids=["llama", "gpt_oss_sinks", "llama4_chunked"])
def test_kernel_path_matches_the_models_peer(device, make, padding_side, peer):
    model = make().to(device)
    ids, mask = (t.to(device) for t in _batch(padding_side))
    expected = _run(model, peer, input_ids=ids, attention_mask=mask).logits
    with attn_ops.use_backend("triton"):
        actual = _run(model, "attn_ops", input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, **TOL)


@pytest.fixture
def varlen_calls(monkeypatch):
    """The cu_seqlens of each call our attention function makes to varlen_attention."""
    seen = []

    def spy(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs):
        seen.append(cu_seqlens_q.tolist())
        return attn_ops.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs)

    monkeypatch.setattr(attn_ops.hf, "varlen_attention", spy)
    return seen


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=DEVICES[0].marks), "reference"])
def test_packed_row_trains_as_the_padded_batch(backend, varlen_calls):
    # One row of three sequences, position_ids restarting at 0 (DataCollatorWithFlattening's
    # format), against the same sequences right-padded: equal logits and equal weight gradients.
    model = _llama()
    model.set_attn_implementation("attn_ops")
    lengths = (5, 9, 3)
    sequences = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    weights = [torch.randn(n, VOCAB) for n in lengths]
    padded = torch.zeros(3, max(lengths), dtype=torch.long)
    mask = torch.zeros(3, max(lengths), dtype=torch.long)
    for row, seq in enumerate(sequences):
        padded[row, :len(seq)], mask[row, :len(seq)] = seq, 1
    results = []
    with attn_ops.use_backend(backend):
        # Without a cache, as in training: transformers detects the packing only then.
        for inputs in ({"input_ids": torch.cat(sequences)[None], "use_cache": False,
                        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]},
                       {"input_ids": padded, "attention_mask": mask}):
            logits = model(**inputs).logits
            rows = list(logits[0].split(lengths)) if logits.shape[0] == 1 else [logits[r, :n] for r, n in enumerate(lengths)]
            loss = sum((row * w).sum() for row, w in zip(rows, weights))
            results.append((torch.cat(rows).detach(), torch.autograd.grad(loss, list(model.parameters()))))
    (packed, packed_grads), (expected, expected_grads) = results
    torch.testing.assert_close(packed, expected, **TOL)
    for actual, wanted in zip(packed_grads, expected_grads):
        torch.testing.assert_close(actual, wanted, atol=1e-4, rtol=1e-4)
    assert varlen_calls == [[0, 5, 14, 17]] * 2  # both layers, forward only: the backward reuses the graph


def test_restarting_positions_with_a_cache_are_one_sequence_as_in_sdpa(varlen_calls):
    # With a cache transformers does not detect packing and passes no mask: one causal row, as sdpa
    # computes it; cu_seq_lens given explicitly still mean packed sequences.
    model = _llama()
    ids = torch.randint(0, VOCAB, (1, 14))
    positions = torch.cat([torch.arange(8), torch.arange(6)])[None]
    expected = _run(model, "sdpa", input_ids=ids, position_ids=positions, use_cache=True).logits
    actual = _run(model, "attn_ops", input_ids=ids, position_ids=positions, use_cache=True).logits
    torch.testing.assert_close(actual, expected, **TOL)
    assert varlen_calls == []
    cu = torch.tensor([0, 8, 14], dtype=torch.int32)
    flash_kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8, max_length_k=8)
    packed = _run(model, "attn_ops", input_ids=ids, position_ids=positions, use_cache=True, **flash_kwargs).logits
    separate = torch.cat([_run(model, "sdpa", input_ids=ids[:, a:b]).logits for a, b in ((0, 8), (8, 14))], dim=1)
    torch.testing.assert_close(packed, separate, **TOL)
    assert varlen_calls == [[0, 8, 14]] * 2


def _packed_sliding_window_row():
    """A one-layer Mistral with a window of 3, and one row packing sequences of 8 and 6 tokens."""
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=3,
    )
    positions = torch.cat([torch.arange(8), torch.arange(6)])[None]
    return transformers.MistralForCausalLM(config).eval(), torch.randint(0, VOCAB, (1, 14)), positions


def test_packed_row_with_a_sliding_window_keeps_the_dense_mask(varlen_calls):
    # The mask transformers builds for a sliding layer says more than "within each sequence".
    model, ids, positions = _packed_sliding_window_row()
    expected = _run(model, "sdpa", input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(_run(model, "attn_ops", input_ids=ids, position_ids=positions).logits, expected, **TOL)
    assert varlen_calls == []


def test_missing_transformers_raises_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when absent
    with pytest.raises(ImportError, match=r"attn-ops\[hf\]"):
        attn_ops.register_transformers()


def test_a_decoding_step_passes_its_key_mask_and_visits_no_key_past_a_rows_last_visible_one():
    from attn_ops.hf import _decoding_step

    query, key = torch.randn(2, 2, 1, 8), torch.randn(2, 1, 6, 8)
    assert _decoding_step(query, key, key, None, None, 0.0) == (6, None)  # no mask: every key, an int
    mask = torch.zeros(2, 1, 1, 6, dtype=torch.bool)
    mask[..., :4] = True  # a static cache's mask: its unused tail hidden
    lengths, key_mask = _decoding_step(query, key, key, None, mask, 0.0)
    assert lengths.tolist() == [4, 4] and key_mask.data_ptr() == mask.data_ptr()  # a view, as it is
    mask[1, ..., 0] = False  # left padding
    mask[1, ..., 5] = True
    lengths, key_mask = _decoding_step(query, key, key, None, mask, 0.0)
    assert lengths.tolist() == [4, 6] and torch.equal(key_mask, mask.view(2, 6))
    # A per-head mask [1, Hq, 1, Lk] is not a per-row one, even with Hq = B elements to spare.
    assert _decoding_step(query, key, key, None, mask.view(1, 2, 1, 6), 0.0) is None


@pytest.mark.parametrize("device", DEVICES)
def test_a_compiled_static_cache_decoding_step_takes_the_split_kv_kernels(device, monkeypatch):
    # transformers compiles static-cache generation: its decoding steps pass a [B, 1, 1, capacity]
    # bool mask (the unused tail and any padding hidden), which must reach the split-KV kernels
    # without a host read (a graph break under fullgraph=True) and without scanning the whole buffer.
    launches = []
    decode_fwd = attn_ops.decode.decode_fwd
    monkeypatch.setattr(attn_ops.decode, "decode_fwd",
                        lambda *args, **kw: launches.append(args[3]) or decode_fwd(*args, **kw))
    module = types.SimpleNamespace(is_causal=True)
    q = torch.randn(2, 4, 1, 8, device=device)
    k, v = torch.randn(2, 2, 16, 8, device=device), torch.randn(2, 2, 16, 8, device=device)
    mask = torch.zeros(2, 1, 1, 16, dtype=torch.bool, device=device)
    mask[..., :6] = True
    mask[1, ..., :2] = False  # left padding
    step = torch.compile(lambda *inputs: attn_ops.hf.attention_forward(module, *inputs, scaling=0.3)[0], fullgraph=True)
    with attn_ops.use_backend("triton"), torch.no_grad():
        out = step(q, k, v, mask)
    assert [lengths.tolist() for lengths in launches] == [[6, 6]]
    expected = attn_ops.reference.attention(q, k, v, mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_packed_row_keywords_with_a_sliding_window_keep_the_window(varlen_calls):
    # flash-attn's cu_seq_lens keywords are taken as transformers' flash path takes them: with the
    # module's sliding_window, not the mask, so a sliding layer's packed row keeps its window.
    model, ids, positions = _packed_sliding_window_row()
    cu = torch.tensor([0, 8, 14], dtype=torch.int32)
    packed = _run(model, "attn_ops", input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=8, max_length_k=8).logits
    separate = torch.cat([_run(model, "sdpa", input_ids=ids[:, a:b]).logits for a, b in ((0, 8), (8, 14))], dim=1)
    torch.testing.assert_close(packed, separate, **TOL)
    assert varlen_calls == [[0, 8, 14]]


def _gemma4(k_eq_v=False):
    """Gemma 4's text model, tiny: sliding layers of head dim 8 (window 4 < SEQ) and global layers of
    512 (its `global_head_dim`), the last two layers reusing the first two's keys and values
    (`num_kv_shared_layers`, whose prompt pass transformers shortens to the kept logits, slicing every
    mask's query rows)."""
    config = transformers.Gemma4TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
        vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, attention_k_eq_v=k_eq_v,
    )
    model = transformers.Gemma4ForCausalLM(config).eval()
    assert [layer.self_attn.head_dim for layer in model.model.layers] == [8, 512, 8, 512]
    return model


@pytest.mark.parametrize("k_eq_v", [False, True], ids=["", "k_eq_v"])
def test_gemma4_kv_shared_layers_take_our_sliced_masks_and_generate_as_eager(k_eq_v, calls, decode_calls):
    """transformers slices each mask's rows (``mask[:, :, -1:, :]``) before the KV-shared layers: our
    key padding is four-dimensional with one row, so the slice keeps it (a 2-D one raised IndexError)."""
    model = _gemma4(k_eq_v)
    ids, mask = _batch("left")
    expected = _run(model, "eager", input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    actual = _run(model, "attn_ops", input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    torch.testing.assert_close(actual, expected, **TOL)
    assert calls and all(tuple(m.shape) == (3, 1, 1, SEQ) for m in calls)
    decode_calls.clear()
    _generate_as_sdpa(model, ids, mask, 3, peer="eager")
    # On the split-KV kernels: the KV-shared layers' one kept row of the prompt, then every layer's
    # two decoding steps.
    assert len(decode_calls) == 2 + 4 * 2


@pytest.mark.parametrize("device", DEVICES)
def test_gemma4_through_the_kernels_at_head_dim_512(device):
    """A training step (right padding: logits and a global layer's gradients) within twice eager's
    float32 error of float64 eager (Gemma 4 scales scores by 1.0 over 512 dims: float32 eager is
    1e-5 off there), and greedy generation (decoding steps on the split-KV kernels at D = 512 for the
    global layers) with eager's tokens (left padding, as transformers generates)."""
    model = _gemma4().to(device)
    ids, mask = (t.to(device) for t in _batch("right"))

    def training_step(model, implementation):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        with attn_ops.use_backend("triton"):
            logits = model(input_ids=ids, attention_mask=mask).logits
            (logits * mask[..., None]).square().sum().backward()
        return [logits.detach().double()] + [p.grad.double() for p in model.model.layers[1].self_attn.parameters()]

    ours, eager = training_step(model, "attn_ops"), training_step(model, "eager")
    truth = training_step(copy.deepcopy(model).double(), "eager")
    for actual, plain, wide in zip(ours, eager, truth):
        assert (actual - wide).abs().max() <= 2 * (plain - wide).abs().max() + 1e-6
    with attn_ops.use_backend("triton"):
        _generate_as_sdpa(model, *(t.to(device) for t in _batch("left")), 2, peer="eager")
