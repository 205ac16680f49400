"""Tests of peers.py: flash-linear-attention layers as mipt mixers.

The layer tests need fla (`pip install flash-linear-attention fla-core`) and a CUDA GPU, and skip without
them. The import-failure and name tests run anywhere, without fla. The tests of the Hopper/Triton < 3.7.1
substitutes (hopper_triton_bug) check the routing and the naive Gated DeltaNet on the CPU (fla needed), and
the kernels against fla's own on a GPU.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mipt  # noqa: E402
import peers  # noqa: E402
import runs  # noqa: E402

# 'cuda' normally; 'cpu' only for debugging through Triton's interpreter (TRITON_INTERPRET=1, slow)
DEV = os.environ.get('PEERS_TEST_DEVICE', 'cuda')
needs_fla = pytest.mark.skipif(not peers.available(), reason=f"needs flash-linear-attention ({peers.INSTALL})")
needs_gpu = pytest.mark.skipif(DEV == 'cuda' and not torch.cuda.is_available(), reason="needs a CUDA device")
NAMES = list(peers.PEERS)


def amp():
    return torch.autocast('cuda', dtype=torch.bfloat16) if DEV == 'cuda' else torch.autocast('cpu', enabled=False)


# -----------------------------------------------------------------------------
# Anywhere, without fla


def tiny_model():
    return mipt.MIPT(mipt.MIPTConfig(vocab_size=64, block_size=128, n_layer=2, n_embd=128, n_head=2, cache_size=8))


def test_missing_fla_is_one_line_exit(monkeypatch):
    monkeypatch.setitem(sys.modules, 'fla', None)  # `import fla` now fails as if it were not installed
    monkeypatch.setattr(peers, '_FLA', None)
    monkeypatch.setattr(peers, '_FLA_ERROR', None)
    assert not peers.available()
    model = tiny_model()
    with pytest.raises(SystemExit) as exc:
        peers.use_peer(model, 'gla')
    msg = str(exc.value)
    assert 'pip install flash-linear-attention fla-core' in msg
    assert '\n' not in msg
    assert all(isinstance(b.mix, mipt.MIPTLayer) for b in model.blocks)  # untouched
    with pytest.raises(SystemExit, match='pip install flash-linear-attention fla-core'):
        peers.make_mixer('hgrn', 128, 2)


def test_peers_initialise_with_mipts_init_weights():
    """Peers are initialised by mipt.init_weights, the one definition: Linears N(0, 0.02) with zero biases, the
    output projection (o_proj or out_proj) scaled like mipt's c_proj."""
    assert peers.init_weights is mipt.init_weights
    torch.manual_seed(0)
    layer = torch.nn.ModuleDict({'in_proj': torch.nn.Linear(256, 1024), 'out_proj': torch.nn.Linear(1024, 256)})
    torch.nn.init.ones_(layer['in_proj'].bias)
    peers.init_weights(layer, 8, residual=('o_proj.weight', 'out_proj.weight'))
    assert not layer['in_proj'].bias.any() and abs(layer['in_proj'].weight.std().item() - 0.02) < 1e-3
    assert abs(layer['out_proj'].weight.std().item() - 0.02 / 4) < 2e-4


def test_unknown_peer_lists_valid_names():
    with pytest.raises(SystemExit) as exc:
        peers.use_peer(tiny_model(), 'rwkv99')
    msg = str(exc.value)
    assert '\n' not in msg and 'rwkv99' in msg
    for name in ('gated_deltanet', 'mamba2', 'gla', 'hgrn'):
        assert name in msg


