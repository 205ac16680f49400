"""
peers.py: flash-linear-attention layers as the mixer of mipt's Block, for experiments and benchmarks.

flash-linear-attention ("fla", PyPI `flash-linear-attention` + `fla-core`, Triton kernels, CUDA only) is an
optional dependency: mipt.py never imports it and requirements.txt does not list it.

    pip install flash-linear-attention fla-core      # offline, from the wheels in .whl/ (see below):
    pip install --no-index --no-deps --find-links .whl fla-core flash-linear-attention
    import peers
    model = MIPT(config)                              # any MIPT model, e.g. mixer='mipt'
    peers.use_peer(model, 'gla')                      # every block's .mix becomes fla's GLA layer
    peers.warmup(model.blocks[0].mix, B, T, config.n_embd, 'cuda', torch.bfloat16)  # before timing

API
    PEERS                    name -> Peer (the fla class and how its constructor arguments follow n_embd, n_head)
    available()              whether fla imports (its kernels then still need a CUDA GPU to run)
    make_mixer(name, D, H)   one peer layer as a mipt mixer: forward(x (B,T,D), want_state=False) -> (out, None, None)
    use_peer(model, name)    replace every block's .mix of a MIPT model in place; returns the model
    state_bytes(name, D, H, batch=1, dtype_bytes=4)   the peer's per-layer recurrent decoding state
    warmup(module, B, T, D, device, dtype)            one forward+backward, so that Triton autotunes before timing

Constructor arguments. Each peer is sized to about the parameters of a MIPT mixer with a cache (K > 0) at the
same width D, 9.0 D^2 (its projections 4 D^2, the cache's 5 D^2; K = 0 and the attention twin have 4.0 D^2).
H is mipt's n_head; parameters per layer at D = 1024, H = 8, against MIPT K=64's 9.45M:

    gated_deltanet  GatedDeltaNet(hidden_size=D, num_heads=H, head_dim=D/H, expand_v=2, use_short_conv=True,
                    conv_size=4, mode='chunk'): q, k D^2 each, v, gate, out 2 D^2 each            8.42M (0.89x)
    mamba2          Mamba2(hidden_size=D, expand=3, head_dim=64, state_size=64, n_groups=1, conv_kernel=4,
                    chunk_size=256): in_proj D x (6D + 2N + 3D/64), out_proj 3D x D              9.64M (1.02x)
    gla             GatedLinearAttention(hidden_size=D, num_heads=H, expand_k=1, expand_v=2, mode='chunk',
                    use_short_conv=False): q, k D^2 each, v, gate, out 2 D^2 each, low-rank forget gate   8.42M (0.89x)
    hgrn            HGRNAttention(hidden_size=D, expand_ratio=2, mode='chunk', use_short_conv=False):
                    input, forget, gate projections 2 D^2 each, out 2 D^2                          8.39M (0.89x)

Weights are then initialised as mipt initialises its own (every nn.Linear N(0, 0.02), zero biases, the output
projection scaled by 1/sqrt(2 n_layer) like mipt's c_proj); fla's own parameter inits (A_log, dt_bias, convs,
norms) are kept.

Decoding state per layer and sequence (state_bytes, elements; fla keeps recurrent states in fp32):
    gated_deltanet  H x (D/H) x (2D/H) = 2 D^2 / H, plus the three short convolutions' windows (D + D + 2D) x 4
    mamba2          heads x head_dim x state_size = 3D x 64, plus the convolution window (3D + 2 x 64) x 4
    gla             H x (D/H) x (2D/H) = 2 D^2 / H
    hgrn            2D (the expanded hidden state)
MIPT K=64 keeps D complex numbers plus 64 cached keys and values of D each; attention keeps 2 T D.

Mamba2. fla's Mamba2 layer runs its fast path only with `mamba_ssm` (a compiled CUDA package) installed, and
otherwise falls back to a slow, memory-hungry PyTorch SSD. Without mamba_ssm, the mixer here keeps fla's Mamba2
parameters and computation (in_proj, causal depthwise conv + SiLU, softplus(dt + dt_bias), A = -exp(A_log),
the SSD recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t h_t + D x_t, gated RMSNorm, out_proj) but
runs the recurrence through fla's Triton kernel for the same recurrence, chunk_simple_gla (q = C, k = B,
v = dt x, per-head log decay g = dt A, scale 1). `mixer.impl` says which path runs.

Warm-up. fla's Triton kernels autotune on their first call for a given shape and dtype (this can take minutes:
many configurations are compiled and timed); Triton caches the choice on disk (~/.triton/cache) for later
processes on the same machine. Call warmup(module, B, T, D, device, dtype) once per shape before timing, or
expect the first step of a training run to be slow.

Peers do not decode through mipt's API (prefill/step): forward(want_state=True) and step raise.

Versions. Written against fla 0.6.0 (Triton >= 3.3; it knows Triton 3.6). flash-linear-attention 0.6.0 declares
transformers >= 5.6.2, for fla.models only: with an older transformers, `import fla` fails in fla.models, and
this module then loads the fla package without its __init__ (the layers need only transformers.utils.logging;
checked with transformers 4.57.6 and 5.24.0). Install with --no-deps to keep pip from upgrading transformers.
"""

