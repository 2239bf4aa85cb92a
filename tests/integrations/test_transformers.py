"""The Hugging Face backend on real model classes of ``transformers`` (small
configs, random weights): equal to ``sdpa``/``eager`` where the pattern covers
the sequence, equal to the reference per layer where it does not, packed
documents, left-padded generation, training options, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dilated_attention_pytorch.integrations import transformers as dilated_hf  # noqa: E402
from dilated_attention_pytorch.reference import dilated_attention_reference  # noqa: E402

from ..conftest import TOLERANCES, assert_close, relative_error  # noqa: E402

VOCAB = 97


def _config(family: str, **overrides):
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    elif family == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
    elif family == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=8)
    else:
        raise ValueError(family)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _models(family, implementations, seed=0, dtype=torch.float64, **overrides):
    """One model per implementation, all with the same weights."""
    cls = getattr(transformers, CLASSES[family])
    torch.manual_seed(seed)
    base = cls._from_config(_config(family, **overrides), attn_implementation="sdpa").to(dtype)
    models = []
    for name in implementations:
        model = cls._from_config(copy.deepcopy(base.config), attn_implementation="sdpa").to(dtype)
        model.load_state_dict(base.state_dict())
        if name == "dilated":
            dilated_hf.set_dilated_attention(model, *PATTERN)
        elif name == "reference":
            model.config.dilated_attention = {"segment_lengths": PATTERN[0], "dilation_rates": PATTERN[1]}
            model.set_attn_implementation("reference")
        else:
            model.set_attn_implementation(name)
        models.append(model.eval())
    return models


PATTERN = ([4, 8], [1, 2])


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """reference.py per row, each row from its first kept key; layer patterns
    from the config (no code of the backend under test)."""
    settings = module.config.dilated_attention
    layer = (settings.get("layers") or {}).get(str(module.layer_idx), {})
    seg = layer.get("segment_lengths", settings["segment_lengths"])
    dil = layer.get("dilation_rates", settings["dilation_rates"])
    mode = layer.get("head_mode", settings.get("head_mode", "grouped"))
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    b, lq = q.shape[:2]
    lk = k.shape[1]
    out = torch.zeros(b, lq, q.shape[2], v.shape[-1], dtype=q.dtype, device=q.device)
    for row in range(b):
        keep = (
            torch.ones(lk, dtype=torch.bool, device=q.device)
            if attention_mask is None
            else attention_mask[row]
        )
        if not keep.any():
            continue
        start = int(keep.int().argmax())
        first_query = max(0, start - (lk - lq))
        out[row, first_query:] = dilated_attention_reference(
            q[row : row + 1, first_query:], k[row : row + 1, start:], v[row : row + 1, start:], seg, dil,
            head_mode=mode, is_causal=True, key_padding_mask=~keep[None, start:], softmax_scale=scaling,
        )[0]  # fmt: skip
    return out, None


transformers.AttentionInterface.register("reference", _reference_attention)
transformers.masking_utils.AttentionMaskInterface.register("reference", dilated_hf.padding_mask)


def _batch(seed=3, batch=3, n=21):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, n), generator=gen)
    left = torch.ones(batch, n, dtype=torch.long)
    left[min(1, batch - 1), :6] = 0
    left[-1, :11] = 0
    right = torch.ones(batch, n, dtype=torch.long)
    right[0, 15:] = 0
    right[-1, 9:] = 0
    return ids, {"none": None, "left": left, "right": right}


def _kept(mask, like):
    return torch.ones(like.shape[:2], dtype=torch.bool) if mask is None else mask.bool()


def test_registered_names():
    assert dilated_hf.NAME in transformers.AttentionInterface()
    assert dilated_hf.NAME in transformers.masking_utils.AttentionMaskInterface()
    (model,) = _models("llama", ["dilated"])
    assert model.config._attn_implementation == "dilated"


def test_the_mask_function_never_builds_a_dense_mask():
    """At a million tokens the mask transformers hands the backend is the 2-D
    padding mask or nothing, never (n x n)."""
    n = 1 << 20
    keep = torch.ones(1, n, dtype=torch.bool)
    assert dilated_hf.padding_mask(1, n, n, attention_mask=keep) is None
    keep[0, :7] = False
    mask = dilated_hf.padding_mask(1, n, n, attention_mask=keep)
    assert mask.shape == (1, n) and mask.dtype == torch.bool and not mask[0, :7].any()
    # a decoding step: one query, the whole context of keys
    assert dilated_hf.padding_mask(1, 1, n, q_offset=n - 1, attention_mask=keep).shape == (1, n)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("other", ["sdpa", "eager"])
def test_a_covering_pattern_equals_dense_attention(family, padding, other):
    """segment_lengths=[n], dilation_rates=[1]: dense causal attention; logits
    and every parameter's gradient equal sdpa's and eager's."""
    # eager takes its softmax in float32 whatever the model's dtype (and its
    # float64 padding mask overflows there): compared in float32
    dtype = torch.float32 if other == "eager" else torch.float64
    models = _models(family, ["dilated", other], dtype=dtype)
    dilated_hf.set_dilated_attention(models[0], [64], [1])
    ids, masks = _batch()
    mask = masks[padding]
    results = []
    for model in models:
        logits = model(ids, attention_mask=mask).logits
        kept = _kept(mask, ids)
        loss = logits[kept].square().mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((logits[kept], grads))
    assert_close(results[0][0], results[1][0], dtype, "logits")
    for (name, _), a, b in zip(models[0].named_parameters(), results[0][1], results[1][1]):
        assert_close(a, b, dtype, f"d{name}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_a_dilated_pattern_equals_the_reference_per_layer(family, padding):
    dilated, reference, sdpa = _models(family, ["dilated", "reference", "sdpa"])
    ids, masks = _batch()
    mask = masks[padding]
    kept = _kept(mask, ids)
    out = dilated(ids, attention_mask=mask).logits[kept]
    assert_close(out, reference(ids, attention_mask=mask).logits[kept], torch.float64, "logits")
    # the pattern is really sparse here: dense attention differs
    assert (out - sdpa(ids, attention_mask=mask).logits[kept]).abs().max() > 1e-3


def test_per_layer_patterns_and_head_mode():
    dilated, reference = _models("llama", ["dilated", "reference"])
    layers = {1: {"segment_lengths": [6, 12], "dilation_rates": [2, 3], "head_mode": "all"}}
    dilated_hf.set_dilated_attention(dilated, *PATTERN, layers=layers)
    reference.config.dilated_attention = copy.deepcopy(dilated.config.dilated_attention)
    assert dilated_hf.layer_pattern(dilated.config, 1).head_mode == "all"
    assert dilated_hf.layer_pattern(dilated.config, 0).segment_lengths == (4, 8)
    ids, masks = _batch()
    for mask in masks.values():
        kept = _kept(mask, ids)
        assert_close(
            dilated(ids, attention_mask=mask).logits[kept],
            reference(ids, attention_mask=mask).logits[kept],
            torch.float64,
            "logits",
        )


def test_save_and_load_keep_the_pattern(tmp_path):
    (model,) = _models("qwen2", ["dilated"])
    dilated_hf.set_dilated_attention(
        model, [4, 8], [1, 2], head_mode="all", layers={0: {"dilation_rates": [1, 1]}}
    )
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="dilated", dtype=torch.float64
    ).eval()
    assert loaded.config._attn_implementation == "dilated"
    assert loaded.config.dilated_attention == model.config.dilated_attention
    ids, masks = _batch()
    kept = masks["left"].bool()
    after = loaded(ids, attention_mask=masks["left"]).logits[kept]
    before = model(ids, attention_mask=masks["left"]).logits[kept]
    assert_close(after, before, torch.float64, "logits after loading")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_left_padded_greedy_generate_equals_one_prompt_at_a_time(family):
    (model,) = _models(family, ["dilated"])
    ids, masks = _batch()
    mask = masks["left"]
    kw = {
        "max_new_tokens": 12,
        "do_sample": False,
        "pad_token_id": 0,
        "eos_token_id": None,
        "output_scores": True,
    }
    batched = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kw)
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        alone = model.generate(ids[row : row + 1, start:], return_dict_in_generate=True, **kw)
        assert torch.equal(alone.sequences[0], batched.sequences[row, start:])
        for step, (a, b) in enumerate(zip(alone.scores, batched.scores)):
            # generate returns float32 scores
            assert_close(b[row], a[0], torch.float32, f"row {row} step {step} scores")


