"""The fused cache read-out (cache_kernel.py, Triton, chosen by kernels.py) against the PyTorch reference in mipt.py.

On a GPU it runs compiled; without one, under Triton's interpreter (conftest sets TRITON_INTERPRET=1).
Without Triton every test here skips, except the error message's."""

import pytest
import torch

import cache_kernel
import kernels
import mipt
from mipt import MIPT, MIPTConfig

triton_ok = cache_kernel.triton is not None
needs_triton = pytest.mark.skipif(not triton_ok, reason="needs triton (pip install triton)")
DEV = 'cuda' if torch.cuda.is_available() else 'cpu'


def intervals(s, K, R, L, tau=0.0):
    return mipt.cache_plan(s, K, tau, L, R, torch.rand(s.shape) if R != 0 else None)


def both(B, T, H, hd, L, K, R, dtype, seed):
    """Outputs and gradients of the reference and the kernel on the same fresh random inputs."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(B, T, generator=gen)
    s[0, ::3] = 1.0                                 # ties at a saturated sigmoid
    s[-1] = (s[-1] * 4).floor() / 4 + 0.01          # ties everywhere in one row
    torch.manual_seed(seed)
    cand, end = intervals(s, K, R, L)
    mk = lambda *shape: torch.randn(*shape, generator=gen).to(DEV, dtype).requires_grad_()
    q, k, v = mk(B, T, H, hd), mk(B, T, H, hd), mk(B, T, H, hd)
    ls = torch.log(s).to(DEV).requires_grad_()
    nk, nv = mk(H, hd).float().detach().requires_grad_(), mk(H, hd).float().detach().requires_grad_()
    g = torch.randn(B, T, H, hd, generator=gen).to(DEV, dtype)
    out = []
    for attend in (mipt.cache_attention_torch, cache_kernel.CacheAttention.apply):
        o = attend(q, k, v, ls, end.to(DEV), cand.to(DEV), nk, nv, L)
        out.append([o, *torch.autograd.grad((o.float() * g.float()).sum(), [q, k, v, ls, nk, nv])])
    return out


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(b).all()
    return ((a - b).norm() / a.norm().clamp_min(1e-12)).item()


@needs_triton
@pytest.mark.parametrize('B,T,H,hd,L,K,R', [
    (2, 37, 2, 8, 16, 3, 4),        # odd T, evictions, exploration
    (2, 41, 2, 8, 5, 2, 3),         # a chunk shorter than a program's block
    (1, 230, 2, 32, 100, 8, 8),     # two programs per chunk, the last one partial
    (2, 70, 3, 16, 16, None, 0),    # unbounded, no exploration
    (2, 50, 2, 8, 8, 2, None),      # dense exploration
    (1, 300, 1, 64, 128, 64, 64),   # the default K, R and L
])
def test_kernel_equals_reference(B, T, H, hd, L, K, R):
    ref, got = both(B, T, H, hd, L, K, R, torch.float32, seed=T)
    tol = 1e-5 if DEV == 'cpu' else 2e-3    # tl.dot takes tf32 inputs on the GPU
    for name, a, b in zip(['out', 'dq', 'dk', 'dv', 'dlog_s', 'dnull_k', 'dnull_v'], ref, got):
        assert rel(a, b) < tol, f"{name}: {rel(a, b):.2e}"


@pytest.mark.skipif(not (triton_ok and torch.cuda.is_available()), reason="needs triton and a CUDA device")
@pytest.mark.parametrize('T,L,hd', [(2048, 128, 128), (1000, 64, 64), (333, 128, 32)])
def test_kernel_bf16_on_gpu(T, L, hd):
    ref, got = both(2, T, 4, hd, L, 64, 64, torch.bfloat16, seed=T)
    for name, a, b in zip(['out', 'dq', 'dk', 'dv', 'dlog_s', 'dnull_k', 'dnull_v'], ref, got):
        assert rel(a, b) < 2e-2, f"{name}: {rel(a, b):.2e}"


def model_pair(**kw):
    cfg = dict(vocab_size=40, block_size=96, n_layer=2, n_embd=32, n_head=4, cache_chunk=8, cache_size=2,
               cache_explore=3)
    cfg.update(kw)
    torch.manual_seed(0)
    a = MIPT(MIPTConfig(**cfg, cache_impl='torch')).to(DEV).train()
    b = MIPT(MIPTConfig(**cfg, cache_impl='triton')).to(DEV).train()
    b.load_state_dict(a.state_dict())
    return a, b


@needs_triton
@pytest.mark.parametrize('readout,n_classes', [('last', 0), ('mean', 3)])
def test_model_training_step_equal(readout, n_classes):
    """The whole model in training mode (exploration on): same loss, same gradients, either read-out."""
    a, b = model_pair(readout=readout, n_classes=n_classes)
    idx = torch.randint(0, 40, (2, 45), generator=torch.Generator().manual_seed(1)).to(DEV)
    grads = []
    for model in (a, b):
        torch.manual_seed(7)                                # the same exploration draws
        if n_classes:
            _, loss = model(idx, torch.tensor([0, 2], device=DEV))
        else:
            _, loss = model(idx, targets=idx)
        loss.backward()
        grads.append((loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = grads
    assert abs(la.item() - lb.item()) < 1e-5 * max(1.0, abs(la.item()))
    assert ga.keys() == gb.keys()
    for n in ga:
        assert rel(ga[n], gb[n]) < (1e-4 if DEV == 'cpu' else 5e-3), n


@needs_triton
@pytest.mark.parametrize('explore', [0, 8])
def test_selection_signal_through_the_kernel(explore):
    """The training signal of the recall issue: a token outside every query's top-K gets a gradient on
    its score only through exploration, also through the fused kernel."""
    torch.manual_seed(0)
    B, T, D = 2, 24, 16
    cfg = MIPTConfig(vocab_size=40, n_embd=D, n_head=2, cache_size=1, cache_chunk=8, cache_explore=explore,
                     cache_impl='triton')
    cache = mipt.SparseCache(cfg).to(DEV).train()
    y = torch.randn(B, T, D, device=DEV)
    s = torch.full((B, T), 0.5, device=DEV)
    s[:, 0] = 0.9                                         # the one cached token everywhere
    s.requires_grad_()
    out, _ = cache(y, s)
    out.square().sum().backward()
    g = s.grad[:, 1:].abs().sum().item()
    assert (g > 0) if explore else (g == 0)


def test_triton_impl_needs_a_backend(monkeypatch):
    monkeypatch.setattr(cache_kernel, 'INTERPRET', False)
    monkeypatch.setattr(kernels, '_FUSED', {})
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is a backend")
    model = MIPT(MIPTConfig(vocab_size=40, n_embd=32, n_head=4, cache_size=2, cache_impl='triton'))
    with pytest.raises(RuntimeError, match=r"cache_impl='triton' needs Triton and a CUDA device"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cache_impl must be 'auto', 'torch' or 'triton', got 'cuda'"):
        MIPTConfig(cache_impl='cuda')


def test_recompute_is_the_same_function():
    """recompute=True (the layer's forward replayed in backward, its exploration draws too): same loss and
    gradients as keeping the activations."""
    cfg = dict(vocab_size=40, block_size=96, n_layer=2, n_embd=32, n_head=4, cache_chunk=8, cache_size=2,
               cache_explore=3, cache_impl='torch')
    torch.manual_seed(0)
    a = MIPT(MIPTConfig(**cfg)).train()
    b = MIPT(MIPTConfig(**cfg, recompute=True)).train()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 40, (2, 45), generator=torch.Generator().manual_seed(1))
    out = []
    for model in (a, b):
        torch.manual_seed(7)
        _, loss = model(idx, targets=idx)
        loss.backward()
        out.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for n, g in out[0][1].items():
        assert torch.allclose(g, out[1][1][n], rtol=1e-5, atol=1e-7), n
