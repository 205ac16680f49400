"""Tests of the fused CUDA MIPT scan (kernels.cu) against a float64 PyTorch reference.

Every test skips on machines without CUDA.  Output buffers are poisoned with NaN before
the kernels run (kernels.POISON_OUTPUTS), so an element the kernels fail to write fails the test.
"""
import contextlib
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import kernels  # noqa: E402
import mipt  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


@pytest.fixture(autouse=True)
def _poison_and_default_tiles():
    old = (kernels.POISON_OUTPUTS, kernels.FWD_TILE, kernels.BWD_TILE, kernels.MAX_BLOCKS)
    kernels.POISON_OUTPUTS = True
    yield
    kernels.POISON_OUTPUTS, kernels.FWD_TILE, kernels.BWD_TILE, kernels.MAX_BLOCKS = old


@pytest.fixture(scope="module")
def mod():
    m = kernels.load_scan(verbose=False)
    assert m is not None, "kernels.cu failed to build"
    return m


def rel(a, b):
    a, b = a.detach().to(torch.complex128 if a.is_complex() else torch.float64), b.detach()
    b = b.to(a.dtype)
    assert torch.isfinite(torch.view_as_real(a) if a.is_complex() else a).all(), "non-finite output"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(B, T, D, *, logit_mean=0.0, logit_std=2.0, dtype=torch.float32, h0=False):
    """Fresh random inputs (unseeded on purpose: every run draws new ones)."""
    r = lambda: torch.randn(B, T, D, device=DEV)  # noqa: E731
    logit = (logit_mean + logit_std * r()).to(dtype)
    theta = (math.pi * r()).to(dtype)
    u_re, u_im = r().to(dtype), r().to(dtype)
    hh = torch.randn(B, D, dtype=torch.complex64, device=DEV) if h0 else None
    return logit, theta, u_re, u_im, hh


def check(B, T, D, *, fwd_tol=1e-5, grad_tol=1e-4, h0=False, dtype=torch.float32, ref=None,
          **kw_inputs):
    logit, theta, u_re, u_im, hh = make_inputs(B, T, D, h0=h0, dtype=dtype, **kw_inputs)
    xs = [x.detach().clone().requires_grad_(True) for x in (logit, theta, u_re, u_im)]
    h0k = hh.clone().requires_grad_(True) if h0 else None
    y, hl = kernels.MIPTScanCUDA.apply(*xs, h0k)
    assert y.dtype == torch.float32 and y.shape == (B, T, D)
    assert hl.dtype == torch.complex64 and hl.shape == (B, D)

    xr = [x.detach().to(torch.float64).requires_grad_(True) for x in (logit, theta, u_re, u_im)]
    h0r = hh.to(torch.complex128).requires_grad_(True) if h0 else None
    y_ref, hl_ref = (ref or mipt_scan_reference)(*xr, h0r)

    assert rel(y, y_ref) <= fwd_tol, f"y error {rel(y, y_ref):.3g}"
    assert rel(hl, hl_ref) <= fwd_tol, f"h_last error {rel(hl, hl_ref):.3g}"

    gy = torch.randn(B, T, D, device=DEV)
    ghl = torch.randn(B, D, dtype=torch.complex64, device=DEV)
    ins = xs + ([h0k] if h0 else [])
    ins_ref = xr + ([h0r] if h0 else [])
    grads = torch.autograd.grad((y, hl), ins, (gy, ghl))
    grads_ref = torch.autograd.grad((y_ref, hl_ref), ins_ref,
                                    (gy.double(), ghl.to(torch.complex128)))
    names = ["logit", "theta", "u_re", "u_im", "h0"]
    for n, g, gr in zip(names, grads, grads_ref):
        assert g.dtype == (torch.complex64 if n == "h0" else dtype)
        e = rel(g, gr)
        assert e <= grad_tol, f"grad {n} error {e:.3g} (B,T,D)=({B},{T},{D})"
    return y, hl, grads


