"""CPU tests of mipt.py: scans against float64 loops, the exact causal cache, decoding equals the
parallel forward pass, causality, padding, overfitting, config errors, and the fast paths' fallback."""

import dataclasses
import math

import pytest
import torch

import mipt
import runs
from mipt import MIPT, MIPTConfig, scan, scan_ref, select_cache

LENGTHS = [1, 2, 7, 63, 1000, 4099]


def make_ab(kind, B, T, D, gen):
    """Scan inputs of one regime, in float32 complex."""
    r = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)
    phase = 2 * math.pi * r(B, T, D)
    u = torch.complex(torch.randn(B, T, D, generator=gen, dtype=torch.float64),
                      torch.randn(B, T, D, generator=gen, dtype=torch.float64))
    if kind == 'uniform':      # |a| uniform in (0, 1), b random
        return torch.polar(r(B, T, D), phase).to(torch.complex64), u.to(torch.complex64)
    if kind == 'near_one':     # |a| within 1e-4 of 1
        return torch.polar(1 - 1e-4 * r(B, T, D), phase).to(torch.complex64), u.to(torch.complex64)
    p = {'p_near_0': 1e-6 + 1e-3 * r(B, T, D), 'p_near_1': 1 - 1e-6 - 1e-3 * r(B, T, D)}[kind]
    return torch.polar(1 - p, phase).to(torch.complex64), (p * u).to(torch.complex64)