def test_sampled_generate_scores_equal_a_forward_of_its_tokens():
    """Sampling with the cache, batched and left-padded: each step's logits
    equal a forward of that row's prompt and sampled tokens, alone and uncached."""
    (model,) = _models("llama", ["dilated"])
    ids, masks = _batch()
    mask = masks["left"]
    torch.manual_seed(0)
    result = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=0, temperature=1.0,
        pad_token_id=0, eos_token_id=None, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    n = ids.shape[1]
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        tokens = result.sequences[row : row + 1, start:]
        logits = model(tokens).logits[0]
        for step, step_logits in enumerate(result.logits):
            expected = logits[n - start - 1 + step].float()  # generate returns float32 logits
            assert_close(step_logits[row], expected, torch.float32, f"row {row} step {step}")


@pytest.mark.parametrize("family,head_mode", [("llama", "grouped"), ("qwen2", "all")])
def test_dilated_cache_generates_what_the_full_cache_does(family, head_mode):
    """The constant-size cache: the same tokens and scores as the default cache,
    over prompts and continuations that cross several windows."""
    (model,) = _models(family, ["dilated"])
    dilated_hf.set_dilated_attention(model, [4, 8, 12], [1, 2, 3], head_mode=head_mode)
    ids = _batch(batch=2, n=29)[0]
    kw = {"max_new_tokens": 30, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    kw.update(output_scores=True, return_dict_in_generate=True)
    full = model.generate(ids, **kw)
    cache = dilated_hf.DilatedCache(model.config)
    constant = model.generate(ids, **dilated_hf.cache_kwargs(cache), **kw)
    assert torch.equal(constant.sequences, full.sequences)
    for step, (a, b) in enumerate(zip(constant.scores, full.scores)):
        assert_close(a, b, torch.float32, f"step {step} scores")
    assert cache.get_seq_length() == 29 + 30 - 1


def test_the_cache_goes_by_the_name_of_the_installed_release():
    """``cache_kwargs`` and ``output_cache``: ``cache`` from transformers 5.24 (where
    ``past_key_values`` warns), ``past_key_values`` before; generate and a forward
    with them warn of nothing, and the cache they return is the one passed."""
    import warnings

    import transformers

    release = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    marker = object()
    name = "cache" if release >= (5, 24) else "past_key_values"
    assert dilated_hf.cache_kwargs(marker) == {name: marker}  # type: ignore[arg-type]
    (model,) = _models("llama", ["dilated"])
    ids = _batch(batch=1, n=16)[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        cache = dilated_hf.DilatedCache(model.config)
        out = model.generate(
            ids, **dilated_hf.cache_kwargs(cache), max_new_tokens=3, do_sample=False, pad_token_id=0,
            return_dict_in_generate=True,
        )  # fmt: skip
        assert dilated_hf.output_cache(out) is cache
        step = model(out.sequences[:, -1:], **dilated_hf.cache_kwargs(cache), use_cache=True)
        assert dilated_hf.output_cache(step) is cache
    assert cache.get_seq_length() == 16 + 3


def test_dilated_cache_memory_does_not_grow_with_the_context():
    (model,) = _models("llama", ["dilated"])
    ids = _batch(batch=1, n=16)[0]
    sizes = []
    for new_tokens in (2, 40):
        cache = dilated_hf.DilatedCache(model.config)
        kw = dilated_hf.cache_kwargs(cache)
        model.generate(ids, **kw, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sizes.append(cache.nbytes())
    # 2 layers x (keys, values) x (4 + ceil(8 / 2)) slots x one pair per branch x head_dim 8 x float64
    assert sizes[0] == sizes[1] == 2 * 2 * (4 + 4) * 1 * 8 * 8


def test_dilated_cache_refuses_padding_and_beam_search():
    (model,) = _models("llama", ["dilated"])
    ids, masks = _batch(n=30)

    def cache():
        return dilated_hf.cache_kwargs(dilated_hf.DilatedCache(model.config))

    with pytest.raises(ValueError, match="DilatedCache needs rows without padding"):
        model.generate(
            ids, attention_mask=masks["left"], **cache(), max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, **cache(), max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)


def _documents(lengths, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("form", ["position_ids", "flash_kwargs"])
def test_packed_documents_equal_each_document_alone(family, form):
    (model,) = _models(family, ["dilated"])
    docs = _documents([9, 1, 17, 5, 30])
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    kw = {"position_ids": position_ids}
    if form == "flash_kwargs":
        cu = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()], dtype=torch.int32)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=30, max_length_k=30)
    logits = model(packed, **kw).logits[0]
    alone = torch.cat([model(d[None]).logits[0] for d in docs])
    assert_close(logits, alone, torch.float64, "packed logits")


def test_training_step_gradient_checkpointing_and_autocast():
    dilated, reference = _models("llama", ["dilated", "reference"], dtype=torch.float32)
    ids, masks = _batch()
    mask = masks["right"]
    kept = mask.bool()
    grads = []
    for model, checkpointing in ((reference, False), (dilated, True)):
        model.train()
        if checkpointing:
            # renamed in transformers 5.24; the old name warns there
            enable = (
                getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            )
            enable()
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(~kept, -100)).loss
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads):
        assert_close(b, a, torch.float32, "gradient with checkpointing")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dilated(ids, attention_mask=mask, labels=ids.masked_fill(~kept, -100)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dilated.parameters())