# ---- float64 doubling scan (autograd), fast enough for very long T -------------------
def scan_doubling_f64(logit, theta, u_re, u_im, h0=None):
    logit, theta, u_re, u_im = (x.to(torch.float64) for x in (logit, theta, u_re, u_im))
    p = torch.exp(torch.nn.functional.logsigmoid(logit))
    q = torch.exp(torch.nn.functional.logsigmoid(-logit))
    a = torch.polar(q, theta)
    b = torch.complex(p * u_re, p * u_im)
    if h0 is not None:
        b = torch.cat([b[:, :1] + a[:, :1] * h0.to(torch.complex128)[:, None], b[:, 1:]], 1)
    T, k = a.shape[1], 1
    while k < T:  # Hillis-Steele: (a, b)_t <- (a_t a_{t-k}, a_t b_{t-k} + b_t)
        b = torch.cat([b[:, :k], a[:, k:] * b[:, :-k] + b[:, k:]], 1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], 1)
        k *= 2
    return b.real, b[:, -1]


# ---- tests ----------------------------------------------------------------------------
def test_builds(mod):
    assert {tuple(c) for c in mod.configs()} >= {kernels.FWD_TILE, kernels.BWD_TILE}


@pytest.mark.parametrize("B,T,D", [(2, 1, 33), (2, 63, 40), (3, 64, 64), (1, 129, 1),
                                   (2, 200, 96), (1, 4099, 37)])
@pytest.mark.parametrize("h0", [False, True])
def test_fp32_random(mod, B, T, D, h0):
    check(B, T, D, h0=h0)


def test_noncontiguous_inputs(mod):
    B, T, D = 2, 77, 50
    logit, theta, u_re, u_im, _ = make_inputs(B, D, T)  # (B, D, T), then transposed views
    xs = [x.transpose(1, 2) for x in (logit, theta, u_re, u_im)]
    assert not xs[0].is_contiguous()
    y, hl = kernels.MIPTScanCUDA.apply(*xs)
    y_ref, hl_ref = mipt_scan_reference(*xs)
    assert rel(y, y_ref) <= 1e-5 and rel(hl, hl_ref) <= 1e-5


def fp32_loop(logit, theta, u_re, u_im, h0=None):
    """The plain float32 sequential loop: the accuracy any fp32 scan can be held to."""
    p, q = torch.sigmoid(logit.float()), torch.sigmoid(-logit.float())
    a, b = torch.polar(q, theta.float()), torch.complex(p * u_re.float(), p * u_im.float())
    h = torch.zeros_like(a[:, 0]) if h0 is None else h0.to(torch.complex64)
    ys = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        ys.append(h.real)
    return torch.stack(ys, 1), h


def check_vs_fp32_loop(logit, theta, u_re, u_im, hh):
    y, hl = kernels.MIPTScanCUDA.apply(logit, theta, u_re, u_im, hh)
    y_ref, hl_ref = mipt_scan_reference(logit, theta, u_re, u_im, hh)
    y32, hl32 = fp32_loop(logit, theta, u_re, u_im, hh)
    for out, ref, loop in ((y, y_ref, y32), (hl, hl_ref, hl32)):
        e, e_loop = rel(out, ref), rel(loop, ref)
        assert e <= max(1e-5, 2.0 * e_loop), f"kernel {e:.3g} vs fp32 loop {e_loop:.3g}"


@pytest.mark.parametrize("logit_mean", [-9.2, -12.0])
def test_wave_phase_gate_near_one(mod, logit_mean):
    # p ~ 1e-4 .. 6e-6: |a| within 1e-4 of 1; long sequence, the state barely decays, so
    # rounding accumulates like in any fp32 scan: hold the kernel to the fp32 loop's error.
    logit, theta, u_re, u_im, hh = make_inputs(2, 4099, 48, logit_mean=logit_mean,
                                               logit_std=0.05, h0=True)
    check_vs_fp32_loop(logit, theta, u_re, u_im, hh)
    # gradients: float64 autograd reference
    check(2, 1500, 48, logit_mean=logit_mean, logit_std=0.05, h0=True, fwd_tol=2e-5)


def test_wave_phase_extreme(mod):
    # logit = -12 (p ~ 6e-6) and some -30 (p ~ 1e-13, |a| == 1 in fp32).
    logit, theta, u_re, u_im, hh = make_inputs(1, 2050, 64, h0=True)
    logit = torch.full_like(logit, -12.0)
    logit[..., ::3] = -30.0
    check_vs_fp32_loop(logit, theta, u_re, u_im, hh)


def test_particle_phase_p_near_one(mod):
    check(2, 300, 64, logit_mean=12.0, logit_std=1.0, h0=True)
    check(2, 300, 64, logit_mean=40.0, logit_std=1.0)  # p == 1.0 in fp32


