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
    hopper_triton_bug()      whether fla's guard against its Hopper/Triton < 3.7.1 bug would trip here (see below)

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

Weights are then initialised by mipt's own init_weights (every nn.Linear N(0, 0.02), zero biases, the output
projection o_proj or out_proj scaled by 1/sqrt(2 n_layer) like mipt's c_proj); fla's own parameter inits (A_log,
dt_bias, convs, norms) are kept.

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

Hopper with Triton 3.4.0 <= version < 3.7.1 (e.g. an H200 with Triton 3.6): fla's gated chunk_bwd_dqkwg gives
wrong gradients there, and fla refuses to run it (fla/ops/common/chunk_o.py, fla issue #640); it is the backward of
chunk_gated_delta_rule and chunk_simple_gla. Where that guard would trip (hopper_triton_bug(), read off fla's own
flags), and only for calls that autograd will differentiate, the two peers that need it use other exact fla paths
(no-grad forwards keep the chunk kernels, whose forward is fine): mamba2's SSD runs through parallel_simple_gla
(Triton, the attention form, same g convention), and fla's GatedDeltaNet layer calls chunk_gated_delta_rule_naive
(make_mixer rebinds the name chunk_gated_delta_rule in fla.layers.gated_deltanet; fla's PyTorch
naive_chunk_gated_delta_rule in fp32, after the kernel's fused q/k L2 norm, sigmoid beta and gate; no cu_seqlens).
Both are slower than the chunk kernels (parallel is O(T^2); the naive chunk is plain
PyTorch): time training elsewhere. Everywhere else nothing changes.

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

import functools
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

from mipt import init_weights

INSTALL = 'pip install flash-linear-attention fla-core'


@dataclass(frozen=True)
class Peer:
    cls: str             # fla.layers class name
    module: str          # the fla module that defines it


PEERS = {
    'gated_deltanet': Peer('GatedDeltaNet', 'fla.layers.gated_deltanet'),
    'mamba2': Peer('Mamba2', 'fla.layers.mamba2'),
    'gla': Peer('GatedLinearAttention', 'fla.layers.gla'),
    'hgrn': Peer('HGRNAttention', 'fla.layers.hgrn'),
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


_SUBSTITUTES = [('fla.ops.simple_gla', 'parallel_simple_gla'), ('fla.ops.simple_gla', 'fused_recurrent_simple_gla'),
                ('fla.ops.gated_delta_rule.naive', 'naive_chunk_gated_delta_rule'),
                ('fla.ops.gated_delta_rule.gate', 'naive_gdn_gate')]


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
            classes['chunk_simple_gla'] = chunk_simple_gla
            for mod, fn in _SUBSTITUTES:  # for hopper_triton_bug(); an fla without one of them still imports
                try:
                    classes[fn] = getattr(importlib.import_module(mod), fn)
                except (ImportError, AttributeError):
                    pass
        finally:
            quiet.setLevel(level)
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


def _fla_fn(name):
    """One of the fla functions _import_fla collects (a kernel or a substitute), with a clear error if missing."""
    fn = _require_fla().get(name)
    if fn is None:
        raise RuntimeError(f"peers: this flash-linear-attention has no {name} (peers.py was written against 0.6.0)")
    return fn


# -----------------------------------------------------------------------------
# Hopper with Triton 3.4.0 <= version < 3.7.1: fla's gated chunk_bwd_dqkwg is wrong there (fla #640)


def hopper_triton_bug():
    """Whether fla's guard in chunk_bwd_dqkwg (fla/ops/common/chunk_o.py) would trip here: a Hopper GPU with
    3.4.0 <= Triton < 3.7.1, read off the flags that guard uses. False without fla, or with an fla without them."""
    if _import_fla() is None:
        return False
    try:
        mod = importlib.import_module('fla.ops.common.chunk_o')
    except Exception:
        return False
    flags = [getattr(mod, f, None) for f in ('IS_NVIDIA_HOPPER', 'TRITON_ABOVE_3_4_0', 'TRITON_ABOVE_3_7_1')]
    if any(f is None for f in flags):
        return False
    hopper, above_3_4_0, above_3_7_1 = flags
    return bool(hopper and above_3_4_0 and not above_3_7_1)


def _needs_backward(*tensors):
    """Whether autograd will differentiate through a call on these tensors (only the backward is affected)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _substitute_note():
    import triton
    return f"Triton {triton.__version__} on Hopper"


def _l2norm(x, eps=1e-6):
    """fla's l2norm_fwd (fla/modules/norm/l2norm.py): x / sqrt(sum x^2 + eps) over the last dimension."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


_GDN_KWARGS = {'use_gate_in_kernel', 'A_log', 'dt_bias', 'chunk_size', 'transpose_state_layout'}


def chunk_gated_delta_rule_naive(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                 use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                                 allow_neg_eigval=False, state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None,
                                 chunk_indices=None, cp_context=None, **kwargs):
    """fla's chunk_gated_delta_rule (its signature and conventions, fla 0.6.0), computed by fla's PyTorch
    naive_chunk_gated_delta_rule in fp32 with autocast off: the in-kernel options (q/k L2 norm, beta = sigmoid
    (x2 with allow_neg_eigval), gate g = -exp(A_log) softplus(g + dt_bias)) are applied first, grouped value heads
    repeat q and k, and a V-first state ([N, HV, V, K]) is transposed to the naive's [N, HV, K, V] and back.
    q, k [B, T, H, K], v [B, T, HV, V], g and beta [B, T, HV]; returns (o [B, T, HV, V] in q's dtype, final
    state in fp32 or None). Variable-length input (cu_seqlens) and context parallelism are not supported."""
    if cu_seqlens is not None or chunk_indices is not None or cp_context is not None:
        raise NotImplementedError(
            "peers: fla's naive_chunk_gated_delta_rule (used for gated_deltanet on Hopper with Triton < 3.7.1) does "
            "not support variable-length input (cu_seqlens, chunk_indices, attention_mask) or context parallelism")
    unknown = set(kwargs) - _GDN_KWARGS
    if unknown:
        raise TypeError(f"chunk_gated_delta_rule_naive: unsupported arguments {sorted(unknown)}")
    if kwargs.get('transpose_state_layout'):  # fla's deprecated name for state_v_first
        state_v_first = True
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same number of heads, got {q.shape[2]} and {k.shape[2]}")
    H, HV = k.shape[2], v.shape[2]
    if HV % H:
        raise ValueError(f"num_v_heads (HV={HV}) must be divisible by num_heads (H={H})")
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    use_gate = kwargs.get('use_gate_in_kernel', False)
    if use_gate and kwargs.get('A_log') is None:
        raise ValueError("A_log must be provided when use_gate_in_kernel=True.")
    out_dtype = q.dtype
    if scale is None:
        scale = k.shape[-1] ** -0.5
    with torch.autocast(q.device.type, enabled=False):  # the naive code's matmuls stay fp32 under autocast
        q, k, v, beta = q.float(), k.float(), v.float(), beta.float()
        if use_qk_l2norm_in_kernel:
            q, k = _l2norm(q), _l2norm(k)
        if HV > H:  # value head i uses query/key head i // (HV / H), as fla's kernels index them
            q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
        if use_beta_sigmoid_in_kernel:
            beta = torch.sigmoid(beta) * (2.0 if allow_neg_eigval else 1.0)
        if use_gate:
            g = _fla_fn('naive_gdn_gate')(g, kwargs['A_log'], kwargs.get('dt_bias'))  # log decay per step, fp32
        h0 = initial_state
        if h0 is not None:
            h0 = (h0.transpose(-1, -2) if state_v_first else h0).float()
        o, ht = _fla_fn('naive_chunk_gated_delta_rule')(q, k, v, g.float(), beta,
                                                        chunk_size=kwargs.get('chunk_size', 64), scale=scale,
                                                        initial_state=h0, output_final_state=output_final_state)
    if ht is not None and state_v_first:
        ht = ht.transpose(-1, -2)
    return o.to(out_dtype).contiguous(), (ht.contiguous() if ht is not None else None)


_GDN_LAYER_MODULE = 'fla.layers.gated_deltanet'


def _gdn_dispatch(original):
    """chunk_gated_delta_rule as fla's GatedDeltaNet layer calls it: chunk_gated_delta_rule_naive where
    hopper_triton_bug() and autograd will differentiate the call, fla's own (original) everywhere else."""

    @torch.compiler.disable
    @functools.wraps(original)
    def chunk_gated_delta_rule(*args, **kwargs):
        if hopper_triton_bug() and _needs_backward(*args, *kwargs.values()):
            return chunk_gated_delta_rule_naive(*args, **kwargs)
        return original(*args, **kwargs)

    chunk_gated_delta_rule.peers_original = original
    return chunk_gated_delta_rule


def _install_gdn_substitute():
    """Route fla's GatedDeltaNet layer through _gdn_dispatch, by replacing the name chunk_gated_delta_rule in the
    layer's module (once; the dispatch passes every call through unchanged unless hopper_triton_bug())."""
    mod = importlib.import_module(_GDN_LAYER_MODULE)
    if not hasattr(mod.chunk_gated_delta_rule, 'peers_original'):
        mod.chunk_gated_delta_rule = _gdn_dispatch(mod.chunk_gated_delta_rule)


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
    """fla's Mamba2. Without mamba_ssm (fla's fast path) the SSD runs through fla's chunk_simple_gla kernel
    (parallel_simple_gla for training where hopper_triton_bug())."""

    def __init__(self, name, layer):
        super().__init__(name, layer)
        if _mamba_fast_path():
            self.impl = 'fla+mamba_ssm'
        elif hopper_triton_bug():
            self.impl = f'fla parallel_simple_gla ({_substitute_note()}; no-grad: chunk_simple_gla)'
        else:
            self.impl = 'fla chunk_simple_gla'

    def forward(self, x, want_state=False):
        if want_state:
            return super().forward(x, want_state)
        if _mamba_fast_path() or not x.is_cuda:  # on CPU fla runs its own PyTorch reference
            return self.layer(x)[0], None, None
        return mamba2_ssd(self.layer, x), None, None


SSD_KERNELS = ('chunk_simple_gla', 'parallel_simple_gla', 'fused_recurrent_simple_gla')


def mamba2_ssd(m, x, kernel=None):
    """fla Mamba2 layer m applied to x (B, T, D), with the SSD recurrence computed by an fla simple-GLA kernel
    (one of SSD_KERNELS; all take q, k, v [B, T, H, *] and g [B, T, H], the natural-log decay per step, and
    cumulate g themselves). kernel=None: chunk_simple_gla, or parallel_simple_gla where hopper_triton_bug() and
    autograd will differentiate the call (chunk_simple_gla's backward cannot run there)."""
    if kernel is not None and kernel not in SSD_KERNELS:
        raise ValueError(f"mamba2_ssd: kernel must be one of {SSD_KERNELS}, got {kernel!r}")
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
    if kernel is None:
        substitute = hopper_triton_bug() and _needs_backward(q, k, v, g)
        kernel = 'parallel_simple_gla' if substitute else 'chunk_simple_gla'
    o, _ = _fla_fn(kernel)(q.contiguous(), k.contiguous(), v.contiguous(), g=g, scale=1.0)
    y = o.to(xh.dtype) + xh * m._get_D(expand_to_head_dim=True).to(xh.dtype)  # the D skip, (H, P)
    y = m.norm(y.reshape(B_, T, I), z)                                         # gated RMSNorm
    return m.out_proj(y)


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
    if name == 'gated_deltanet' and hopper_triton_bug():
        _install_gdn_substitute()
        mixer.impl = f'fla naive_chunk_gated_delta_rule ({_substitute_note()}; no-grad: chunk_gated_delta_rule)'
    init_weights(mixer, n_layer, residual=('o_proj.weight', 'out_proj.weight'))  # as mipt initialises its layers
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
