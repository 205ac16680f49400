"""The cache's training signal (cache_signal): what reaches the scores, the dense read-out against the reference,
causality in training, and eval == step whatever the signal."""
import math

import pytest
import torch

import mipt
from mipt import MIPT, MIPTConfig, ScoreDistill, SparseCache, cache_attention_dense, cache_attention_torch, cache_plan

SIGNALS = ('explore', 'weighted', 'dense', 'mixed', 'distill')


def _inputs(B, T, H, hd, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, hd, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    log_s = torch.log(torch.rand(B, T, generator=g, dtype=dtype)).requires_grad_()
    null_k, null_v = (torch.randn(H, hd, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    return q, k, v, log_s, null_k, null_v


@pytest.mark.parametrize('T,L', [(1, 4), (37, 8), (64, 16), (29, 128)])
def test_dense_readout_equals_reference_values_and_gradients(T, L):
    # every j <= i visible: the unbounded cache with every token eligible (tau below any score), no exploration
    q, k, v, log_s, null_k, null_v = _inputs(2, T, 3, 8, seed=T)
    cand, end = cache_plan(log_s.detach().exp(), None, -1.0, L, 0, None)
    ref = cache_attention_torch(q, k, v, log_s, end, cand, null_k, null_v, L)
    out = cache_attention_dense(q, k, v, log_s, null_k, null_v)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    args = (q, k, v, log_s, null_k, null_v)
    for a, b in zip(torch.autograd.grad((ref * g).sum(), args), torch.autograd.grad((out * g).sum(), args)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_dense_readout_gradcheck():
    args = _inputs(1, 5, 2, 4, seed=3)
    assert torch.autograd.gradcheck(cache_attention_dense, args)


def _fused_only(device):
    """SDPA restricted to its fused kernels: the math backend, the one that builds the (T, T) matrix, is off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fused = [SDPBackend.FLASH_ATTENTION] + ([SDPBackend.EFFICIENT_ATTENTION] if device == 'cuda' else [])
    return sdpa_kernel(fused)


@pytest.mark.parametrize('T', [1, 37, 300])
def test_dense_readout_runs_fused_on_the_cpu(T):
    # FlashAttention's CPU kernel alone, forward and backward, against the reference's values and gradients
    q, k, v, log_s, null_k, null_v = args = tuple(t.detach().float().requires_grad_() for t in _inputs(2, T, 3, 8))
    cand, end = cache_plan(log_s.detach().exp(), None, -1.0, 16, 0, None)
    ref = cache_attention_torch(q, k, v, log_s, end, cand, null_k, null_v, 16)
    with _fused_only('cpu'):
        out = cache_attention_dense(*args)
        g = torch.randn_like(ref)
        got = torch.autograd.grad((out * g).sum(), args)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(torch.autograd.grad((ref * g).sum(), args), got):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_dense_readout_on_gpu_is_fused_and_linear_in_memory(dtype):
    # values and gradients against float64 on the CPU, then the memory of a long sequence: far below one (T, T)
    q, k, v, log_s, null_k, null_v = _inputs(2, 700, 4, 16, seed=11)
    g = torch.randn(2, 700, 4, 16, dtype=torch.float64)
    ref = cache_attention_dense(q, k, v, log_s, null_k, null_v)
    want = torch.autograd.grad((ref * g).sum(), (q, k, v, log_s))
    dev = [t.detach().cuda().to(dtype if t.dim() == 4 else torch.float32).requires_grad_()
           for t in (q, k, v, log_s, null_k, null_v)]
    with _fused_only('cuda'):
        out = cache_attention_dense(*dev)
        got = torch.autograd.grad((out * g.cuda().to(dtype)).sum(), dev[:4])
    tol = 2e-3 if dtype == torch.float32 else 6e-2
    assert (out.double().cpu() - ref.detach()).abs().max() < tol
    for a, b in zip(want, got):
        assert (b.double().cpu() - a).abs().max() < tol * (1 + a.abs().max())
    T = 16384
    big = [torch.randn(1, T, 4, 16, device='cuda', dtype=dtype, requires_grad=True) for _ in range(3)]
    log_s = torch.randn(1, T, device='cuda').clamp(max=0).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with _fused_only('cuda'):
        cache_attention_dense(*big, log_s, dev[4], dev[5]).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < T * T // 2   # 128 MiB; the math backend's (4, T, T) is 2 GiB+


def _cache(signal, K=1, R=0, seed=0):
    torch.manual_seed(seed)
    return SparseCache(MIPTConfig(n_embd=16, n_head=2, cache_size=K, cache_explore=R, cache_chunk=4,
                                  cache_signal=signal)).double().train()


@pytest.mark.parametrize('signal', SIGNALS)
def test_which_scores_get_a_gradient(signal):
    # K=1 and no exploration: the best token (position 0) alone is cached, by a wide margin, at every query
    torch.manual_seed(1)
    B, T, D = 2, 12, 16
    y = torch.randn(B, T, D, dtype=torch.float64)
    s = torch.full((B, T), 0.1, dtype=torch.float64)
    s[:, 0] = 0.9
    s.requires_grad_()
    cache = _cache(signal)
    torch.manual_seed(0)  # 'mixed': the coin of this step
    soft = cache.soft()
    torch.manual_seed(0)
    out, _ = cache(y, s)
    grad, = torch.autograd.grad(out.pow(2).sum(), s)
    uncached = grad[:, 1:]
    assert grad[:, 0].abs().min() > 0
    if signal in ('dense', 'distill') or signal == 'mixed' and soft:
        assert uncached.abs().min() > 0          # every uncached, unsampled token's score learns
    else:
        assert uncached.abs().max() == 0         # only what the plan attends to


def _distill_reference(att, log_s, q, k):
    """The loss whose gradient ScoreDistill adds, with the (T, T) matrices: sum over rows, heads and queries of
    w_hi KL(a_hi || s_j / S_i), a_hi = softmax_j<=i q_hi.k_hj / sqrt(hd), w = |dL/d att| normalised over queries;
    divided by B * H."""
    B, T, H, hd = q.shape
    w = att.norm(dim=-1)                                                           # here att stands for dL/d att
    w = w / w.sum(1, keepdim=True)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    a = torch.softmax((torch.einsum('bihd,bjhd->bhij', q, k) / math.sqrt(hd)).masked_fill(~causal, -math.inf), -1)
    log_sigma = torch.log_softmax(log_s[:, None, :].expand(B, T, T).masked_fill(~causal, -math.inf), -1)  # (B, i, j)
    kl = (a * (torch.log(a.clamp(min=1e-300)) - log_sigma[:, None])).masked_fill(~causal, 0).sum(-1)      # (B, H, i)
    return (w.transpose(1, 2) * kl).sum() / (B * H)


@pytest.mark.parametrize('T', [1, 7, 33])
def test_distill_gradient_is_the_kl_to_dense_attention(T):
    q, k, att, log_s, _, _ = _inputs(2, T, 3, 4, seed=T)
    q, k = q.detach(), k.detach()
    g = torch.randn_like(att)
    out = ScoreDistill.apply(att, log_s, q, k)
    assert torch.equal(out, att)                                       # the read-out passes unchanged
    got_att, got_s = torch.autograd.grad((out * g).sum(), (att, log_s))
    want_s, = torch.autograd.grad(_distill_reference(g, log_s, q, k), log_s)
    torch.testing.assert_close(got_att, g, rtol=0, atol=0)
    torch.testing.assert_close(got_s, want_s, rtol=1e-9, atol=1e-12)


def test_distill_runs_fused_on_the_cpu():
    # the teacher's masses through FlashAttention's CPU kernel alone, against the float64 reference
    q, k, att, log_s, _, _ = _inputs(2, 300, 3, 8, seed=4)
    g = torch.randn_like(att)
    want, = torch.autograd.grad(_distill_reference(g, log_s, q.detach(), k.detach()), log_s)
    f = [t.detach().float() for t in (att, log_s, q, k)]
    f[0].requires_grad_(), f[1].requires_grad_()
    with _fused_only('cpu'):
        got, = torch.autograd.grad((ScoreDistill.apply(*f) * g.float()).sum(), f[1])
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_distill_on_gpu_is_fused_and_linear_in_memory(dtype):
    q, k, att, log_s, _, _ = _inputs(2, 700, 4, 16, seed=12)
    g = torch.randn_like(att)
    want, = torch.autograd.grad(_distill_reference(g, log_s, q.detach(), k.detach()), log_s)
    dev = [t.detach().cuda().to(dtype if t.dim() == 4 else torch.float32) for t in (att, log_s, q, k)]
    dev[0].requires_grad_(), dev[1].requires_grad_()
    with _fused_only('cuda'):
        got, = torch.autograd.grad((ScoreDistill.apply(*dev) * g.cuda().to(dtype)).sum(), dev[1])
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert (got.double().cpu() - want).abs().max() < tol * want.abs().max()
    T = 16384
    big = [torch.randn(1, T, 4, 16, device='cuda', dtype=dtype) for _ in range(3)]
    big[0].requires_grad_()
    log_s = torch.randn(1, T, device='cuda').clamp(max=0).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with _fused_only('cuda'):
        ScoreDistill.apply(big[0], log_s, big[1], big[2]).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < T * T // 2   # 128 MiB; a (4, T, T) matrix is 2 GiB+


def test_distill_leaves_the_forward_pass_alone():
    torch.manual_seed(0)
    y, s = torch.randn(2, 13, 16, dtype=torch.float64), torch.rand(2, 13, dtype=torch.float64)
    outs = []
    for signal in ('explore', 'distill'):
        cache = _cache(signal, K=2, R=3)
        torch.manual_seed(1)
        outs.append(cache(y, s)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_mixed_takes_both_paths():
    cache = _cache('mixed')
    torch.manual_seed(0)
    coins = {cache.soft() for _ in range(40)}
    assert coins == {True, False}
    assert not cache.eval().soft()


@pytest.mark.parametrize('signal', SIGNALS)
def test_training_is_causal(signal):
    B, T, D = 2, 19, 16
    cache = _cache(signal, K=2, R=3)
    y = torch.randn(B, T, D, dtype=torch.float64)
    s = torch.rand(B, T, dtype=torch.float64)
    y2, s2 = y.clone(), s.clone()
    t = 9
    y2[:, t + 1:] = torch.randn(B, T - t - 1, D, dtype=torch.float64)
    s2[:, t + 1:] = torch.rand(B, T - t - 1, dtype=torch.float64)
    torch.manual_seed(5)
    a, _ = cache(y, s)
    torch.manual_seed(5)  # the same draws: exploration keys of positions <= t, the coin
    b, _ = cache(y2, s2)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=0)


@pytest.mark.parametrize('signal', SIGNALS)
def test_eval_equals_step_after_training_with_the_signal(signal):
    torch.manual_seed(0)
    cfg = MIPTConfig(vocab_size=11, block_size=32, n_layer=2, n_embd=16, n_head=2, cache_size=3, cache_explore=4,
                     cache_chunk=8, cache_signal=signal, p_penalty=0.5)
    model = MIPT(cfg).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 11, (3, 23))
    for _ in range(3):
        _, loss = model(x, targets=x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits, _ = model(x)
        state = model.init_state(3)
        steps = []
        for t in range(x.shape[1]):
            lt, state = model.step(x[:, t], state)
            steps.append(lt)
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=1e-9, atol=1e-9)


def test_bad_signal_is_one_line():
    with pytest.raises(ValueError, match="cache_signal must be 'explore', 'weighted', 'dense', 'mixed' or 'distill', got 'soft'"):
        MIPTConfig(cache_signal='soft')


def test_weighted_draws_follow_the_scores():
    # one draw (R=1) per query; position 3 holds nearly all of s but is not eligible for the exact cache (tau)
    s = torch.full((1, 8), 1e-6, dtype=torch.float64)
    s[0, 3] = 0.5
    hits = {}
    for signal in ('weighted', 'explore'):
        torch.manual_seed(0)
        cache = SparseCache(MIPTConfig(n_embd=16, n_head=2, cache_size=1, cache_explore=1, cache_chunk=4,
                                       cache_tau=0.6, cache_signal=signal)).train()
        hits[signal] = 0
        for _ in range(50):
            cand, end = cache.plan(s)
            hits[signal] += bool(((cand[0, -1] == 3) & (end[0, 3] > 7)).any())
    assert hits['weighted'] >= 48 and hits['explore'] <= 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_dense_readout_on_gpu_bf16_against_float64():
    q, k, v, log_s, null_k, null_v = (t.detach().cuda() for t in _inputs(2, 1000, 4, 16, seed=7))
    ref = cache_attention_dense(q, k, v, log_s, null_k, null_v)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = cache_attention_dense(*(t.bfloat16() for t in (q, k, v)), log_s.float(), null_k.float(), null_v.float())
    assert (out.double() - ref).abs().max() < 0.05


@pytest.mark.parametrize('mixer', ['mipt', 'attention'])
def test_blocks_without_ffn(mixer):
    cfg = MIPTConfig(vocab_size=11, block_size=16, n_layer=2, n_embd=16, n_head=1, mlp=False, mixer=mixer,
                     cache_size=2 if mixer == 'mipt' else 0)
    model = MIPT(cfg).double().eval()
    assert not any('mlp' in n or 'ln_2' in n for n, _ in model.named_parameters())
    x = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        logits, _ = model(x)
        state, steps = model.init_state(2), []
        for t in range(9):
            lt, state = model.step(x[:, t], state)
            steps.append(lt)
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=1e-9, atol=1e-9)


def _tiny(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=11, block_size=16, n_layer=2, n_embd=16, n_head=2, cache_size=4)
    return MIPT(MIPTConfig(**{**args, **kw})).eval()


@pytest.mark.parametrize('other', [dict(cache_size=8), dict(cache_size=0), dict(cache_size=-1),
                                   dict(n_embd=32), dict(mixer='attention', cache_size=0), dict(n_head=4)])
def test_step_refuses_another_models_state(other):
    model, foreign = _tiny(), _tiny(**other)
    state = foreign.init_state(2)
    if other.get('cache_size') == -1:  # an unbounded cache holding two tokens: its slot count differs from K=4
        _, state = foreign.prefill(torch.randint(0, 11, (2, 5)))
    with pytest.raises(ValueError, match="is not of this model's layer 0") as e:
        model.step(torch.zeros(2, dtype=torch.long), state)
    assert '\n' not in str(e.value)


def test_step_takes_its_own_states():
    model = _tiny(cache_size=-1)
    _, state = model.prefill(torch.randint(0, 11, (2, 5)))
    model.step(torch.zeros(2, dtype=torch.long), state)
    twin = _tiny(mixer='attention', cache_size=0)
    _, state = twin.prefill(torch.randint(0, 11, (2, 5)))
    twin.step(torch.zeros(2, dtype=torch.long), state)


@pytest.mark.parametrize('dtype', [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_every_integer_dtype_is_token_ids(dtype):
    model = _tiny()
    x = torch.randint(0, 11, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(x.to(dtype))[0], model(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize('n_classes,shape', [(0, (2, 6)), (0, (14,)), (3, (2, 1)), (3, (3,))])
def test_targets_of_the_wrong_shape_are_one_line(n_classes, shape):
    model = _tiny(n_classes=n_classes)
    with pytest.raises(ValueError, match=r"targets must have shape \(2, ?7?\)?") as e:
        model(torch.randint(0, 11, (2, 7)), targets=torch.zeros(shape, dtype=torch.long))
    assert '\n' not in str(e.value)


def test_step_refuses_an_empty_batch():
    model = _tiny()
    with pytest.raises(ValueError, match='idx_t must be'):
        model.step(torch.zeros(0, dtype=torch.long), model.init_state(0))


def test_usage_warning_follows_the_signal():
    import runs
    assert 'cache_explore=64 >= block_size=64' in runs.usage_warning(MIPTConfig(block_size=64, cache_explore=64))
    assert runs.usage_warning(MIPTConfig(block_size=64, cache_explore=64, cache_signal='dense')) is None
    assert runs.usage_warning(MIPTConfig(block_size=64, cache_explore=16)) is None


def test_soft_selection_reaches_every_needle_sampling_a_few():
    # results/signal_grad.py's measure: the needle's score gets a gradient in every row under 'dense', in about
    # (K + R) / N of them under 'explore' (R = 128 of 1024 here)
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location('signal_grad', os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results', 'signal_grad.py'))
    sg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sg)
    assert sg.measure(1024, 4, 'dense', seeds=(1,), batch=8)['needle_reached'] == 1.0
    assert sg.measure(1024, 4, 'explore', seeds=(1, 2), batch=8)['needle_reached'] < 0.6


def test_distill_trains_under_torch_compile():
    # the teacher's backward runs an attention inside autograd's backward; compiled and eager give the same gradients
    torch.manual_seed(0)
    cfg = MIPTConfig(vocab_size=11, block_size=32, n_layer=1, n_embd=16, n_head=2, cache_size=3, cache_explore=0,
                     cache_chunk=8, cache_signal='distill')  # no exploration: compiled code draws its own numbers
    model = MIPT(cfg)
    x = torch.randint(0, 11, (2, 24))
    grads = []
    for m in (model, torch.compile(model)):
        _, loss = m(x, targets=x)
        grads.append(torch.autograd.grad(loss, model.blocks[0].mix.proj.weight))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