@pytest.mark.slow  # torch.compile of a whole model
def test_torch_compile_of_the_model():
    (model,) = _models("llama", ["dilated"], dtype=torch.float32)
    ids, _ = _batch(batch=2, n=24)
    compiled = torch.compile(model, backend="aot_eager")
    expected = model(ids, labels=ids)
    got = compiled(ids, labels=ids)
    assert_close(got.logits, expected.logits, torch.float32, "compiled logits")
    grads = [torch.autograd.grad(out.loss, list(model.parameters())) for out in (got, expected)]
    for a, b in zip(*grads):
        assert_close(a, b, torch.float32, "compiled gradient")


@pytest.mark.parametrize("batch", [1, 2])
def test_no_graph_break_in_a_compiled_model(batch):
    (model,) = _models("llama", ["dilated"], dtype=torch.float32)
    dilated_hf.set_dilated_attention(model, *PATTERN, detect_packed_sequences=False)
    ids = torch.randint(3, VOCAB, (batch, 24), generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_packed_detection_can_be_switched_off():
    (model,) = _models("llama", ["dilated"])
    docs = _documents([9, 12])
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    detected = model(packed, position_ids=position_ids).logits
    dilated_hf.set_dilated_attention(model, *PATTERN, detect_packed_sequences=False)
    one_row = model(packed, position_ids=position_ids).logits
    assert_close(detected[0, :9], one_row[0, :9], torch.float64, "first document")
    assert (detected[0, 9:] - one_row[0, 9:]).abs().max() > 1e-3  # one sequence: no document bounds


def test_left_padded_rows_run_as_one_packed_call(monkeypatch):
    """A left-padded batch (a prefill) runs its rows as documents of one varlen
    call per layer, not one call per distinct start."""
    calls = []
    original = dilated_hf.dilated_attention_varlen

    def spy(query, *args, **kwargs):
        calls.append((query.shape[0], tuple(args[2].tolist())))
        return original(query, *args, **kwargs)

    monkeypatch.setattr(dilated_hf, "dilated_attention_varlen", spy)
    (model,) = _models("llama", ["dilated"])
    ids, masks = _batch()
    model(ids, attention_mask=masks["left"])
    n = ids.shape[1]
    assert calls == [(3 * n - 6 - 11, (0, n, 2 * n - 6, 3 * n - 17))] * 2  # one per layer


def test_grouped_query_heads_are_not_repeated(monkeypatch):
    """The backend hands the core key/value with kv_heads heads."""
    seen = []
    original = dilated_hf._dilated_attention

    def spy(query, key, *args, **kwargs):
        seen.append((query.shape[2], key.shape[2]))
        return original(query, key, *args, **kwargs)

    monkeypatch.setattr(dilated_hf, "_dilated_attention", spy)
    (model,) = _models("llama", ["dilated"])
    model(_batch()[0])
    assert seen and all(pair == (4, 2) for pair in seen)


# --- refusals -------------------------------------------------------------------


def test_unsupported_family_is_refused():
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        dilated_hf.set_dilated_attention(config, *PATTERN)


def test_a_sliding_window_is_refused():
    config = transformers.MistralConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2)
    assert config.sliding_window is not None
    with pytest.raises(ValueError, match="sliding_window"):
        dilated_hf.set_dilated_attention(config, *PATTERN)