import importlib
import importlib.util
import logging
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

INSTALL = 'pip install flash-linear-attention fla-core'


@dataclass(frozen=True)
class Peer:
    cls: str             # fla.layers class name
    module: str          # the fla module that defines it
    note: str            # one line for tables


PEERS = {
    'gated_deltanet': Peer('GatedDeltaNet', 'fla.layers.gated_deltanet', 'Gated DeltaNet, head D/H, expand_v 2'),
    'mamba2': Peer('Mamba2', 'fla.layers.mamba2', 'Mamba2, expand 3, head 64, state 64'),
    'gla': Peer('GatedLinearAttention', 'fla.layers.gla', 'GLA, expand_k 1, expand_v 2'),
    'hgrn': Peer('HGRNAttention', 'fla.layers.hgrn', 'HGRN, expand 2'),
}


def _mamba2_expand_head(D):
    expand, head_dim = 3, 64
    if (expand * D) % head_dim:
        head_dim = math.gcd(expand * D, 64)
    return expand, head_dim


def peer_kwargs(name, n_embd, n_head):
    """The fla constructor arguments of a peer at width n_embd with n_head heads (see the module docstring)."""
    D, H = n_embd, n_head
    _check_name(name)
    if name in ('gated_deltanet', 'gla') and D % H:
        raise ValueError(f"{name}: n_embd ({D}) must be divisible by n_head ({H})")
    if name == 'gated_deltanet':
        return dict(hidden_size=D, num_heads=H, head_dim=D // H, expand_v=2, use_short_conv=True, conv_size=4,
                    mode='chunk')
    if name == 'mamba2':
        expand, head_dim = _mamba2_expand_head(D)
        return dict(hidden_size=D, expand=expand, head_dim=head_dim, state_size=64, n_groups=1, conv_kernel=4,
                    chunk_size=256, backend='triton')
    if name == 'gla':
        return dict(hidden_size=D, num_heads=H, expand_k=1, expand_v=2, mode='chunk', use_short_conv=False)
    if name == 'hgrn':
        return dict(hidden_size=D, expand_ratio=2, mode='chunk', use_short_conv=False)
    raise AssertionError(name)