def test_state_bytes_formulas():
    D, H = 1024, 8
    assert peers.state_bytes('gla', D, H) == 8 * 128 * 256 * 4                       # H x dk x dv, fp32
    assert peers.state_bytes('gated_deltanet', D, H) == (8 * 128 * 256 + (1024 + 1024 + 2048) * 4) * 4
    assert peers.state_bytes('mamba2', D, H) == (48 * 64 * 64 + (3072 + 128) * 4) * 4  # heads x hd x N + conv
    assert peers.state_bytes('hgrn', D, H) == 2 * D * 4
    assert peers.state_bytes('hgrn', D, H, batch=16, dtype_bytes=2) == 16 * 2 * D * 2
    for name in NAMES:  # flat in the context: nothing depends on T
        assert peers.state_bytes(name, 256, 4, batch=3) == 3 * peers.state_bytes(name, 256, 4)


# -----------------------------------------------------------------------------
# With fla (construction runs on the CPU)


@needs_fla
@pytest.mark.parametrize('name', NAMES)
def test_parameters_comparable_to_mipt(name):
    D, H = 256, 4
    ref = sum(p.numel() for p in mipt.MIPT(mipt.MIPTConfig(vocab_size=64, n_layer=1, n_embd=D, n_head=H,
                                                          cache_size=64)).blocks[0].mix.parameters())
    n = sum(p.numel() for p in peers.make_mixer(name, D, H).parameters())
    assert 0.8 < n / ref < 1.25, (name, n, ref)


# -----------------------------------------------------------------------------
# With fla and a GPU


@needs_fla
@needs_gpu
@pytest.mark.parametrize('name', NAMES)
def test_shape_and_causality(name):
    torch.manual_seed(0)
    D, H, B, T, t = 128, 2, 2, 200, 137
    m = peers.make_mixer(name, D, H).to(DEV)
    x = torch.randn(B, T, D, device=DEV)
    x2 = x.clone()
    x2[:, t] += 1.0
    with torch.no_grad():  # float32, so that a leak is not lost in rounding
        out, s, st = m(x)
        out2 = m(x2)[0]
        with amp():
            assert m(x)[0].shape == (B, T, D)
    assert out.shape == (B, T, D) and s is None and st is None
    assert torch.isfinite(out).all()
    before = (out[:, :t] - out2[:, :t]).abs().max().item()
    after = (out[:, t:] - out2[:, t:]).abs().max().item()
    assert before <= 1e-4 * max(1.0, out.abs().max().item()), f"{name}: a later token changed earlier outputs"
    assert after > 1e-3, f"{name}: the changed token changed nothing"
    with pytest.raises(NotImplementedError):
        m(x, want_state=True)


@needs_fla
@needs_gpu
@pytest.mark.parametrize('name', NAMES)
def test_use_peer_swaps_blocks_and_trains(name):
    torch.manual_seed(0)
    model = tiny_model().to(DEV)
    peers.use_peer(model, name)
    assert all(isinstance(b.mix, peers.PeerMixer) and b.mix.name == name for b in model.blocks)
    assert not any(isinstance(m, mipt.MIPTLayer) for m in model.modules())
    assert next(model.blocks[0].mix.parameters()).device.type == torch.device(DEV).type
    opt = runs.optimizer(model, 0.0, 3e-3, (0.9, 0.95), DEV)
    idx = torch.randint(0, 64, (4, 97), device=DEV)
    losses = []
    for _ in range(12):
        with amp():
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)), losses  # no NaN
    assert losses[-1] < 0.9 * losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@needs_fla
@needs_gpu
def test_warmup_runs_and_clears_grads():
    m = peers.make_mixer('hgrn', 128, 2).to(DEV)
    secs = peers.warmup(m, 2, 130, 128, DEV, torch.bfloat16 if DEV == 'cuda' else None)
    assert secs > 0
    assert all(p.grad is None for p in m.parameters())


@needs_fla
@needs_gpu
def test_mamba2_kernel_path_matches_fla_reference():
    """The SSD through chunk_simple_gla equals fla's own PyTorch Mamba2 (fp32)."""
    torch.manual_seed(0)
    m = peers.make_mixer('mamba2', 128, 2).to(DEV)
    x = torch.randn(2, 150, 128, device=DEV)
    with torch.no_grad():
        ref = m.layer.torch_forward(x)[0]
        got = peers.mamba2_ssd(m.layer, x)
    assert (got - ref).abs().max().item() <= 2e-3 * ref.abs().max().item()