def test_bf16_inputs(mod):
    # The reference sees the same bf16-rounded inputs; gradients are rounded to bf16.
    check(2, 1000, 72, dtype=torch.bfloat16, fwd_tol=1e-5, grad_tol=1e-2, h0=True)


@pytest.mark.parametrize("B,T,D", [(1, 65536, 64), (1, 20001, 5)])
def test_long_sequence_few_channels(mod, B, T, D):
    check(B, T, D, ref=scan_doubling_f64, fwd_tol=2e-5, grad_tol=2e-4, h0=True,
          logit_mean=-3.0)


def test_doubling_reference_matches_loop():
    dev_cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 37, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    h0 = torch.randn(2, 5, dtype=torch.complex128, generator=g)
    y1, h1 = mipt_scan_reference(*xs, h0)
    y2, h2 = scan_doubling_f64(*xs, h0)
    assert y1.device == dev_cpu
    assert torch.allclose(y1, y2, atol=1e-12) and torch.allclose(h1, h2, atol=1e-12)


def test_all_tile_configs(mod):
    for S, L in mod.configs():
        kernels.FWD_TILE = kernels.BWD_TILE = (S, L)
        check(2, 1000, 70, h0=True)
        check(1, 33, 3)


def test_grid_size_invariant(mod):
    # Any persistent grid size (one block doing every tile in ticket order, a few, or the
    # occupancy default, or one block per tile) gives bitwise identical results.
    logit, theta, u_re, u_im, hh = make_inputs(2, 3000, 70, h0=True, logit_mean=-3.0)
    gy, ghl = torch.randn(2, 3000, 70, device=DEV), torch.randn(2, 70, dtype=torch.complex64,
                                                                  device=DEV)
    outs = []
    for mb in (1, 7, 0, 1 << 30):
        kernels.MAX_BLOCKS = mb
        xs = [x.clone().requires_grad_(True) for x in (logit, theta, u_re, u_im)]
        h0 = hh.clone().requires_grad_(True)
        y, hl = kernels.MIPTScanCUDA.apply(*xs, h0)
        outs.append((y, hl) + torch.autograd.grad((y, hl), xs + [h0], (gy, ghl)))
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


def test_deterministic(mod):
    # Look-back applies maps, never composes them: bitwise equal across runs.
    logit, theta, u_re, u_im, hh = make_inputs(1, 30000, 256, h0=True, logit_mean=-4.0)
    outs = []
    for _ in range(3):
        xs = [x.clone().requires_grad_(True) for x in (logit, theta, u_re, u_im)]
        y, hl = kernels.MIPTScanCUDA.apply(*xs, hh)
        g = torch.autograd.grad((y, hl), xs, (torch.ones_like(y), torch.ones_like(hl)))
        outs.append((y, hl) + tuple(g))
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


def test_every_output_written(mod):
    # Poisoned buffers (NaN) must be fully overwritten, also at ragged D and T.
    for B, T, D in [(3, 65, 33), (1, 1, 1), (2, 130, 31)]:
        logit, theta, u_re, u_im, hh = make_inputs(B, T, D, h0=True)
        xs = [x.clone().requires_grad_(True) for x in (logit, theta, u_re, u_im)]
        h0 = hh.clone().requires_grad_(True)
        y, hl = kernels.MIPTScanCUDA.apply(*xs, h0)
        g = torch.autograd.grad((y, hl), xs + [h0], (torch.randn_like(y), torch.randn_like(hl)))
        for t in (y, hl) + g:
            t = torch.view_as_real(t) if t.is_complex() else t
            assert torch.isfinite(t).all()


def test_h_last_only_and_no_grad(mod):
    logit, theta, u_re, u_im, hh = make_inputs(2, 100, 40, h0=True)
    with torch.no_grad():
        y, hl = kernels.MIPTScanCUDA.apply(logit, theta, u_re, u_im, hh)
    y_ref, hl_ref = mipt_scan_reference(logit, theta, u_re, u_im, hh)
    assert rel(y, y_ref) <= 1e-5 and rel(hl, hl_ref) <= 1e-5
    # gradient through h_last alone (y unused)
    xs = [x.clone().requires_grad_(True) for x in (logit, theta, u_re, u_im)]
    xr = [x.double().requires_grad_(True) for x in (logit, theta, u_re, u_im)]
    _, hl = kernels.MIPTScanCUDA.apply(*xs)
    _, hl_ref = mipt_scan_reference(*xr)
    (hl.abs() ** 2).sum().backward()
    (hl_ref.abs() ** 2).sum().backward()
    for a, b in zip(xs, xr):
        assert rel(a.grad, b.grad) <= 1e-4