def state_bytes(name, n_embd, n_head, batch=1, dtype_bytes=4):
    """Bytes of one peer layer's recurrent decoding state for `batch` sequences, at dtype_bytes per element
    (fla keeps recurrent states in fp32: 4). Read off the fla layer classes: the recurrent state plus any
    short-convolution windows (each [batch, channels, kernel_size])."""
    kw = peer_kwargs(name, n_embd, n_head)
    D = n_embd
    if name == 'gla':
        H, dk, dv = kw['num_heads'], round(D * kw['expand_k']), round(D * kw['expand_v'])
        n = H * (dk // H) * (dv // H)
    elif name == 'gated_deltanet':
        H, hk = kw['num_heads'], kw['head_dim']
        hv = int(hk * kw['expand_v'])
        n = H * hk * hv + (2 * H * hk + H * hv) * kw['conv_size']
    elif name == 'mamba2':
        inner = kw['expand'] * D
        heads = inner // kw['head_dim']
        conv_dim = inner + 2 * kw['n_groups'] * kw['state_size']
        n = heads * kw['head_dim'] * kw['state_size'] + conv_dim * kw['conv_kernel']
    else:  # hgrn
        n = kw['expand_ratio'] * D
    return batch * n * dtype_bytes


# -----------------------------------------------------------------------------
# Importing fla

_FLA = None          # {'fla class name': class}, once imported
_FLA_ERROR = None    # why fla could not be imported


def _bare_package(name):
    """Register package `name` without running its __init__ (fla's imports fla.models, which needs a newer
    transformers than the layers do)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    mod = importlib.util.module_from_spec(spec)
    try:
        from importlib.metadata import version
        mod.__version__ = version('fla-core')
    except Exception:
        pass
    sys.modules[name] = mod
    return mod


def _import_fla():
    """Import the fla layer classes once; None (and _FLA_ERROR set) when fla is missing or broken."""
    global _FLA, _FLA_ERROR
    if _FLA is not None or _FLA_ERROR is not None:
        return _FLA
    try:
        try:
            importlib.import_module('fla')  # runs fla/__init__, which may fail
        except ModuleNotFoundError:
            raise
        except ImportError:
            # fla is installed, but fla/__init__ failed: typically fla.models against an older transformers
            # ("cannot import name 'PreTrainedConfig'"). The layers need only transformers.utils.logging.
            for key in [k for k in sys.modules if k == 'fla' or k.startswith('fla.models')]:
                del sys.modules[key]
            _bare_package('fla')
        quiet = logging.getLogger('fla')
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            classes = {p.cls: getattr(importlib.import_module(p.module), p.cls) for p in PEERS.values()}
            from fla.ops.simple_gla import chunk_simple_gla
        finally:
            quiet.setLevel(level)
        classes['chunk_simple_gla'] = chunk_simple_gla
        _FLA = classes
    except Exception as exc:  # ImportError, or a broken install (e.g. a Triton mismatch)
        _FLA_ERROR = f"{type(exc).__name__}: {exc}"
    return _FLA


def available():
    """Whether flash-linear-attention imports here (its kernels still need a CUDA GPU to run)."""
    return _import_fla() is not None


def _check_name(name):
    if name not in PEERS:
        raise SystemExit(f"peers: unknown peer {name!r}; valid peers: {', '.join(PEERS)}")


def _require_fla():
    if _import_fla() is None:
        raise SystemExit(f"peers: flash-linear-attention is not importable ({_FLA_ERROR.splitlines()[0]}); "
                         f"`{INSTALL}`")
    return _FLA


# -----------------------------------------------------------------------------
# Mixers


class PeerMixer(nn.Module):
    """An fla layer behind mipt's mixer interface: forward(x (B, T, D), want_state=False) -> (out, None, None)."""

    def __init__(self, name, layer):
        super().__init__()
        self.name, self.layer = name, layer
        self.impl = 'fla'

    def forward(self, x, want_state=False):
        if want_state:
            raise NotImplementedError(f"peer mixer {self.name!r} does not decode through mipt's prefill/step")
        return self.layer(x)[0], None, None

    def init_state(self, *args, **kwargs):
        raise NotImplementedError(f"peer mixer {self.name!r} does not decode through mipt's prefill/step")

    step = init_state

    def extra_repr(self):
        return f"name={self.name!r}, impl={self.impl!r}"


def _mamba_fast_path():
    mod = sys.modules.get('fla.layers.mamba2')
    return bool(getattr(mod, 'is_fast_path_available', False))


class Mamba2Mixer(PeerMixer):
    """fla's Mamba2. Without mamba_ssm (fla's fast path) the SSD runs through fla's chunk_simple_gla kernel."""

    def __init__(self, name, layer):
        super().__init__(name, layer)
        self.impl = 'fla+mamba_ssm' if _mamba_fast_path() else 'fla chunk_simple_gla'

    def forward(self, x, want_state=False):
        if want_state:
            return super().forward(x, want_state)
        if _mamba_fast_path() or not x.is_cuda:  # on CPU fla runs its own PyTorch reference
            return self.layer(x)[0], None, None
        return mamba2_ssd(self.layer, x), None, None


def mamba2_ssd(m, x):
    """fla Mamba2 layer m applied to x (B, T, D), with the SSD recurrence computed by chunk_simple_gla."""
    B_, T, _ = x.shape
    I, G, N, H, P = m.intermediate_size, m.n_groups, m.ssm_state_size, m.num_heads, m.head_dim
    z, xbc, dt = m.in_proj(x).split([I, m.conv_dim, H], dim=-1)
    xbc = F.silu(m.conv1d(xbc.transpose(1, 2))[..., :T].transpose(1, 2))     # causal depthwise conv
    xs, Bm, Cm = xbc.split([I, G * N, G * N], dim=-1)
    dt = F.softplus(dt.float() + m.dt_bias.float())                          # (B, T, H)
    if m.dt_limit != (0.0, float('inf')):
        dt = dt.clamp(*m.dt_limit)
    g = dt * -torch.exp(m.A_log.float())                                     # log decay per step and head
    xh = xs.reshape(B_, T, H, P)
    rep = H // G                                                             # heads per group share B and C
    k = Bm.reshape(B_, T, G, 1, N).expand(B_, T, G, rep, N).reshape(B_, T, H, N)
    q = Cm.reshape(B_, T, G, 1, N).expand(B_, T, G, rep, N).reshape(B_, T, H, N)
    v = (xh.float() * dt[..., None]).to(xh.dtype)
    o, _ = _FLA['chunk_simple_gla'](q.contiguous(), k.contiguous(), v.contiguous(), g=g, scale=1.0)
    y = o.to(xh.dtype) + xh * m._get_D(expand_to_head_dim=True).to(xh.dtype)  # the D skip, (H, P)
    y = m.norm(y.reshape(B_, T, I), z)                                         # gated RMSNorm
    return m.out_proj(y)


def _init_like_mipt(mixer, n_layer):
    """mipt's initialisation: every nn.Linear N(0, 0.02) with zero bias, the output projection like c_proj."""
    for mod in mixer.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, 0.0, 0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    for pname, p in mixer.named_parameters():
        if pname.endswith(('o_proj.weight', 'out_proj.weight')):
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))


