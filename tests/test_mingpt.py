"""Tests of mingpt.py: causality, the key/value cache, sampling filters, optimizer groups, taming parity and the
int8 sampling weights."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mingpt import GPT, GPTConfig, Int8Linear, filter_logits, sample_next

FIXTURES = Path(__file__).parent / "fixtures" / "taming_tiny"


def tiny_gpt(**kwargs):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"vocab_size": 50, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32,
                            **kwargs})).eval()


def test_causality():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 20))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 50
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits_changed[:, :10], logits[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(logits_changed[:, 10:], logits[:, 10:])


def test_loss_is_cross_entropy_over_all_positions():
    model = tiny_gpt()
    idx, targets = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 12, 50)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits.transpose(1, 2), targets))


def test_cached_greedy_generation_matches_naive_loop():
    model = tiny_gpt()
    prompt = torch.randint(0, 50, (3, 5))
    cached = model.generate(prompt, 40, top_k=1)
    naive = prompt
    with torch.no_grad():
        for _ in range(40):
            logits, _ = model(naive)  # re-runs the whole prefix every step
            naive = torch.cat((naive, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    assert cached.shape == (3, 45)
    assert torch.equal(cached, naive)


def test_cached_logits_match_full_forward():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (3, 30))
    with torch.no_grad():
        full, _ = model(idx)
        kv_cache = [{} for _ in model.blocks]
        steps = [model._run(idx[:, :8], kv_cache, 0)]  # prefill
        steps += [model._run(idx[:, t:t + 1], kv_cache, t) for t in range(8, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_taming_parity():
    model = GPT.from_taming(FIXTURES / "transformer.ckpt", FIXTURES / "transformer.yaml")
    ref = torch.load(FIXTURES / "reference_outputs.pt", map_location="cpu", weights_only=True)
    assert not model.training
    with torch.no_grad():
        logits, _ = model(ref["gpt_idx"])
    torch.testing.assert_close(logits, ref["gpt_logits"], rtol=0, atol=1e-5)


def test_optimizer_groups():
    model = tiny_gpt()
    optimizer = model.configure_optimizers(learning_rate=1e-3, weight_decay=0.1)
    decay, no_decay = optimizer.param_groups
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([0.6, 0.3, 0.1]).log().repeat(1000, 1)
    filtered = filter_logits(logits, top_p=0.5)
    assert torch.isinf(filtered[:, 1:]).all() and torch.isfinite(filtered[:, 0]).all()
    assert (torch.multinomial(filtered.softmax(dim=-1), 1) == 0).all()
    kept = filter_logits(logits[:1], top_p=0.85)  # 0.6 < 0.85 <= 0.6 + 0.3
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2])


def test_top_k_keeps_k_tokens():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[False, True, True, False]]


def test_too_long_input_raises():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))
    assert model.generate(torch.zeros(1, 10, dtype=torch.long), 55).shape == (1, 65)  # the last is never fed
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), 56)


def test_vocab_limit_never_samples_special_tokens():
    model = tiny_gpt()
    model.head.weight.data[40:] += 5.0 * model.ln_f.bias.data.new_ones(32)  # make ids >= 40 very likely
    model.ln_f.bias.data.fill_(1.0)
    free = model.generate(torch.zeros(8, 1, dtype=torch.long), 30)
    assert (free[:, 1:] >= 40).any()  # without the limit they do get sampled
    limited = model.generate(torch.zeros(8, 1, dtype=torch.long), 30, vocab_limit=40)
    assert (limited[:, 1:] < 40).all()


def test_n_embd_must_divide_by_n_head():
    with pytest.raises(ValueError, match="n_embd 32 must divide by n_head 3"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=3, n_embd=32)


def test_int8_linear_is_exact_on_representable_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    scale = torch.logspace(-4, 1, 24).bfloat16().float()  # rows of very different size, each scale exact in bf16
    q = torch.randint(-127, 128, (24, 64)).float()
    q[:, 0] = 127  # each row's largest |weight| is 127 scales, so the quantizer finds exactly this scale
    linear.weight.data = q * scale[:, None]
    x = torch.randn(5, 3, 64).bfloat16().float()  # exact in bf16: the kernel's input rounding loses nothing
    with torch.no_grad():
        y = Int8Linear(linear)(x)
        bias_free = x @ linear.weight.t()
        accumulation = x.abs() @ linear.weight.abs().t() * 1e-5  # fp32 sums in another order
    assert y.shape == (5, 3, 24) and y.dtype == torch.float32
    # only the kernel's bf16 output is rounded (2^-8 relative), element by element, so the small rows count as
    # much as the large ones: one scale for the whole matrix, a scale per column or a transposed weight fail this
    assert ((y - bias_free - linear.bias.detach()).abs() <= bias_free.abs() * 2**-8 + accumulation).all()


def test_int8_weights_round_to_the_nearest_step_of_their_row():
    torch.manual_seed(0)
    linear = nn.Linear(256, 8)
    linear.weight.data *= torch.logspace(-3, 2, 8)[:, None]
    layer = Int8Linear(linear)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (8, 256)
    step = layer.scale.float()[:, None]
    error = (layer.weight.float() * step - linear.weight.data).abs()
    # round to nearest: at most half a step, plus the clamp of the largest weight after the scale's bf16 rounding
    assert (error <= step * 0.5 + step * 2**-7 * 127 + 1e-12).all()
    assert (error.amax(dim=1) > 0.3 * step[:, 0]).all()  # not a trivially exact case
    assert (error.mean(dim=1) < 0.3 * step[:, 0]).all()  # truncation averages half a step, rounding a quarter


def test_int8_gpt_generates_and_keeps_its_logits():
    model = tiny_gpt(n_embd=64, n_head=4)
    idx = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        logits, _ = model(idx)
    quantized = tiny_gpt(n_embd=64, n_head=4).quantize_int8()
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())  # head, attention and MLP all int8
    with torch.no_grad():
        q_logits, _ = quantized(idx)
    relative = (q_logits - logits).norm() / logits.norm()
    assert 1e-4 < relative < 0.03  # changed by the rounding, but only a little
    out = quantized.generate(idx[:, :1], 40, top_k=5, vocab_limit=45)
    assert out.shape == (2, 41) and (out[:, 1:] < 45).all()


def test_int8_weights_are_a_cpu_path():
    with pytest.raises(ValueError, match="CPU"):
        tiny_gpt().to("meta").quantize_int8()


def test_sampling_draws_from_the_softmax_on_the_device():
    """sample_next (the exponential race, no host read-back) against the softmax of a fixed logit vector, 40000
    draws: every frequency within 4.5 standard errors; top-k and top-p renormalise over what they keep; top_k=1 is
    the argmax exactly."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40000
    for kwargs, keep in (({}, 6), ({"temperature": 0.7}, 6), ({"top_k": 3}, 3), ({"top_p": 0.8}, 3)):
        draws = sample_next(logits.expand(n, -1), **kwargs)
        assert draws.shape == (n, 1) and draws.dtype == torch.long
        freq = torch.bincount(draws.flatten(), minlength=6).double() / n
        p = torch.zeros(6, dtype=torch.float64)
        p[:keep] = torch.softmax(logits[:keep].double() / kwargs.get("temperature", 1.0), dim=0)
        assert torch.all((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt() + 1e-12), (kwargs, freq, p)
    batch = torch.randn(64, 50)
    assert torch.equal(sample_next(batch, top_k=1), batch.argmax(-1, keepdim=True))


def test_static_decode_step_samples_the_same_tokens():
    """GPT.decode_step (static shapes: the whole cache, later slots masked; what --compile compiles) gives the
    dynamic cache's logits, so greedy and seeded sampling draw the same tokens."""
    model = tiny_gpt()
    start = torch.randint(0, 50, (3, 2))
    dynamic = model.generate(start, 40, top_k=1)
    torch.manual_seed(1)
    dynamic_sampled = model.generate(start, 40)
    model.decode_fn = model.decode_step
    assert torch.equal(model.generate(start, 40, top_k=1), dynamic)
    torch.manual_seed(1)
    assert torch.equal(model.generate(start, 40), dynamic_sampled)
    cache = [{} for _ in model.blocks]
    with torch.no_grad():
        model._run(dynamic[:, :10], cache, 0)
        static = model.decode_step(dynamic[:, 10:11], cache, torch.tensor(10))
        torch.testing.assert_close(static, model(dynamic[:, :11])[0][:, -1], rtol=1e-5, atol=1e-5)


def test_compiled_sampling_holds_bf16_weights_and_one_cache_and_graph_for_every_batch(monkeypatch):
    """GPT.compile_decode(bf16) (sample_transformer.py --compile): the Linear weights cast once, with autocast's logits;
    a second, smaller batch is padded into the first batch's cache, so nothing is compiled again (CPU stand-in of the
    CUDA graph: dynamo's graphs counted with a pass-through backend)."""
    graphs, compile_ = [], torch.compile

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, dynamic=None: compile_(fn, backend=counting_backend,
                                                                                      dynamic=dynamic))
    torch._dynamo.reset()
    model = tiny_gpt()
    reference = tiny_gpt()
    reference.load_state_dict(model.state_dict())
    model.compile_decode(torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["blocks.0.attn.query.weight"] == dtypes["blocks.1.mlp.0.bias"] == dtypes["head.weight"] == \
        torch.bfloat16
    assert dtypes["tok_emb.weight"] == dtypes["pos_emb"] == dtypes["ln_f.weight"] == torch.float32
    idx = torch.randint(0, 50, (3, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(idx)[0], reference(idx)[0])  # autocast rounds the fp32 weights the same way
        start = torch.tensor([[0], [1], [2]])
        first = model.generate(start, 30, top_k=1)
        cache = model.decode_cache
        pointers = [t.data_ptr() for layer in cache for t in layer.values()]
        second = model.generate(start[:2], 30, top_k=1)  # a last batch of 2: padded to 3 rows
    torch._dynamo.reset()
    assert len(graphs) == 1
    assert model.decode_cache is cache and [t.data_ptr() for layer in cache for t in layer.values()] == pointers
    assert torch.equal(second, first[:2]) and not torch.equal(first[0], first[1])