@needs_fla
@needs_gpu
@pytest.mark.parametrize('name', NAMES)
def test_state_bytes_matches_fla_cache(name):
    try:
        from fla.models.utils import Cache
    except Exception as exc:  # fla.models needs a recent transformers; the layers do not
        pytest.skip(f"fla.models.utils.Cache unavailable: {exc}")
    D, H = 128, 2
    m = peers.make_mixer(name, D, H).to(DEV)
    m.layer.layer_idx = 0
    cache = Cache()
    with torch.no_grad():
        m.layer(torch.randn(1, 100, D, device=DEV), past_key_values=cache, use_cache=True)
    st = cache[0]
    conv = st.get('conv_state')
    tensors = [st['recurrent_state']] + (list(conv) if isinstance(conv, (tuple, list)) else [conv])
    assert sum(t.numel() for t in tensors if t is not None) == peers.state_bytes(name, D, H, dtype_bytes=1)


# -----------------------------------------------------------------------------
# Hopper with Triton 3.4.0 <= version < 3.7.1: the substitutes for fla's gated chunk_bwd_dqkwg


def rel_err(got, ref):
    """fla's error ratio: RMS of the difference over RMS of the reference."""
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()


@needs_fla
def test_hopper_triton_bug_reads_fla_guard_flags(monkeypatch):
    import fla.ops.common.chunk_o as chunk_o
    assert peers.hopper_triton_bug() == bool(chunk_o.IS_NVIDIA_HOPPER and chunk_o.TRITON_ABOVE_3_4_0
                                             and not chunk_o.TRITON_ABOVE_3_7_1)
    for hopper, above_340, above_371, want in [(True, True, False, True), (True, True, True, False),
                                              (True, False, False, False), (False, True, False, False)]:
        monkeypatch.setattr(chunk_o, 'IS_NVIDIA_HOPPER', hopper)
        monkeypatch.setattr(chunk_o, 'TRITON_ABOVE_3_4_0', above_340)
        monkeypatch.setattr(chunk_o, 'TRITON_ABOVE_3_7_1', above_371)
        assert peers.hopper_triton_bug() is want