def make_mixer(name, n_embd, n_head, n_layer=1):
    """One peer layer at width n_embd as a mipt mixer (forward(x, want_state=False) -> (out, None, None)),
    initialised as mipt initialises its layers (n_layer scales the output projection). On the CPU; move it."""
    _check_name(name)
    fla = _require_fla()
    kw = peer_kwargs(name, n_embd, n_head)
    quiet = logging.getLogger('fla')
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # fla warns about the missing mamba_ssm and causal_conv1d packages
    try:
        layer = fla[PEERS[name].cls](**kw)
    finally:
        quiet.setLevel(level)
    mixer = (Mamba2Mixer if name == 'mamba2' else PeerMixer)(name, layer)
    _init_like_mipt(mixer, n_layer)
    return mixer


def use_peer(model, name):
    """Replace every block's mixer of a MIPT model by the peer `name`, in place, on the model's device and
    dtype. The model keeps its embedding, LayerNorms, FFNs and head. Returns the model."""
    _check_name(name)
    _require_fla()
    cfg = model.config
    w = model.wte.weight
    for block in model.blocks:
        block.mix = make_mixer(name, cfg.n_embd, cfg.n_head, cfg.n_layer).to(device=w.device, dtype=w.dtype)
    return model


def warmup(module, B, T, D, device='cuda', dtype=torch.bfloat16):
    """One forward+backward of module on a random (B, T, D) input, so that Triton compiles and autotunes its
    kernels for this shape before anything is timed (fla autotunes per kernel on first use, for minutes at a
    time). dtype: the autocast dtype (torch.bfloat16 or torch.float16), or None / torch.float32 for none.
    Parameter gradients it leaves are cleared. Returns the seconds it took."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    p = next(module.parameters(), None)
    pdtype = p.dtype if p is not None else torch.float32
    x = torch.randn(B, T, D, device=dev, dtype=pdtype, requires_grad=True)
    amp = dtype in (torch.bfloat16, torch.float16) and pdtype == torch.float32
    with torch.autocast(dev.type, dtype=dtype, enabled=amp):
        out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).mean().backward()
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=amp):
        module(x)  # the no-grad forward (inference kernels can differ)
    module.zero_grad(set_to_none=True)
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0
