"""Tests of peers.py: flash-linear-attention layers as mipt mixers.

The layer tests need fla (`pip install flash-linear-attention fla-core`) and a CUDA GPU, and skip without
them. The import-failure and name tests run anywhere, without fla.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mipt  # noqa: E402
import peers  # noqa: E402

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
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), DEV)
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