def test_mixed_layer_types_are_refused():
    config = _config("qwen2", use_sliding_window=True, sliding_window=None)
    config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="layer_types"):
        dilated_hf.set_dilated_attention(config, *PATTERN)


def test_output_attentions_is_refused():
    (model,) = _models("llama", ["dilated"])
    with pytest.raises(ValueError, match="output_attentions"):
        model(_batch()[0], output_attentions=True)


def test_a_missing_pattern_is_refused():
    (model,) = _models("llama", ["sdpa"])
    model.set_attn_implementation("dilated")
    with pytest.raises(ValueError, match="set_dilated_attention"):
        model(_batch()[0])


def test_an_invalid_pattern_is_refused():
    config = _config("llama")
    with pytest.raises(ValueError, match="segment_lengths and dilation_rates"):
        dilated_hf.set_dilated_attention(config, [4, 8], [1])
    with pytest.raises(ValueError, match="unknown keys"):
        dilated_hf.set_dilated_attention(config, [4], [1], layers={0: {"window": 3}})


def test_a_custom_4d_mask_is_refused():
    (model,) = _models("llama", ["dilated"])
    ids = _batch()[0]
    mask = torch.ones(ids.shape[0], 1, ids.shape[1], ids.shape[1], dtype=torch.bool)
    with pytest.raises(ValueError, match="2-D padding mask"):
        model(ids, attention_mask=mask)