def rel_err(x, ref):
    return ((x.to(ref.dtype) - ref).norm() / ref.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize('T', LENGTHS)
@pytest.mark.parametrize('kind', ['uniform', 'near_one', 'p_near_0', 'p_near_1'])
@pytest.mark.parametrize('with_h0', [False, True])
def test_scan_matches_float64_loop(T, kind, with_h0):
    gen = torch.Generator().manual_seed(T * 7 + len(kind) + with_h0)
    B, D = 2, 8
    a, b = make_ab(kind, B, T, D, gen)
    h0 = torch.randn(B, D, dtype=torch.complex64, generator=gen) if with_h0 else None
    ref = scan_ref(a.to(torch.complex128), b.to(torch.complex128), None if h0 is None else h0.to(torch.complex128))
    assert rel_err(scan(a, b, h0), ref) <= 1e-5


def test_scan_ref_is_the_recurrence():
    a = torch.tensor([[[0.5 + 0.5j]], [[1j]]], dtype=torch.complex128).view(1, 2, 1)
    b = torch.tensor([1.0 + 0j, 2.0 + 1j], dtype=torch.complex128).view(1, 2, 1)
    h = scan_ref(a, b, h0=torch.tensor([[2j]], dtype=torch.complex128))
    h1 = (0.5 + 0.5j) * 2j + 1.0
    assert torch.allclose(h.flatten(), torch.tensor([h1, 1j * h1 + 2 + 1j], dtype=torch.complex128))


@pytest.mark.parametrize('T', [1, 5, 10])
def test_scan_gradcheck_complex128(T):
    gen = torch.Generator().manual_seed(T)
    a = (torch.polar(torch.rand(2, T, 3, generator=gen, dtype=torch.float64),
                     torch.randn(2, T, 3, generator=gen, dtype=torch.float64))).requires_grad_()
    b = torch.randn(2, T, 3, dtype=torch.complex128, generator=gen).requires_grad_()
    h0 = torch.randn(2, 3, dtype=torch.complex128, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(scan, (a, b, h0))
    assert torch.autograd.gradcheck(lambda a, b: scan(a, b), (a, b))


def test_recurrence_gradcheck_from_raw_inputs():
    """The layer's path: logit, theta, u -> y = Re h, last state, all differentiable in float64."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 9, 3, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(4)]
    h0 = torch.randn(2, 3, dtype=torch.complex128, generator=gen).requires_grad_()
    f = lambda lg, th, ur, ui, h0: torch.cat(
        [t.real.flatten() for t in [*mipt.mipt_recurrence(lg, th, ur, ui, h0, impl='torch')[:1]]]
        + [mipt.mipt_recurrence(lg, th, ur, ui, h0, impl='torch')[1].imag.flatten()])
    assert torch.autograd.gradcheck(f, (*xs, h0))


def test_one_step_is_the_scan_s_step():
    """A single position (decoding) takes recurrence_step, elementwise in real arithmetic: equal in float64 to the
    definition, with gates near 1 (p ~ 1e-6) and without h0, and differentiable (gradcheck)."""
    gen = torch.Generator().manual_seed(2)
    lg, th, ur, ui = [torch.randn(3, 1, 5, dtype=torch.float64, generator=gen) for _ in range(4)]
    lg[0] = -14.0                                                                 # 1 - p within 1e-6 of 1
    h0 = torch.randn(3, 5, dtype=torch.complex128, generator=gen)
    p = torch.sigmoid(lg)
    for h in (h0, None):
        ref = scan_ref((1 - p) * torch.exp(1j * th), p * (ur + 1j * ui), h)
        y, h_last = mipt.mipt_recurrence(lg, th, ur, ui, h, impl='torch')
        assert y.shape == (3, 1, 5) and h_last.dtype == torch.complex128
        assert torch.allclose(y, ref.real, rtol=1e-13, atol=1e-14)
        assert torch.allclose(h_last, ref[:, -1], rtol=1e-13, atol=1e-14)
    xs = [t.clone().requires_grad_() for t in (lg, th, ur, ui)]
    f = lambda lg, th, ur, ui, h0: torch.view_as_real(mipt.recurrence_step(lg[:, 0], th[:, 0], ur[:, 0], ui[:, 0], h0)[1])
    assert torch.autograd.gradcheck(f, (*xs, h0.clone().requires_grad_()))


def test_recurrence_matches_definition():
    gen = torch.Generator().manual_seed(1)
    lg, th, ur, ui = [torch.randn(3, 50, 4, dtype=torch.float64, generator=gen) for _ in range(4)]
    p = torch.sigmoid(lg)
    h = scan_ref((1 - p) * torch.exp(1j * th), p * (ur + 1j * ui))
    y, h_last = mipt.mipt_recurrence(lg, th, ur, ui, impl='torch')
    assert torch.allclose(y, h.real) and torch.allclose(h_last, h[:, -1])


# -----------------------------------------------------------------------------
# The causal cache


def brute_force_cache(s, K, tau):
    """Per position i: the K best eligible j <= i, ranked by score descending, earlier first on ties."""
    B, T = s.shape
    out = []
    for bi in range(B):
        rows = []
        for i in range(T):
            elig = [j for j in range(i + 1) if s[bi, j] > tau]
            ranked = sorted(elig, key=lambda j: (-float(s[bi, j]), j))
            rows.append(set(ranked if K is None else ranked[:K]))
        out.append(rows)
    return out


def cache_sets(s, K, tau, L):
    B, T = s.shape
    cand, member = select_cache(s, T if K is None else K, tau, L)
    out = []
    for bi in range(B):
        rows = []
        for i in range(T):
            c, l = divmod(i, L)
            rows.append(set(cand[bi, c][member[bi, c, l]].tolist()))
        out.append(rows)
    return out


@pytest.mark.parametrize('K,L,T', [(1, 4, 37), (3, 5, 41), (4, 16, 50), (8, 3, 29), (None, 6, 33), (2, 64, 70)])
@pytest.mark.parametrize('tau', [0.0, 0.5])
def test_select_cache_matches_brute_force(K, L, T, tau):
    gen = torch.Generator().manual_seed(T + L)
    s = torch.rand(3, T, generator=gen)
    s[0] = (s[0] * 4).floor() / 4          # many ties
    s[1, ::3] = 1.0                         # saturated sigmoids tie at exactly 1.0
    assert cache_sets(s, K, tau, L) == brute_force_cache(s, K, tau)


def lively(model, scale=0.5):
    """Spread the measurement logits so that scores vary, ties are rare, and tau=0.5 splits tokens."""
    torch.manual_seed(123)
    for block in model.blocks:
        if isinstance(block.mix, mipt.MIPTLayer):
            D = block.mix.n_embd
            torch.nn.init.normal_(block.mix.proj.weight, 0.0, scale)
            with torch.no_grad():
                block.mix.proj.bias[:D] = 0.0
    return model


def small(**kw):
    args = dict(vocab_size=40, block_size=96, n_layer=2, n_embd=32, n_head=4, cache_chunk=8)
    args.update(kw)
    return MIPTConfig(**args)


def step_all(model, idx):
    state = model.init_state(idx.shape[0])
    outs = []
    for t in range(idx.shape[1]):
        logits, state = model.step(idx[:, t], state)
        outs.append(logits)
    return torch.stack(outs, 1), state


@pytest.mark.parametrize('K', [0, 1, 3, -1])
@pytest.mark.parametrize('tau', [0.0, 0.5])
def test_step_equals_forward_mipt(K, tau):
    torch.manual_seed(0)
    model = lively(MIPT(small(cache_size=K, cache_tau=tau))).double().eval()
    idx = torch.randint(0, 40, (3, 53))
    logits, _ = model(idx)
    stepped, state = step_all(model, idx)
    assert rel_err(stepped, logits) <= 1e-5
    # the cache really evicted: more eligible tokens than slots
    if K > 0:
        scores = runs.probe(model, idx)['s']
        n_elig = (scores[0] > tau).sum(1)
        assert (n_elig > K).all()
        # and the stepped cache at the end is the brute-force top-K of the last position
        for s, st in zip(scores, state.layers):
            ref = brute_force_cache(s, K, tau)
            assert [set(p[p >= 0].tolist()) for p in st.cache.pos] == [rows[-1] for rows in ref]
    # prefill's parallel state continues exactly like the stepped state. Layer 0 scores a token by its id alone:
    # repeated ids tie exactly when stepped, but prefill's (B, T, D) matmul may round them one ulp apart from the
    # step's (B, 1, D) one, and THE RULE then evicts another slot. Distinct ids keep this check exact.
    ids = torch.stack([torch.randperm(40)[:31] for _ in range(3)])
    _, pre = model.prefill(ids[:, :30])
    _, state = step_all(model, ids[:, :30])
    a, _ = model.step(ids[:, 30], pre)
    b, _ = model.step(ids[:, 30], state)
    assert rel_err(a, b) <= 1e-10


def test_step_equals_forward_float32():
    torch.manual_seed(1)
    model = lively(MIPT(small(cache_size=3, cache_tau=0.0)), scale=0.2).eval()
    idx = torch.randint(0, 40, (2, 40))
    logits, _ = model(idx)
    stepped, _ = step_all(model, idx)
    assert rel_err(stepped, logits) <= 1e-4


def test_step_equals_forward_attention():
    torch.manual_seed(0)
    model = MIPT(small(mixer='attention', cache_size=0)).double().eval()
    idx = torch.randint(0, 40, (3, 53))
    logits, _ = model(idx)
    stepped, state = step_all(model, idx)
    assert rel_err(stepped, logits) <= 1e-10
    _, pre = model.prefill(idx)
    nxt = torch.randint(0, 40, (3,))
    assert rel_err(model.step(nxt, pre)[0], model.step(nxt, state)[0]) <= 1e-10
    naive = MIPT(small(mixer='attention', cache_size=0, attn_impl='naive')).double().eval()
    naive.load_state_dict(model.state_dict())
    assert rel_err(naive(idx)[0], logits) <= 1e-10


def test_attention_step_past_block_size_is_a_clear_error():
    model = MIPT(small(mixer='attention', cache_size=0, block_size=4)).eval()
    state = model.init_state(1)
    for t in range(4):
        _, state = model.step(torch.tensor([1]), state)
    with pytest.raises(ValueError, match='block_size'):
        model.step(torch.tensor([1]), state)


@pytest.mark.parametrize('kw', [dict(cache_size=3), dict(cache_size=-1, cache_tau=0.5), dict(cache_size=0),
                                dict(mixer='attention', cache_size=0)])
def test_causality(kw):
    torch.manual_seed(0)
    model = lively(MIPT(small(**kw))).double().eval()
    idx = torch.randint(0, 40, (2, 45))
    t = 20
    other = idx.clone()
    other[:, t + 1:] = torch.randint(0, 40, (2, 45 - t - 1))
    a, _ = model(idx)
    b, _ = model(other)
    assert torch.equal(a[:, :t + 1], b[:, :t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_cache_changes_the_output():
    torch.manual_seed(0)
    with_cache = lively(MIPT(small(cache_size=3))).double().eval()
    without = MIPT(small(cache_size=0)).double().eval()
    without.load_state_dict(with_cache.state_dict(), strict=False)
    idx = torch.randint(0, 40, (2, 30))
    assert not torch.allclose(with_cache(idx)[0], without(idx)[0])


@pytest.mark.parametrize('kw', [dict(cache_size=4), dict(cache_size=0), dict(cache_size=-1, cache_tau=0.5)])
def test_decode_state_size(kw):
    torch.manual_seed(0)
    model = lively(MIPT(small(**kw))).eval()
    idx = torch.randint(0, 40, (2, 200))
    state = model.init_state(2)
    sizes = []
    for t in range(200):
        _, state = model.step(idx[:, t], state)
        sizes.append(model.state_bytes(state))
    if kw['cache_size'] >= 0:
        assert sizes[9] == sizes[-1] == model.state_bytes(model.init_state(2))
    else:  # unbounded: grows with the eligible tokens
        assert sizes[-1] > sizes[9]


def test_attention_state_grows():
    model = MIPT(small(mixer='attention', cache_size=0)).eval()
    state = model.init_state(1)
    for t in range(10):
        _, state = model.step(torch.tensor([t]), state)
    assert model.state_bytes(state) == 2 * 2 * 10 * 32 * 4  # layers * (k, v) * T * D * fp32


def test_lm_overfits_a_short_sequence():
    torch.manual_seed(0)
    model = MIPT(small(vocab_size=16, n_layer=2, n_embd=32, cache_size=2))
    seq = torch.randint(0, 16, (1, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    out = model.generate(seq[:, :1], 31, top_k=1)
    assert torch.equal(out, seq[:, :32])


def test_classifier_learns_a_toy_task():
    """Label = which of two marker tokens appears early in a noisy sequence: memory is needed."""
    torch.manual_seed(0)
    model = MIPT(small(vocab_size=12, n_layer=1, n_embd=32, n_classes=2, cache_size=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(n):
        x = torch.randint(4, 12, (n, 24))
        y = torch.randint(0, 2, (n,))
        x[torch.arange(n), torch.randint(0, 4, (n,))] = y + 1
        return x, y

    for _ in range(300):
        x, y = batch(64)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(256)
    acc = (model(x)[0].argmax(-1) == y).float().mean().item()
    assert acc > 0.95


def test_generate_matches_forward_greedy():
    torch.manual_seed(0)
    model = lively(MIPT(small(cache_size=3))).double().eval()
    prompt = torch.randint(0, 40, (2, 11))
    out = model.generate(prompt, 15, top_k=1)
    ref = prompt
    for _ in range(15):
        ref = torch.cat([ref, model(ref)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def test_probe_reports_scores_and_fill():
    torch.manual_seed(0)
    model = lively(MIPT(small(cache_size=3, cache_tau=0.5))).eval()
    idx = torch.randint(0, 40, (2, 30))
    stats = runs.probe(model, idx, lengths=torch.tensor([30, 10]))
    assert len(stats['p_mean']) == 2 and all(0 < p < 1 for p in stats['p_mean'])
    for s, fill in zip(stats['s'], stats['cache_fill']):
        n = [min(3, int((s[0] > 0.5).sum())), min(3, int((s[1, :10] > 0.5).sum()))]
        assert fill == pytest.approx(sum(n) / 2)


def test_fresh_model_starts_in_the_wave_phase():
    model = MIPT(small(cache_size=0))
    s = runs.probe(model, torch.randint(0, 40, (2, 20)))['p_mean']
    assert all(abs(p - 0.1) < 0.03 for p in s)


def test_bf16_autocast_keeps_a_float32_state():
    model = lively(MIPT(small(cache_size=3)))
    idx = torch.randint(0, 40, (2, 20))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
        _, state = model.prefill(idx)
    assert torch.isfinite(loss) and state.layers[0].h.dtype == torch.complex64
    ref, _ = model(idx)
    assert rel_err(logits.float(), ref) < 0.05


def test_param_count_excludes_embeddings():
    m = MIPT(small(cache_size=0, n_layer=1))
    D = 32
    per_block = (D * 4 * D + 4 * D) + 4 * D + (D * 4 * D + 4 * D) + (4 * D * D + D)  # proj, 2 LNs, FFN
    assert runs.num_params(m) == per_block + 2 * D  # + ln_f
    assert runs.num_params(m, non_embedding=False) == runs.num_params(m) + 40 * D


@pytest.mark.parametrize('kw,match', [
    (dict(mixer='rnn'), 'mixer'),
    (dict(n_embd=30, n_head=4), 'divisible'),
    (dict(cache_size=-2), 'cache_size'),
    (dict(cache_tau=1.0), 'cache_tau'),
    (dict(mixer='attention', cache_size=4), 'no sparse cache'),
    (dict(p_init=0.0), 'p_init'),
    (dict(n_layer=0), 'n_layer'),
    (dict(scan_impl='triton'), 'scan_impl'),
    (dict(attn_impl='flash'), 'attn_impl'),
])
def test_bad_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        small(**kw)


def test_bad_inputs_raise():
    model = MIPT(small())
    with pytest.raises(ValueError, match='idx'):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match='classifier'):
        MIPT(small(n_classes=2)).generate(torch.zeros(1, 3, dtype=torch.long), 2)


def test_cpu_fallback_is_the_torch_scan():
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 33, 8, generator=gen) for _ in range(4)]
    y_auto, h_auto = mipt.mipt_recurrence(*xs, impl='auto')
    y_torch, h_torch = mipt.mipt_recurrence(*xs, impl='torch')
    assert torch.equal(y_auto, y_torch) and torch.equal(h_auto, h_torch)
    model = MIPT(small(scan_impl='auto')).eval()
    ref = MIPT(small(scan_impl='torch')).eval()
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 40, (2, 20))
    assert torch.equal(model(idx)[0], ref(idx)[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only error')
def test_forcing_the_kernel_without_a_gpu_is_a_clear_error():
    xs = [torch.randn(1, 4, 2) for _ in range(4)]
    with pytest.raises(RuntimeError, match="scan_impl='cuda'"):
        mipt.mipt_recurrence(*xs, impl='cuda')


def test_without_kernels_py_every_fast_path_is_its_reference(monkeypatch):
    """mipt.py alone (kernels.py missing): the same function on the PyTorch paths; insisting on a kernel is one line."""
    torch.manual_seed(0)
    model = lively(MIPT(small(cache_size=3, cache_explore=4)))
    idx = torch.randint(0, 40, (2, 20))
    torch.manual_seed(1)
    ref = model(idx, idx)[1]
    monkeypatch.setattr(mipt, '_KERNELS', mipt._ReferenceOnly())
    torch.manual_seed(1)
    assert torch.equal(model(idx, idx)[1], ref)
    xs = [torch.randn(1, 4, 2) for _ in range(4)]
    with pytest.raises(RuntimeError, match=r"recurrence with impl='cuda' needs kernels.py beside mipt.py"):
        mipt.mipt_recurrence(*xs, impl='cuda')


def test_config_converts_minus_one_once_and_names_how_it_computes():
    cfg = MIPTConfig(cache_size=-1, cache_explore=-1)
    assert (cfg.K, cfg.R) == (None, None)
    assert (MIPTConfig(cache_size=4, cache_explore=0).K, MIPTConfig(cache_size=4, cache_explore=0).R) == (4, 0)
    settings = {f.name for f in dataclasses.fields(MIPTConfig)}
    assert set(MIPTConfig.HOW) <= settings and 'HOW' not in settings   # a class constant, not a setting
    assert MIPTConfig(p_init=0.2, dropout=0).dropout == 0.0 and isinstance(MIPTConfig(dropout=0).dropout, float)


@pytest.mark.parametrize('kw,warns', [
    (dict(cache_explore=-1), '(all)'),
    (dict(block_size=64, cache_explore=64), '>= block_size=64'),
    (dict(block_size=64, cache_explore=16), None),
    (dict(block_size=64, cache_explore=64, cache_size=0), None),               # no cache, nothing to select
    (dict(block_size=64, cache_explore=64, mixer='attention', cache_size=0), None),
])
def test_dense_exploration_is_a_usage_warning(kw, warns):
    """Exploration that reaches every earlier position never trains the exact cache alone: valid, but warned."""
    got = runs.usage_warning(MIPTConfig(**kw))
    assert got is None if warns is None else (warns in got and 'never trained alone' in got and '\n' not in got)


def test_bad_lengths_raise():
    model = MIPT(small(n_classes=2))
    idx = torch.randint(0, 40, (2, 10))
    for bad in ([0, 5], [5, 11]):
        with pytest.raises(ValueError, match='lengths'):
            model(idx, lengths=torch.tensor(bad))


def test_p_penalty_only_in_training():
    torch.manual_seed(0)
    idx = torch.randint(0, 40, (2, 12))
    plain = MIPT(small()).train()
    pen = MIPT(small(p_penalty=1.0)).train()
    pen.load_state_dict(plain.state_dict())
    assert pen(idx, idx)[1].item() > plain(idx, idx)[1].item()      # added while training
    assert pen.eval()(idx, idx)[1].item() == plain.eval()(idx, idx)[1].item()  # never in eval losses


def test_twin_prefill_state_holds_only_its_keys_and_values():
    """The twin's KV cache after prefill owns its memory: not views that keep the (B, T, 3D) projection alive."""
    model = MIPT(small(mixer='attention', cache_size=0, block_size=16)).eval()
    with torch.no_grad():
        _, st = model.prefill(torch.randint(0, 40, (2, 16)))
    for layer in st.layers:
        for t in (layer.k, layer.v):
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert MIPT.state_bytes(st) == 2 * 2 * 16 * model.config.n_embd * 4 * model.config.n_layer


def test_eager_step_with_a_tensor_position_is_still_checked():
    """Outside a graph or compile, a tensor position is read back and bounded like an int (the twin's learned
    positions stop at block_size)."""
    model = MIPT(small(mixer='attention', cache_size=0, block_size=8)).eval()
    with torch.no_grad():
        _, st = model.prefill(torch.randint(0, 40, (1, 8)))
        st.pos = torch.tensor(8)
        with pytest.raises(ValueError, match='learned positions up to block_size=8, got position 8'):
            model.step(torch.tensor([1]), st)


# ----------------------------------------------------------------------------- THE RULE, exploration
def test_rank_is_the_rule():
    gen = torch.Generator().manual_seed(5)
    score = (torch.rand(4, 12, generator=gen) * 3).floor() / 3   # many ties
    pos = torch.stack([torch.randperm(12, generator=gen) for _ in range(4)])
    order = mipt.rank(score, pos)
    for b in range(4):
        want = sorted(range(12), key=lambda i: (-float(score[b, i]), int(pos[b, i])))
        assert order[b].tolist() == want


def interval_sets(cand, end, L):
    """The set each query attends to, read from (cand, end): j in its chunk's list with j <= i < end_j."""
    B, T = end.shape
    out = []
    for b in range(B):
        rows = []
        for i in range(T):
            picked = [j for j in cand[b, i // L].tolist() if 0 <= j <= i < end[b, j]]
            assert len(picked) == len(set(picked)), 'a candidate attended twice'
            rows.append(set(picked))
        out.append(rows)
    return out


def explored_sets(s, K, R, L, seed):
    torch.manual_seed(seed)
    return interval_sets(*mipt.cache_plan(s, K, 0.0, L, R, torch.rand(s.shape)), L)


@pytest.mark.parametrize('K,L,T', [(1, 4, 37), (3, 5, 41), (None, 6, 33), (2, 64, 70)])
def test_cache_membership_is_one_interval_per_token(K, L, T):
    """cache_intervals loses nothing: (cand, end) gives back select_cache's sets, ties included."""
    gen = torch.Generator().manual_seed(T)
    s = (torch.rand(2, T, generator=gen) * 4).floor() / 4
    s[1, ::3] = 1.0
    got = interval_sets(*mipt.cache_intervals(*select_cache(s, K, 0.25, L), T), L)
    assert got == brute_force_cache(s, K, 0.25)


@pytest.mark.parametrize('K,R,L,T', [(1, 3, 4, 37), (2, 5, 8, 41), (3, None, 5, 23)])
def test_exploration_is_causal_and_keeps_the_exact_cache(K, R, L, T):
    gen = torch.Generator().manual_seed(T)
    s = torch.rand(2, T, generator=gen)
    exact = brute_force_cache(s, K, 0.0)
    sets = explored_sets(s, K, R, L, seed=1)
    for b in range(2):
        for i in range(T):
            assert exact[b][i] <= sets[b][i]                 # the exact cache is always attended
            assert all(0 <= j <= i for j in sets[b][i])       # never a later position
            extra = len(sets[b][i] - exact[b][i])
            assert extra <= (i + 1 if R is None else R)
            if R is None:
                assert sets[b][i] == set(range(i + 1))        # dense: every position so far
    assert sets != explored_sets(s, K, R, L, seed=2) or R is None  # random draws differ


@pytest.mark.parametrize('explore', [0, 8])
def test_exploration_sends_gradient_to_uncached_tokens(explore):
    """The loss reaches the measurement logit of a token outside every query's top-K only through the
    exploration candidates: with them the gradient is nonzero, without them it is exactly zero."""
    torch.manual_seed(0)
    B, T, D = 2, 24, 16
    cache = mipt.SparseCache(small(n_embd=D, n_head=2, cache_size=1, cache_chunk=8, cache_explore=explore)).double().train()
    y = torch.randn(B, T, D, dtype=torch.float64)
    logit = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    logit.data[:, 0] += 4.0  # token 0 wins the K=1 cache of every position
    s = torch.sigmoid(logit).mean(-1)
    out, _ = cache(y, s)
    out.pow(2).sum().backward()
    outside = logit.grad[:, 1:].abs().sum().item()   # tokens 1.. are never cached
    assert logit.grad[:, 0].abs().sum() > 0
    assert (outside > 0) if explore else (outside == 0)


def test_exploration_only_in_training():
    torch.manual_seed(0)
    model = lively(MIPT(small(cache_size=2, cache_explore=16))).double()
    ref = lively(MIPT(small(cache_size=2, cache_explore=0))).double()
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 40, (2, 40))
    assert torch.equal(model.eval()(idx)[0], ref.eval()(idx)[0])
    torch.manual_seed(3)
    a = model.train()(idx)[0]
    assert not torch.allclose(a, ref.train()(idx)[0])
    stepped, _ = step_all(model.eval(), idx)                 # eval: step == forward, exploration off
    assert rel_err(stepped, model(idx)[0]) <= 1e-10


def test_causality_in_training_mode():
    torch.manual_seed(0)
    model = lively(MIPT(small(cache_size=3, cache_explore=5))).double().train()
    idx = torch.randint(0, 40, (2, 45))
    other = idx.clone()
    other[:, 21:] = torch.randint(0, 40, (2, 24))
    torch.manual_seed(7)
    a, _ = model(idx)
    torch.manual_seed(7)
    b, _ = model(other)
    assert torch.equal(a[:, :21], b[:, :21]) and not torch.allclose(a[:, 21:], b[:, 21:])


# ----------------------------------------------------------------------------- read-outs
@pytest.mark.parametrize('readout', ['last', 'mean'])
@pytest.mark.parametrize('kw', [dict(cache_size=3), dict(cache_size=0), dict(mixer='attention', cache_size=0)])
def test_readouts_padded_equals_unpadded_and_step(readout, kw):
    torch.manual_seed(0)
    model = lively(MIPT(small(n_classes=3, readout=readout, **kw))).double().eval()
    lens = [7, 30, 19]
    docs = [torch.randint(1, 40, (n,)) for n in lens]
    batch = torch.zeros(3, 30, dtype=torch.long)
    for i, d in enumerate(docs):
        batch[i, :len(d)] = d
    padded, _ = model(batch, lengths=torch.tensor(lens))
    alone = torch.cat([model(d[None])[0] for d in docs])
    assert padded.shape == (3, 3) and rel_err(padded, alone) <= 1e-12   # padding never reaches the read-out
    for d, ref in zip(docs, alone):
        stepped, state = step_all(model, d[None])
        assert rel_err(stepped[:, -1], ref[None]) <= 1e-10           # step == forward
        assert rel_err(model.prefill(d[None])[0], ref[None]) <= 1e-10  # prefill == forward
    if readout == 'mean':
        assert state.pooled is not None and state.pooled.shape == (1, 32)


def test_mean_readout_differs_from_last():
    torch.manual_seed(0)
    a = lively(MIPT(small(n_classes=3, readout='mean'))).double().eval()
    b = lively(MIPT(small(n_classes=3, readout='last'))).double().eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 40, (2, 20))
    assert not torch.allclose(a(idx)[0], b(idx)[0])


@pytest.mark.parametrize('kw', [dict(cache_size=3), dict(mixer='attention', cache_size=0), dict(n_classes=2, readout='mean')])
def test_state_bytes_sees_every_tensor(kw):
    model = MIPT(small(**kw)).eval()
    _, state = model.prefill(torch.randint(0, 40, (2, 9)))
    walked = []

    def walk(x):  # a generic walker over the state object's attributes
        if torch.is_tensor(x):
            walked.append(x.numel() * x.element_size())
        elif isinstance(x, list):
            [walk(v) for v in x]
        elif hasattr(x, '__dataclass_fields__'):
            [walk(getattr(x, f)) for f in x.__dataclass_fields__]
    walk(state)
    assert model.state_bytes(state) == sum(walked) > 0


# ----------------------------------------------------------------------------- bad inputs, one message each
def test_bad_api_inputs():
    model = MIPT(small(cache_size=3)).eval()
    clf = MIPT(small(n_classes=2)).eval()
    x = torch.randint(0, 40, (2, 5))
    cases = [
        (lambda: model(torch.full((1, 4), 40)), ValueError, r'token ids must lie in \[0, vocab_size=40\)'),
        (lambda: model(torch.full((1, 4), -1)), ValueError, 'token ids must lie'),
        (lambda: model(x.float()), TypeError, 'integer tensor'),
        (lambda: model(torch.zeros(2, 0, dtype=torch.long)), ValueError, 'B, T >= 1'),
        (lambda: model(torch.zeros(0, 3, dtype=torch.long)), ValueError, 'B, T >= 1'),
        (lambda: model.generate(torch.zeros(1, 0, dtype=torch.long), 3), ValueError, 'B, T >= 1'),
        (lambda: model.generate(x, 3, temperature=-1), ValueError, 'temperature'),
        (lambda: model.generate(x, 3, top_k=-3), ValueError, 'top_k'),
        (lambda: model.generate(x, -5), ValueError, 'max_new_tokens'),
        (lambda: clf(x, lengths=torch.tensor([3])), ValueError, r'shape \(B,\)'),
        (lambda: clf(x, lengths=torch.tensor([3.0, 2.0])), ValueError, 'integer tensor'),
        (lambda: model.step(x[:, 0], MIPT(small(n_layer=3)).init_state(2)), ValueError, '2 layers'),
        (lambda: model.step(x[:, 0], model.init_state(3)), ValueError, r'\(B,\) = \(3,\)'),
        (lambda: model.step(x[:, 0], [{}, {}]), ValueError, 'DecodeState'),
        (lambda: MIPTConfig(n_layer='2'), ValueError, 'n_layer must be int'),
        (lambda: MIPTConfig(n_embd=32.5), ValueError, 'n_embd must be int'),
        (lambda: MIPTConfig(cache_explore=-2), ValueError, 'cache_explore'),
        (lambda: MIPTConfig(readout='max'), ValueError, 'readout'),
        (lambda: clf(x, labels=torch.tensor([0, 1])), TypeError, 'labels'),      # targets is the one name
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_prefill_state_is_the_exact_cache_also_in_training_mode():
    """Exploration candidates widen what training queries attend to, never the decoding state."""
    torch.manual_seed(0)
    model = lively(MIPT(small(n_layer=1, cache_size=30, cache_tau=0.5, cache_explore=8))).double()
    idx = torch.randint(0, 40, (2, 40))
    _, ref = model.eval().prefill(idx)
    _, got = model.train().prefill(idx)   # one layer: its input, and so its scores, do not depend on the mode
    a, b = ref.layers[0].cache, got.layers[0].cache
    assert torch.equal(a.pos, b.pos) and torch.equal(a.score, b.score) and torch.equal(a.k, b.k)
    assert (a.score[a.pos >= 0] > 0.5).all()             # only eligible tokens


def test_truncate_doc_keeps_the_read_out_token():
    import numpy as np
    from codec import truncate_doc
    assert truncate_doc([1, 2, 3, 4, 9], 3, eot_token=9) == [1, 2, 9]
    assert truncate_doc([1, 2, 3, 4, 5], 3, eot_token=9) == [1, 2, 3]
    assert truncate_doc([1, 2], 3, eot_token=9) == [1, 2]
    assert truncate_doc(np.array([1, 2, 3, 4, 9]), 3, eot_token=9).tolist() == [1, 2, 9]