def gdn_inputs(B, T, H, HV, K, V, state_v_first=True, device='cpu', dtype=torch.float32, seed=0):
    """Raw inputs of chunk_gated_delta_rule as fla's GatedDeltaNet layer passes them (gate and beta logits);
    the initial state h0 is [B, HV, V, K] with state_v_first (as the layer keeps it), else [B, HV, K, V]."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, HV, V), g=r(B, T, HV), beta=r(B, T, HV),
                A_log=torch.empty(HV).uniform_(0, 16, generator=gen).log().to(device).requires_grad_(),
                dt_bias=r(HV, scale=0.5).float().detach().requires_grad_(),
                h0=r(B, HV, *((V, K) if state_v_first else (K, V)), scale=0.1))


def gdn_reference(inp, allow_neg_eigval, state_v_first):
    """The layer's recurrence spelled out and run by fla's naive_recurrent_gated_delta_rule."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    HV, H = inp['v'].shape[2], inp['q'].shape[2]
    q, k = (x.float() / torch.sqrt(x.float().pow(2).sum(-1, keepdim=True) + 1e-6) for x in (inp['q'], inp['k']))
    q, k = q.repeat_interleave(HV // H, 2), k.repeat_interleave(HV // H, 2)
    g = -inp['A_log'].exp() * torch.nn.functional.softplus(inp['g'].float() + inp['dt_bias'])
    beta = torch.sigmoid(inp['beta'].float()) * (2 if allow_neg_eigval else 1)
    h0 = inp['h0'].transpose(-1, -2) if state_v_first else inp['h0']
    o, ht = naive_recurrent_gated_delta_rule(q, k, inp['v'].float(), beta, g, initial_state=h0.float(),
                                             output_final_state=True)
    return o, (ht.transpose(-1, -2) if state_v_first else ht)


def gdn_kwargs(inp, allow_neg_eigval, state_v_first):
    """The arguments fla's GatedDeltaNet layer passes to chunk_gated_delta_rule in chunk mode."""
    return dict(q=inp['q'], k=inp['k'], v=inp['v'], g=inp['g'], beta=inp['beta'], initial_state=inp['h0'],
                output_final_state=True, use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first, cu_seqlens=None,
                use_gate_in_kernel=True, A_log=inp['A_log'], dt_bias=inp['dt_bias'])


GDN_GRADS = ('q', 'k', 'v', 'g', 'beta', 'A_log', 'dt_bias', 'h0')


def gdn_grads(o, ht, inp, seed=1):
    gen = torch.Generator().manual_seed(seed)
    wo = torch.randn(o.shape, generator=gen).to(o.device)
    wh = torch.randn(ht.shape, generator=gen).to(ht.device)
    loss = (o.float() * wo).sum() + (ht.float() * wh).sum()
    return dict(zip(GDN_GRADS, torch.autograd.grad(loss, [inp[n] for n in GDN_GRADS])))


@needs_fla
@pytest.mark.parametrize('HV,state_v_first,allow_neg_eigval', [(2, True, False), (4, False, True)])
def test_gdn_naive_chunk_matches_recurrent_reference(HV, state_v_first, allow_neg_eigval):
    """chunk_gated_delta_rule_naive (fla's naive chunk form) with the layer's in-kernel options equals fla's
    naive recurrence with those options applied by hand, in values, final state and gradients (CPU, fp32)."""
    # T not a multiple of the chunk (64)
    inp = gdn_inputs(B=2, T=100, H=2, HV=HV, K=16, V=32, state_v_first=state_v_first)
    o, ht = peers.chunk_gated_delta_rule_naive(**gdn_kwargs(inp, allow_neg_eigval, state_v_first))
    ro, rht = gdn_reference(inp, allow_neg_eigval, state_v_first)
    assert o.shape == inp['v'].shape and o.dtype == torch.float32 and ht.shape == inp['h0'].shape
    assert rel_err(o, ro) < 1e-5 and rel_err(ht, rht) < 1e-5
    got, ref = gdn_grads(o, ht, inp), gdn_grads(ro, rht, inp)
    for n in GDN_GRADS:
        assert rel_err(got[n], ref[n]) < 1e-4, n
    with torch.no_grad():  # lower precision in, the same dtype out (the kernel's o.to(q.dtype)); state fp32
        o16, ht16 = peers.chunk_gated_delta_rule_naive(**{**gdn_kwargs(inp, allow_neg_eigval, state_v_first),
                                                          'q': inp['q'].bfloat16(), 'v': inp['v'].bfloat16()})
    assert o16.dtype == torch.bfloat16 and ht16.dtype == torch.float32


@needs_fla
def test_gdn_naive_chunk_rejects_what_it_cannot_do():
    inp = gdn_inputs(B=1, T=10, H=2, HV=2, K=8, V=8)
    kw = gdn_kwargs(inp, False, True)
    with pytest.raises(NotImplementedError, match='cu_seqlens'):
        peers.chunk_gated_delta_rule_naive(**{**kw, 'cu_seqlens': torch.tensor([0, 4, 10])})
    with pytest.raises(TypeError, match='head_first'):
        peers.chunk_gated_delta_rule_naive(**kw, head_first=True)


@needs_fla
def test_gdn_substitute_routing(monkeypatch):
    """Where hopper_triton_bug(), fla's GatedDeltaNet layer calls chunk_gated_delta_rule_naive for calls that
    autograd differentiates, and fla's chunk_gated_delta_rule otherwise; elsewhere nothing is replaced."""
    import fla.layers.gated_deltanet as gdn_layer
    calls = []

    def fla_chunk(*args, **kwargs):  # stands for fla's kernel, which does not run on the CPU
        calls.append('fla')
        return 'fla', None

    monkeypatch.setattr(gdn_layer, 'chunk_gated_delta_rule', fla_chunk)  # restored after the test
    monkeypatch.setattr(peers, 'hopper_triton_bug', lambda: False)
    assert peers.make_mixer('gated_deltanet', 64, 2).impl == 'fla'
    assert gdn_layer.chunk_gated_delta_rule is fla_chunk  # untouched where the guard would not trip

    monkeypatch.setattr(peers, 'hopper_triton_bug', lambda: True)
    m = peers.make_mixer('gated_deltanet', 64, 2)
    assert 'naive_chunk_gated_delta_rule' in m.impl and 'Hopper' in m.impl
    routed = gdn_layer.chunk_gated_delta_rule
    assert routed is not fla_chunk and routed.peers_original is fla_chunk
    peers.make_mixer('gated_deltanet', 64, 2)
    assert gdn_layer.chunk_gated_delta_rule is routed  # installed once
    inp = gdn_inputs(B=1, T=70, H=2, HV=2, K=8, V=16)
    kw = gdn_kwargs(inp, False, True)
    o, ht = routed(**kw)  # grad enabled, inputs require grad: the naive chunk form
    assert calls == [] and isinstance(o, torch.Tensor)
    ro, rht = peers.chunk_gated_delta_rule_naive(**kw)
    assert torch.equal(o, ro) and torch.equal(ht, rht)
    with torch.no_grad():
        assert routed(**kw)[0] == 'fla'  # no backward: fla's kernel, whose forward is fine
    monkeypatch.setattr(peers, 'hopper_triton_bug', lambda: False)
    assert routed(**kw)[0] == 'fla'  # the guard would not trip: fla's kernel, unchanged
    assert calls == ['fla', 'fla']


class _Stop(Exception):
    pass


@needs_fla
def test_mamba2_ssd_routing(monkeypatch):
    """mamba2_ssd picks parallel_simple_gla for differentiated calls where hopper_triton_bug(), else
    chunk_simple_gla; all kernels are called alike (q, k, v, g=g, scale=1.0)."""
    calls = []

    def fake(name):
        def kernel(q, k, v, g=None, scale=None):  # the kernels' common keywords; stops before Triton norms
            calls.append((name, tuple(q.shape), tuple(g.shape), scale))
            raise _Stop
        return kernel

    fla = dict(peers._import_fla())
    for name in peers.SSD_KERNELS:
        fla[name] = fake(name)
    monkeypatch.setattr(peers, '_FLA', fla)
    monkeypatch.setattr(peers, 'hopper_triton_bug', lambda: False)
    m = peers.make_mixer('mamba2', 128, 2)
    assert m.impl in ('fla chunk_simple_gla', 'fla+mamba_ssm')
    x = torch.randn(2, 20, 128)

    def run(**kw):
        with pytest.raises(_Stop):
            peers.mamba2_ssd(m.layer, x, **kw)
        return calls[-1][0]

    assert run() == 'chunk_simple_gla'
    H = m.layer.num_heads
    assert calls[-1][1:] == ((2, 20, H, m.layer.ssm_state_size), (2, 20, H), 1.0)
    monkeypatch.setattr(peers, 'hopper_triton_bug', lambda: True)
    assert run() == 'parallel_simple_gla'
    with torch.no_grad():
        assert run() == 'chunk_simple_gla'
    assert run(kernel='fused_recurrent_simple_gla') == 'fused_recurrent_simple_gla'
    with pytest.raises(ValueError, match='kernel'):
        peers.mamba2_ssd(m.layer, x, kernel='chunk_gla')
    if not peers._mamba_fast_path():
        assert 'parallel_simple_gla' in peers.make_mixer('mamba2', 128, 2).impl


@needs_fla
@needs_gpu
@pytest.mark.parametrize('kernel', ['parallel_simple_gla', 'fused_recurrent_simple_gla'])
def test_ssd_substitute_kernels_match_chunk_simple_gla(kernel):
    """The substitutes for chunk_simple_gla equal it in values (fp32 and bf16) with Mamba2-like inputs, and in
    gradients where its backward runs; everywhere the gradients equal fla's PyTorch recurrence's."""
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    fla = peers._FLA
    torch.manual_seed(0)
    B, T, H, N, P = 2, 300, 3, 64, 64
    q, k = torch.randn(B, T, H, N, device=DEV), torch.randn(B, T, H, N, device=DEV)
    dt = torch.nn.functional.softplus(torch.randn(B, T, H, device=DEV) - 3)
    v = torch.randn(B, T, H, P, device=DEV) * dt[..., None]
    g = dt * -torch.empty(H, device=DEV).uniform_(1, 16)  # log decay per step, as mamba2_ssd builds it
    do = torch.randn(B, T, H, P, device=DEV)
    inputs = [t.requires_grad_() for t in (q, k, v, g)]

    def run(fn, dtype=torch.float32):
        qq, kk, vv = (t.to(dtype) for t in inputs[:3])
        o = fn(qq, kk, vv, g=g, scale=1.0)[0]
        return o, torch.autograd.grad((o.float() * do).sum(), inputs)

    with torch.no_grad():
        ref = fla['chunk_simple_gla'](*inputs[:3], g=g, scale=1.0)[0]
        got = fla[kernel](*inputs[:3], g=g, scale=1.0)[0]
        assert rel_err(got, ref) < 5e-3
        if DEV == 'cuda':  # bf16 in, bf16 out, within bf16 rounding of the fp32 result (Triton's CPU interpreter
            for fn in (fla['chunk_simple_gla'], fla[kernel]):  # gets bf16 wrong)
                got16 = fn(*(t.bfloat16() for t in inputs[:3]), g=g, scale=1.0)[0]
                assert got16.dtype == torch.bfloat16 and rel_err(got16, ref) < 2e-2, rel_err(got16, ref)
    o, grads = run(fla[kernel])
    ro, rgrads = run(lambda q_, k_, v_, g, scale: naive_recurrent_simple_gla(q_, k_, v_, g, scale=scale))
    assert rel_err(o, ro) < 5e-3
    for n, a, b in zip('qkvg', grads, rgrads):
        assert rel_err(a, b) < 1e-2, (n, rel_err(a, b))
    if not peers.hopper_triton_bug():
        _, cgrads = run(fla['chunk_simple_gla'])
        for n, a, b in zip('qkvg', grads, cgrads):
            assert rel_err(a, b) < 1e-2, (n, rel_err(a, b))


@needs_fla
@needs_gpu
@pytest.mark.parametrize('kernel', peers.SSD_KERNELS)
def test_mamba2_ssd_kernels_match_fla_reference_with_grads(kernel):
    """mamba2_ssd through each kernel equals fla's own PyTorch Mamba2 in values and gradients (fp32); the chunk
    kernel's backward only where it runs."""
    torch.manual_seed(0)
    m = peers.make_mixer('mamba2', 128, 2).to(DEV)
    x = torch.randn(2, 150, 128, device=DEV, requires_grad=True)
    params = [x] + [p for p in m.parameters() if p.requires_grad]
    ref = m.layer.torch_forward(x)[0]
    rgrads = torch.autograd.grad(ref.pow(2).sum(), params)
    if kernel == 'chunk_simple_gla' and peers.hopper_triton_bug():
        with torch.no_grad():
            got = peers.mamba2_ssd(m.layer, x, kernel=kernel)
        assert rel_err(got, ref) < 5e-3
        pytest.skip("chunk_simple_gla's backward does not run on Hopper with this Triton (forward checked)")
    got = peers.mamba2_ssd(m.layer, x, kernel=kernel)
    assert rel_err(got, ref) < 5e-3
    grads = torch.autograd.grad(got.pow(2).sum(), params)
    names = ['x'] + [n for n, p in m.named_parameters() if p.requires_grad]
    for n, a, b in zip(names, grads, rgrads):
        assert rel_err(a, b) < 1e-2, (n, rel_err(a, b))


@needs_fla
@needs_gpu
@pytest.mark.parametrize('state_v_first', [True, False])
def test_gdn_naive_chunk_matches_fla_kernel(state_v_first):
    """chunk_gated_delta_rule_naive equals fla's chunk_gated_delta_rule called as the layer calls it, in values
    and final state (the kernel's forward runs everywhere), and in gradients where its backward runs."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    inp = gdn_inputs(B=2, T=200, H=2, HV=4, K=64, V=128, state_v_first=state_v_first, device=DEV)
    kw = gdn_kwargs(inp, False, state_v_first)
    o, ht = peers.chunk_gated_delta_rule_naive(**kw)
    with torch.no_grad():
        ro, rht = chunk_gated_delta_rule(**kw)
    assert rel_err(o, ro) < 5e-3 and rel_err(ht, rht) < 5e-3
    if peers.hopper_triton_bug():
        pytest.skip("chunk_gated_delta_rule's backward does not run on Hopper with this Triton (forward checked)")
    got = gdn_grads(o, ht, inp)
    ref = gdn_grads(*chunk_gated_delta_rule(**kw), inp)
    for n in GDN_GRADS:
        assert rel_err(got[n], ref[n]) < 1e-2, (n, rel_err(got[n], ref[n]))


@needs_fla
@needs_gpu
def test_gdn_layer_with_substitute_matches_kernel(monkeypatch):
    """fla's GatedDeltaNet layer routed through the naive chunk form (forced) trains, and equals the layer on
    fla's kernel: in values through the kernel's forward (no grad) and in gradients where its backward runs."""
    import fla.layers.gated_deltanet as gdn_layer
    monkeypatch.setattr(gdn_layer, 'chunk_gated_delta_rule', gdn_layer.chunk_gated_delta_rule)  # restored after
    torch.manual_seed(0)
    m = peers.make_mixer('gated_deltanet', 128, 2).to(DEV)
    x = torch.randn(2, 150, 128, device=DEV, requires_grad=True)
    params = [x] + list(m.parameters())
    with torch.no_grad():
        ref = m(x)[0]  # no grad: fla's chunk kernel everywhere
    bug = peers.hopper_triton_bug()
    if not bug:
        rgrads = torch.autograd.grad(m(x)[0].pow(2).sum(), params)
    monkeypatch.setattr(peers, 'hopper_triton_bug', lambda: True)
    m2 = peers.make_mixer('gated_deltanet', 128, 2).to(DEV)
    m2.load_state_dict(m.state_dict())
    assert 'naive_chunk_gated_delta_rule' in m2.impl
    params2 = [x] + list(m2.parameters())
    got = m2(x)[0]  # grad enabled: the naive chunk form
    assert rel_err(got, ref) < 5e-3
    grads = torch.autograd.grad(got.pow(2).sum(), params2)
    assert all(torch.isfinite(g_).all() for g_ in grads)
    if not bug:
        names = ['x'] + [n for n, _ in m.named_parameters()]
        for n, a, b in zip(names, grads, rgrads):
            assert rel_err(a, b) < 1e-2, (n, rel_err(a, b))
    with amp():  # and under autocast, as training runs it
        out = m2(x)[0]
        out.float().pow(2).mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