def test_cross_attention_is_refused():
    (model,) = _models("llama", ["dilated"])
    layer = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="cross-attention"):
        dilated_hf.dilated_attention_forward(layer, q, k, k, None, is_causal=False)


def test_a_static_cache_is_refused():
    (model,) = _models("llama", ["dilated"])
    ids = _batch()[0]
    with pytest.raises(ValueError, match="static or sliding caches"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static", do_sample=False, pad_token_id=0)


# --- on the GPU -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_gpu_logits_and_gradients_equal_the_reference(dtype, padding):
    """On CUDA in low precision: the backend (fast path) against the reference
    backend in float64 on the same weights, logits and gradients."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dilated, low, exact = _models("llama", ["dilated", "reference", "reference"], dtype=torch.float64)
    dilated, low = dilated.to("cuda", dtype), low.to("cuda", dtype)
    # the float64 model holds the low-precision weights exactly
    exact.load_state_dict({k: v.double().cpu() for k, v in dilated.state_dict().items()})
    ids, masks = _batch(n=300)
    mask = masks[padding]
    kept = _kept(mask, ids)
    results = []
    for model, device in ((dilated, "cuda"), (low, "cuda"), (exact, "cpu")):
        logits = model(ids.to(device), attention_mask=None if mask is None else mask.to(device)).logits
        chosen = logits[kept.to(device)]
        grads = torch.autograd.grad(chosen.float().square().mean(), list(model.parameters()))
        results.append([chosen.double().cpu(), *(g.double().cpu() for g in grads)])
    names = ["logits", *(f"d{name}" for name, _ in dilated.named_parameters())]
    for name, ours, theirs, truth in zip(names, *results):
        # as accurate as the reference computed in the same precision
        bound = max(2 * relative_error(theirs, truth), TOLERANCES[dtype])
        assert relative_error(ours, truth) <= bound, name


@pytest.mark.gpu
def test_gpu_batched_left_padded_generate_equals_one_prompt_at_a_time():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    (model,) = _models("llama", ["dilated"], dtype=torch.float32)
    model = model.cuda()
    ids, masks = _batch(n=200)
    ids, mask = ids.cuda(), masks["left"].cuda()
    kw = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    batched = model.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kw)
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        alone = model.generate(
            ids[row : row + 1, start:], output_scores=True, return_dict_in_generate=True, **kw
        )
        for step, (a, b) in enumerate(zip(alone.scores, batched.scores)):
            assert_close(b[row], a[0], torch.float32, f"row {row} step {step} scores")


@pytest.mark.gpu
def test_gpu_inductor_compiled_model_equals_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    (model,) = _models("llama", ["dilated"], dtype=torch.float32)
    dilated_hf.set_dilated_attention(model, *PATTERN, detect_packed_sequences=False)
    model = model.cuda()
    ids = _batch(n=256)[0].cuda()
    compiled = torch.compile(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, got = model(ids, labels=ids), compiled(ids, labels=ids)
    assert_close(got.logits.float(), expected.logits.float(), torch.bfloat16, "compiled logits")
    grads = [torch.autograd.grad(out.loss, list(model.parameters())) for out in (got, expected)]
    for a, b in zip(*grads):
        assert_close(a, b, torch.bfloat16, "compiled gradient")