def mipt_scan_reference(logit, theta, u_re, u_im, h0=None):
    """Sequential float64 reference (differentiable): (y float64, h_last complex128)."""
    logit, theta, u_re, u_im = (x.to(torch.float64) for x in (logit, theta, u_re, u_im))
    B, T, D = logit.shape
    # exp(logsigmoid) keeps p, 1 - p and both derivatives (p q) accurate at saturation,
    # where float64 sigmoid rounds p to exactly 1 and autograd's p (1 - p) to 0.
    p = torch.exp(torch.nn.functional.logsigmoid(logit))
    q = torch.exp(torch.nn.functional.logsigmoid(-logit))
    a = torch.polar(q, theta)
    b = torch.complex(p * u_re, p * u_im)
    if h0 is None:
        h = torch.zeros(B, D, dtype=torch.complex128, device=logit.device)
    else:
        h = h0.to(torch.complex128)
    ys = []
    for t in range(T):
        h = a[:, t] * h + b[:, t]
        ys.append(h.real)
    y = torch.stack(ys, dim=1) if ys else logit.new_zeros(B, 0, D)
    return y, h


def test_model_uses_the_kernel_and_matches_the_torch_scan():
    """The whole model on the GPU: scan_impl='cuda' and 'torch' give the same loss and gradients."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=300, n_layer=2, n_embd=64, n_head=4, cache_size=4, cache_chunk=32)
    a = mipt.MIPT(mipt.MIPTConfig(scan_impl='cuda', **cfg)).to(DEV)
    b = mipt.MIPT(mipt.MIPTConfig(scan_impl='torch', **cfg)).to(DEV)
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 50, (3, 257), device=DEV)
    torch.manual_seed(1)  # the same exploration candidates for both (training mode draws them at random)
    la = a(idx, idx)[1]
    torch.manual_seed(1)
    lb = b(idx, idx)[1]
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 1e-5
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert rel(pa.grad, pb.grad) < 1e-3, n
    torch.manual_seed(1)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        lc = a(idx, idx)[1]
    assert abs(lc.item() - lb.item()) < 0.05


def decoded(model, prompt, n, **kw):
    """The n tokens engine.decode continues prompt with, (B, n)."""
    return torch.stack([d.token for d in engine.decode(model, prompt, n, **kw)], 1)


def graphed_against_eager(model, prompt, n, tol, look=lambda graphed: None, compile=False, dtype=None):
    """Step n greedy tokens after prompt eagerly and through engine.graphed_step (under autocast to dtype, if
    given, both alike); the logits agree to tol. Returns the final (eager, graphed) states; look(graphed state)
    after every step."""
    amp = torch.autocast('cuda', dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.no_grad(), amp:
        _, eager = model.prefill(prompt)
        _, st = model.prefill(prompt)
        assert engine.graphable(model)
        step = engine.graphed_step(model, st, dtype, compile=compile)
        tok = prompt[:, -1]
        for _ in range(n):
            le, eager = model.step(tok, eager)
            lg, graphed = step(tok)
            assert rel(lg, le) < tol
            look(graphed)
            tok = le.argmax(-1)
    return eager, graphed


def test_graphed_step_equals_eager_step():
    """Decoding through one CUDA graph replay per token gives eager step's logits and state, evictions included."""
    torch.manual_seed(0)
    cfg = mipt.MIPTConfig(vocab_size=97, block_size=64, n_layer=2, n_embd=64, n_head=4, cache_size=4)
    model = mipt.MIPT(cfg).to(DEV).eval()
    for block in model.blocks:  # spread the scores so that the cache keeps changing its mind
        block.mix.proj.bias.data[:64].normal_(-1.0, 1.0)
    prompt = torch.randint(0, 97, (2, 20), device=DEV)
    seen = set()
    eager, graphed = graphed_against_eager(model, prompt, 40, 1e-5,
                                           lambda g: seen.add(tuple(g.layers[0].cache.pos[0].tolist())))
    assert len(seen) > 1  # slots were evicted and refilled
    assert int(graphed.pos) == eager.pos == 60
    for a, b in zip(eager.layers, graphed.layers):
        assert torch.equal(a.cache.pos, b.cache.pos) and rel(b.h, a.h) < 1e-5 and rel(b.cache.k, a.cache.k) < 1e-5
    out = torch.cat([prompt, decoded(model, prompt, 10, top_k=1)], 1)  # decode runs through the graph on CUDA
    ref = prompt
    for _ in range(10):
        ref = torch.cat([ref, model(ref)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def test_graphed_twin_equals_eager_twin():
    """The Transformer twin decodes through one CUDA graph per token with a static KV cache, as eager steps do;
    past its block_size decode slides a window (no graph)."""
    torch.manual_seed(0)
    cfg = mipt.MIPTConfig(vocab_size=97, block_size=40, n_layer=2, n_embd=64, n_head=4, mixer='attention',
                          cache_size=0)
    model = mipt.MIPT(cfg).to(DEV).eval()
    prompt = torch.randint(0, 97, (2, 20), device=DEV)
    graphed_against_eager(model, prompt, 15, 1e-4)
    with torch.no_grad():
        step = engine.graphed_step(model, model.prefill(prompt)[1])
        for _ in range(20):                              # positions 20..39, the last the block holds
            step(prompt[:, -1])
        with pytest.raises(ValueError, match='reached its block_size'):
            step(prompt[:, -1])
    for p in (prompt, torch.randint(0, 97, (2, 39), device=DEV)):  # 39: the graph is built at the last position
        out = torch.cat([p, decoded(model, p, 30, top_k=1)], 1)   # graphed until position 40, then the window
        ref = p
        for _ in range(30):
            ref = torch.cat([ref, model(ref[:, -40:])[0][:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out, ref)


@pytest.mark.parametrize('mixer', ['mipt', 'attention'])
def test_compiled_graphed_step_equals_eager_step(mixer):
    """decode(compile=True): the step compiled by torch.compile, then captured, gives eager step's logits and
    state, for MIPT (evictions included) and the twin; decode's tokens match the uncompiled graph's."""
    torch.manual_seed(0)
    cfg = mipt.MIPTConfig(vocab_size=97, block_size=64, n_layer=2, n_embd=64, n_head=4, mixer=mixer,
                          cache_size=4 if mixer == 'mipt' else 0)
    model = mipt.MIPT(cfg).to(DEV).eval()
    if mixer == 'mipt':
        for block in model.blocks:
            block.mix.proj.bias.data[:64].normal_(-1.0, 1.0)
    prompt = torch.randint(0, 97, (2, 20), device=DEV)
    from torch._dynamo.utils import counters
    graphs = counters['stats']['unique_graphs']
    eager, graphed = graphed_against_eager(model, prompt, 30, 1e-4, compile=True)
    assert counters['stats']['unique_graphs'] > graphs  # the step was compiled, not silently left eager
    assert int(graphed.pos) == eager.pos == 50
    plain = decoded(model, prompt, 12, temperature=0)
    fused = decoded(model, prompt, 12, temperature=0, compile=True)
    assert torch.equal(plain, fused)


@pytest.mark.parametrize('mixer', ['mipt', 'attention'])
@pytest.mark.parametrize('compile', [False, True])
def test_bf16_graphed_step_reads_linears_cast_once(mixer, compile):
    """graphed_step under bf16 autocast captures with every Linear's weights cast once (linears_cast): its logits
    are eager autocast's (the same casts; compiled, to bf16 rounding), the graph keeps its bf16 copies, and the
    model gets its own float32 parameters back, the head still tied to the embedding."""
    torch.manual_seed(0)
    cfg = mipt.MIPTConfig(vocab_size=97, block_size=64, n_layer=2, n_embd=64, n_head=4, mixer=mixer,
                          cache_size=4 if mixer == 'mipt' else 0)
    model = mipt.MIPT(cfg).to(DEV).eval()
    before = dict(model.named_parameters())
    prompt = torch.randint(0, 97, (2, 20), device=DEV)
    graphed_against_eager(model, prompt, 12, 2e-2 if compile else 1e-3, compile=compile, dtype=torch.bfloat16)
    assert dict(model.named_parameters()) == before and model.head.weight is model.wte.weight
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        step = engine.graphed_step(model, model.prefill(prompt)[1], torch.bfloat16)
    assert step.weights and all(w.dtype == torch.bfloat16 for w in step.weights)
