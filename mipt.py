"""
mipt.py: MIPT-SSM in one file.

MIPT-SSM (Y. Fan, arXiv 2604.07716) is a sequence model whose state is a complex "wave" h_t in C^D. Each token
measures the state at a learned rate p_t in (0, 1), per channel:

    h_t = (1 - p_t) * exp(i theta_t) * h_{t-1}  +  p_t * u_t          y_t = Re h_t

As p -> 0 (the wave phase) the state only rotates, keeping its norm: old tokens interfere instead of being
forgotten. As p -> 1 (the particle phase) it collapses onto the current token u_t. A per-token gate escapes the
paper's no-go theorem (one fixed operator cannot both keep every norm and erase a chosen state). The recurrence is
a linear scan h_t = a_t h_{t-1} + b_t: parallel over time in training, one token at a time in decoding.

Tokens measured hard are "facts": a causal sparse cache keeps the K tokens with the highest score s_t = mean_d p_t,
read with attention and fused into y through a sigmoid gate, so decoding needs O(D) state plus an O(K D) cache
per layer, where a Transformer needs O(T D). Selection has no gradient, so training gives the scores a signal of
their own (cache_signal): R earlier positions attended beside the cache, drawn uniformly or by s ('explore',
'weighted'); soft selection over every earlier position ('dense', with p_penalty as a capacity cost); 'mixed',
a coin per layer and training step between 'dense' and 'explore'; or 'distill', 'explore' plus a pull of every
score toward the attention mass that dense content attention gives its token. Every position is scored with the
same log s_j bias. Eval and decoding always read the exact cache.

Glossary (code name: paper symbol, shape)
    logit   W_p x_t + bias          pre-sigmoid measurement, (B, T, D); bias starts at logit(p_init): wave phase
    p       p_t = sigmoid(logit)    measurement rate, (B, T, D)
    theta   theta_t = W_theta x_t   phase angle, (B, T, D); its weights start 10x smaller than the rest
    u       u_t = W_r x_t + i W_i x_t   the token written into the state, complex (B, T, D)
    a, b    a_t = (1-p_t) e^{i theta_t}, b_t = p_t u_t   the scan's gate and input, complex (B, T, D)
    h, y    h_t, y_t = Re h_t       the complex state (h_0 = 0) and the layer's output, (B, T, D)
    s       s_t = mean_d p_t        a token's measurement score, (B, T)
    tau     cache_tau               a token is eligible for the cache when s_t > tau
    K       cache_size              cache slots per layer (0: no cache, -1: unbounded, None inside)
    L       cache_chunk             query chunk of the cache's training path
    end     cache_intervals         token j is in the cache of queries j <= i < end_j, (B, T)
    R       cache_explore           training: earlier positions each query also attends to (0 off, -1 all)
    signal  cache_signal            training: how s learns what to keep, 'explore' | 'weighted' | 'dense' | 'mixed'
                                    | 'distill'
    state   DecodeState             per layer a MIPTState (h (B, D), s (B,), CacheSlots k, v (B, H, K, hd),
                                    score, pos (B, K)) or the twin's KVCache; pos; pooled (B, D) for 'mean'

The file needs torch alone. Beside it, kernels.py holds the fast paths (fused CUDA scan, fused cache read-out,
compiled cache plan), each one call from here that falls back to the code here; engine.py fast decoding.
"""

import math
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# Config: every default of the model, once

@dataclass
class MIPTConfig:
    vocab_size: int = 65
    block_size: int = 256        # longest training sequence (MIPT itself has no length limit)
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4              # heads of the cache read-out (MIPT) or of self-attention (twin)
    dropout: float = 0.0
    bias: bool = True
    mlp: bool = True             # each block's FFN (False: the mixer alone, as Zoology's MQAR attention)
    mixer: str = 'mipt'          # 'mipt' | 'attention' (the Transformer twin)
    attn_impl: str = 'sdpa'      # 'sdpa' (fused) | 'naive' (materialises T x T, for the memory figure)
    cache_size: int = 16         # K: 0 = no cache, -1 = unbounded
    cache_tau: float = 0.0       # tau: eligible when s_t > tau
    cache_chunk: int = 128       # L: query chunk of the exact causal cache in training
    cache_explore: int = 64      # R: exploration candidates per query in training (0 off, -1 all)
    cache_signal: str = 'explore'  # training: how s learns what to keep (see the glossary)
    p_init: float = 0.1          # initial measurement rate
    p_penalty: float = 0.0       # optional sparsity penalty on s, added to the loss
    n_classes: int = 0           # 0 = language model, > 0 = classifier
    readout: str = 'last'        # classifier read-out: 'last' | 'mean'
    scan_impl: str = 'auto'      # 'auto' (CUDA kernel when available) | 'torch' | 'cuda'
    cache_impl: str = 'auto'     # the cache's training read-out: 'auto' (Triton kernel on a GPU) | 'torch' | 'triton'
    recompute: bool = False      # training: keep only each MIPT layer's input, run its forward again in backward
    # how the model computes, not what: the same weights give the same function under any of these
    HOW: ClassVar[tuple] = ('scan_impl', 'cache_impl', 'recompute')

    def __post_init__(self):
        for f in fields(self):  # types first: MIPTConfig(n_layer='2') or n_embd=32.5 fail here, by name
            v = getattr(self, f.name)
            if f.type is float and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, f.name, v := float(v))
            _need(isinstance(v, f.type) and (f.type is bool or not isinstance(v, bool)),
                  f"{f.name} must be {f.type.__name__}, got {v!r} ({type(v).__name__})")
        for name, allowed in [('mixer', ('mipt', 'attention')), ('attn_impl', ('sdpa', 'naive')),
                              ('scan_impl', ('auto', 'torch', 'cuda')), ('cache_impl', ('auto', 'torch', 'triton')),
                              ('readout', ('last', 'mean')),
                              ('cache_signal', ('explore', 'weighted', 'dense', 'mixed', 'distill'))]:
            v = getattr(self, name)
            _need(v in allowed, f"{name} must be {', '.join(map(repr, allowed[:-1]))} or {allowed[-1]!r}, got {v!r}")
        for name in ('vocab_size', 'block_size', 'n_layer', 'n_embd', 'n_head', 'cache_chunk'):
            _need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _need(self.n_embd % self.n_head == 0,
              f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); change one of them")
        _need(self.cache_size >= -1, f"cache_size must be -1 (unbounded), 0 (no cache) or K > 0, got {self.cache_size}")
        _need(self.cache_explore >= -1, f"cache_explore must be -1 (all), 0 (off) or R > 0, got {self.cache_explore}")
        _need(0.0 <= self.cache_tau < 1.0, f"cache_tau must lie in [0, 1) since s_t is a mean of sigmoids, got {self.cache_tau}")
        _need(0.0 < self.p_init < 1.0, f"p_init must lie in (0, 1), got {self.p_init}")
        _need(0.0 <= self.dropout < 1.0, f"dropout must lie in [0, 1), got {self.dropout}")
        _need(self.n_classes >= 0, f"n_classes must be 0 (language model) or > 0, got {self.n_classes}")
        _need(self.p_penalty >= 0.0, f"p_penalty must be >= 0, got {self.p_penalty}")
        if self.mixer == 'attention':
            _need(self.cache_size in (0, MIPTConfig.cache_size),
                  "the attention mixer has no sparse cache: set cache_size=0 (or leave it at its default)")
            _need(self.p_penalty == 0.0, "p_penalty only applies to mixer='mipt'")

    @property
    def K(self):  # cache slots, None when unbounded (-1)
        return None if self.cache_size == -1 else self.cache_size

    @property
    def R(self):  # exploration candidates per query, None for every earlier position (-1)
        return None if self.cache_explore == -1 else self.cache_explore


def _need(ok, msg):  # every bad input: one line
    if not ok:
        raise ValueError(msg)


def acc_dtype(dtype):
    """THE dtype policy: weights and activations may run in bf16 or fp16 (autocast); what accumulates over tokens or
    sums to one (the state h, softmaxes, the loss, sampling) runs in float32 at least (float64 in a float64 model)."""
    return torch.promote_types(dtype, torch.float32)


def complex_dtype(dtype):
    """The state's complex dtype, by the policy above (PyTorch has no complex bf16)."""
    return torch.complex128 if acc_dtype(dtype) == torch.float64 else torch.complex64


# -----------------------------------------------------------------------------
# Scans: h_t = a_t * h_{t-1} + b_t over complex (B, T, D) tensors

def scan_ref(a, b, h0=None):
    """The reference, a loop over time. a, b complex (B, T, D); h0 (B, D) or None."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0.to(b.dtype)
    hs = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    return torch.stack(hs, dim=1)


def scan(a, b, h0=None):
    """The same in parallel over time, exact and differentiable: time is cut into C chunks of L ~ sqrt(T) steps,
    so that L + C sequential steps over (B, C, D) tensors replace T over (B, D), in O(B T D) memory. No division
    by gate products, which lose precision when |a| is near 1."""
    B, T, D = b.shape
    L = max(1, math.isqrt(T))
    C = -(-T // L)
    pad = C * L - T
    if pad:  # identity steps at the end change nothing before them
        a = torch.cat([a, a.new_ones(B, pad, D)], dim=1)
        b = torch.cat([b, b.new_zeros(B, pad, D)], dim=1)
    a, b = a.view(B, C, L, D), b.view(B, C, L, D)
    # (1) each chunk scans from a zero state, all chunks at once, and keeps its running gate products
    h, A = b.new_zeros(B, C, D), a.new_ones(B, C, D)
    hs, As = [], []
    for l in range(L):
        h = a[:, :, l] * h + b[:, :, l]
        A = A * a[:, :, l]
        hs.append(h)
        As.append(A)
    h_loc = torch.stack(hs, dim=2)  # (B, C, L, D)
    A_loc = torch.stack(As, dim=2)  # (B, C, L, D)
    # (2) a loop over chunks: the state entering each chunk
    carry = b.new_zeros(B, D) if h0 is None else h0.to(b.dtype)
    starts = []
    for c in range(C):
        starts.append(carry)
        carry = A_loc[:, c, -1] * carry + h_loc[:, c, -1]
    start = torch.stack(starts, dim=1)  # (B, C, D)
    # (3) each step adds its chunk's incoming state times its running gate product
    h = h_loc + A_loc * start[:, :, None]
    return h.reshape(B, C * L, D)[:, :T]


# -----------------------------------------------------------------------------
# The fast paths: kernels().<name>(*args, impl=<the config's setting>, reference=<this file's PyTorch function>)
# runs kernels.py's fused kernel where impl and the tensors allow, else the reference (always, without kernels.py)

_KERNELS = None


def kernels():
    global _KERNELS
    if _KERNELS is None:
        try:
            import kernels as _KERNELS
        except ModuleNotFoundError as e:
            if e.name != 'kernels':
                raise
            _KERNELS = _ReferenceOnly()
    return _KERNELS


class _ReferenceOnly:  # kernels() without kernels.py
    def __getattr__(self, name):
        def reference_only(*args, impl, reference):
            if impl not in ('auto', 'torch'):
                raise RuntimeError(f"{name} with impl={impl!r} needs kernels.py beside mipt.py; use 'auto' or 'torch'")
            return reference(*args)
        return reference_only


# -----------------------------------------------------------------------------
# The MIPT recurrence

def mipt_recurrence(logit, theta, u_re, u_im, h0=None, impl='auto'):
    """The recurrence from the layer's projections (B, T, D) and h0 (B, D) complex or None. Returns y = Re h
    (B, T, D) and h_T (B, D) in acc_dtype. On a GPU, one fused CUDA kernel computes p, a and b in registers."""
    if logit.shape[1] == 1 and impl != 'cuda':  # one step (decoding) needs no scan
        return recurrence_step(logit[:, 0], theta[:, 0], u_re[:, 0], u_im[:, 0], h0)
    return kernels().recurrence(logit, theta, u_re, u_im, h0, impl=impl, reference=recurrence_torch)


def recurrence_torch(logit, theta, u_re, u_im, h0=None):
    """The reference: the gates and inputs as complex tensors, then the scan."""
    dtype = acc_dtype(logit.dtype)
    p = torch.sigmoid(logit.to(dtype))
    a = torch.polar(1 - p, theta.to(dtype))             # (B, T, D) complex
    b = p * torch.complex(u_re.to(dtype), u_im.to(dtype))  # (B, T, D) complex
    h = scan(a, b, h0)
    return h.real, h[:, -1]


def recurrence_step(logit, theta, u_re, u_im, h0=None):
    """One step in real arithmetic, which torch.compile fuses into the decoding step. Inputs (B, D); returns
    y (B, 1, D) and h (B, D)."""
    dtype = acc_dtype(logit.dtype)
    p = torch.sigmoid(logit.to(dtype))
    r = 1 - p                                                                   # |a|
    a_re, a_im = r * torch.cos(theta.to(dtype)), r * torch.sin(theta.to(dtype))
    b_re, b_im = p * u_re.to(dtype), p * u_im.to(dtype)
    if h0 is None:
        h_re, h_im = b_re, b_im
    else:
        h0 = torch.view_as_real(h0.to(complex_dtype(dtype)).resolve_conj())     # (B, D, 2)
        h_re = a_re * h0[..., 0] - a_im * h0[..., 1] + b_re
        h_im = a_re * h0[..., 1] + a_im * h0[..., 0] + b_im
    return h_re[:, None], torch.view_as_complex(torch.stack([h_re, h_im], -1))


# -----------------------------------------------------------------------------
# The decoding state: one small object per mixer, and the model's DecodeState around them (after nanochat's
# KVCache)

class State:
    """Dataclasses whose fields are tensors, other States, lists of them, or plain values."""

    def tensors(self):  # every tensor, which byte counts use
        for f in fields(self):
            v = getattr(self, f.name)
            for x in (v if isinstance(v, list) else [v]):
                if torch.is_tensor(x):
                    yield x
                elif isinstance(x, State):
                    yield from x.tensors()


@dataclass
class CacheSlots(State):
    """The sparse cache's K slots. Empty slots have pos -1 and score -inf."""
    k: torch.Tensor          # (B, H, K, hd)
    v: torch.Tensor          # (B, H, K, hd)
    score: torch.Tensor      # (B, K) s_j of the cached token
    pos: torch.Tensor        # (B, K) its position

    def grow(self):  # one more empty slot (the unbounded cache)
        return CacheSlots(k=F.pad(self.k, (0, 0, 0, 1)), v=F.pad(self.v, (0, 0, 0, 1)),
                          score=F.pad(self.score, (0, 1), value=-math.inf), pos=F.pad(self.pos, (0, 1), value=-1))

    def compact(self):  # drop the slots empty in every row: the unbounded cache holds what it stored
        n = int((self.pos >= 0).sum(1).max()) if self.pos.numel() else 0
        return CacheSlots(k=self.k[:, :, :n], v=self.v[:, :, :n], score=self.score[:, :n], pos=self.pos[:, :n])


@dataclass
class MIPTState(State):
    h: torch.Tensor                      # (B, D) complex
    s: torch.Tensor                      # (B,) score s_t of the token just consumed
    cache: CacheSlots = None             # None without a cache (K = 0)


@dataclass
class DecodeState(State):
    layers: list = field(default_factory=list)  # one state per layer
    pos: object = 0                      # tokens consumed: an int, or a device tensor under a CUDA graph
    pooled: torch.Tensor = None          # (B, D) readout='mean': the running sum of the final hidden states

    @property
    def batch_size(self):
        return next(self.tensors()).shape[0]


# -----------------------------------------------------------------------------
# The causal sparse cache
#
# THE RULE, defined once by rank() and used in training (select_cache), decoding (SparseCache.step) and
# prefill's state: a token outranks another when its score s is higher, or equal and earlier. The cache at
# position i holds the K best-ranked eligible tokens (s_j > tau) among j <= i; in decoding a newcomer enters a full
# cache only when its score is strictly above the weakest slot's, which it evicts. sigmoid saturates to exactly
# 1.0 in float32, so ties are common: torch.topk alone would not do.

def rank(score, pos):
    """Order of candidates, best first, by THE RULE. score, pos (..., N) -> indices (..., N)."""
    by_pos = pos.argsort(dim=-1, stable=True)
    by_score = score.gather(-1, by_pos).argsort(dim=-1, descending=True, stable=True)
    return by_pos.gather(-1, by_score)


@torch.no_grad()
def select_cache(s, K, tau, L):
    """Exact causal cache membership for every position, without a loop over time. s (B, T); K None: unbounded.
    Queries are cut into C chunks of L; a chunk's candidates are the cache carried in from earlier chunks plus its
    own L positions (the top-K of a union is the top-K of the parts' top-Ks): O(T (K + L)) memory, quadratic when
    unbounded. Returns cand (B, C, K + L) candidate positions (-1 = none) and member (B, C, L, K + L), True where
    candidate j is in the cache of the chunk's query l."""
    B, T = s.shape
    C = -(-T // L)
    Kc = T if K is None else K                                                          # carried slots
    dev = s.device
    # one unique integer key per token from THE RULE, higher is better; -1: ineligible
    order = rank(s, torch.arange(T, device=dev).expand(B, T))                          # (B, T)
    place = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=dev).expand(B, T))
    key = torch.where(s > tau, T - place, -1)                                          # (B, T)
    key = F.pad(key, (0, C * L - T), value=-1).view(B, C, L)
    # the cache carried into each chunk: a prefix scan of top-K over chunks (Hillis-Steele, log2 C rounds)
    top = F.pad(key, (0, max(0, Kc - L)), value=-1).topk(Kc, dim=2).values            # (B, C, Kc)
    shift = 1
    while shift < C:
        merged = torch.cat([top[:, shift:], top[:, :-shift]], dim=2).topk(Kc, dim=2).values
        top = torch.cat([top[:, :shift], merged], dim=1)
        shift *= 2
    carry = torch.cat([top.new_full((B, 1, Kc), -1), top[:, :-1]], dim=1)             # (B, C, Kc)
    carry_pos = torch.where(carry >= 0, order.gather(1, (T - carry).clamp(max=T - 1).view(B, -1)).view(B, C, Kc), -1)
    qpos = torch.arange(C * L, device=dev).view(1, C, L)
    cand = torch.cat([carry_pos, qpos.expand(B, C, L)], dim=2)                        # (B, C, Kc+L)
    cand_key = torch.cat([carry, key], dim=2)                                         # (B, C, Kc+L)
    visible = (cand_key >= 0)[:, :, None, :] & (cand[:, :, None, :] <= qpos[..., None])  # (B, C, L, Kc+L)
    if K is None:  # unbounded: nothing is ever evicted
        return cand, visible
    # candidate j is a member for query l when fewer than K visible candidates outrank it
    beats = (cand_key[:, :, :, None] > cand_key[:, :, None, :]).float()               # (B, C, Kc+L, Kc+L)
    with torch.autocast(device_type=dev.type, enabled=False):                          # exact counts
        n_above = visible.float() @ beats                                              # (B, C, L, Kc+L)
    return cand, visible & (n_above < K)


@torch.no_grad()
def cache_intervals(cand, member, T):
    """Membership as one interval per token: j is in the cache of the queries j <= i < end_j (B, T). By THE RULE a
    token enters (if ever) at its own position and, once outranked by K later ones, never returns. cand (B, C, N)
    stays each chunk's list, the padding beyond T set to -1."""
    B, C, L, N = member.shape
    qpos1 = torch.arange(1, C * L + 1, device=cand.device, dtype=torch.int32).view(1, C, L, 1)
    last = torch.where(member, qpos1, 0).amax(2)                                      # (B, C, N) int32
    cand = torch.where(cand < T, cand, -1)
    end = torch.zeros(B, T + 1, dtype=last.dtype, device=cand.device)
    end.scatter_reduce_(1, torch.where(cand >= 0, cand, T).view(B, -1), last.view(B, -1), 'amax')
    return cand, end[:, :T]                                                           # (B, C, N), (B, T)


@torch.no_grad()
def add_exploration(noise, R, L, cand, end):
    """Training only: each query also attends to R random positions j <= i (None: all), a second "cache" that
    select_cache builds over random keys noise (B, T), causal by construction: the top-R of uniform keys is a
    uniform R-subset, of log s_j + Gumbel keys a draw by s without replacement. Both are intervals from j, so
    their union is one (the later end); a token in both carried lists is listed once."""
    xcand, xend = cache_intervals(*select_cache(noise, R, -math.inf, L), noise.shape[1])
    Kc, Rc = cand.shape[2] - L, xcand.shape[2] - L
    carry, xcarry = cand[..., :Kc], xcand[..., :Rc]                                  # (B, C, Kc), (B, C, Rc)
    twice = (xcarry[..., :, None] == carry[..., None, :]).any(-1)                    # (B, C, Rc)
    cand = torch.cat([carry, torch.where(twice, -1, xcarry), cand[..., Kc:]], dim=2)  # (B, C, Kc+Rc+L)
    return cand, torch.maximum(end, xend)


@torch.no_grad()
def cache_plan(s, K, tau, L, R, noise):
    """Who attends to whom: (cand (B, C, N), end (B, T)) of the exact cache, widened by exploration when noise
    (B, T) holds random keys (None: exact only, as in eval)."""
    cand, end = cache_intervals(*select_cache(s, K, tau, L), s.shape[1])
    return (cand, end) if noise is None else add_exploration(noise, R, L, cand, end)


def cache_attention_torch(q, k, v, log_s, end, cand, null_k, null_v, L):
    """The cache's training read-out, the reference. q, k, v (B, T, H, hd); log_s, end (B, T); cand (B, C, N);
    null_k, null_v (H, hd). Query i attends to the null slot and to its chunk's candidates j with j <= i < end_j,
    log s_j added to the logit. Returns (B, T, H, hd)."""
    B, T, H, hd = q.shape
    C, N = cand.shape[1], cand.shape[2]
    q = F.pad(q, (0, 0, 0, 0, 0, C * L - T)).view(B * C, L, H, hd).transpose(1, 2)    # (B*C, H, L, hd)
    rows, at = torch.arange(B, device=q.device)[:, None, None], cand.clamp(min=0)    # (B, C, N) positions
    qpos = torch.arange(C * L, device=q.device).view(1, C, L, 1)
    visible = (cand >= 0)[:, :, None] & (cand[:, :, None] <= qpos) & (qpos < end[rows, at][:, :, None])  # (B, C, L, N)
    score_bias = torch.where(visible, log_s[rows, at][:, :, None], -math.inf)
    score_bias = F.pad(score_bias, (0, 1), value=0.0).view(B * C, 1, L, N + 1)     # + the null slot
    cand_k = torch.cat([k[rows, at].view(B * C, N, H, hd), null_k.expand(B * C, 1, H, hd).to(k.dtype)], 1)
    cand_v = torch.cat([v[rows, at].view(B * C, N, H, hd), null_v.expand(B * C, 1, H, hd).to(v.dtype)], 1)
    att = F.scaled_dot_product_attention(q, cand_k.transpose(1, 2), cand_v.transpose(1, 2),
                                         attn_mask=score_bias.to(q.dtype))            # (B*C, H, L, hd)
    return att.transpose(1, 2).reshape(B, C * L, H, hd)[:, :T]


def cache_attention_dense(q, k, v, log_s, null_k, null_v):
    """Soft selection ('dense'): cache_attention_torch with every j <= i visible, so every score gets a gradient.
    One causal attention call (no (T, T) tensor on a GPU), log s_j carried in an extra key channel: q' = [q,
    sqrt(hd)], k' = [k, log s], padded to 8 channels; the null slot is a key before position 0 (a dummy query in
    front keeps the mask square). q, k, v (B, T, H, hd); log_s (B, T). Returns (B, T, H, hd)."""
    B, T, H, hd = q.shape
    e = 8
    q_extra = F.pad(q.new_full((B, T, H, 1), math.sqrt(hd)), (0, e - 1))
    k_extra = F.pad(log_s[:, :, None, None].expand(B, T, H, 1).to(k.dtype), (0, e - 1))
    q2 = F.pad(torch.cat([q, q_extra], -1), (0, 0, 0, 0, 1, 0))                       # (B, 1+T, H, hd+e)
    k2 = torch.cat([F.pad(null_k.to(k.dtype), (0, e)).expand(B, 1, H, hd + e), torch.cat([k, k_extra], -1)], 1)
    v2 = F.pad(torch.cat([null_v.to(v.dtype).expand(B, 1, H, hd), v], 1), (0, e))   # (B, 1+T, H, hd+e)
    att = F.scaled_dot_product_attention(q2.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2),
                                         is_causal=True, scale=1 / math.sqrt(hd))   # (B, H, 1+T, hd+e)
    return att.transpose(1, 2)[:, 1:, :, :hd]


class ScoreDistill(torch.autograd.Function):
    """'distill': the read-out passes unchanged; in backward every score is also pulled toward the attention mass that
    dense content attention (softmax_j q_i.k_j over every j <= i, no log s) gives its token, each query weighted by
    how much its output matters to the loss, w_i = |dL/d att_i|: the gradient of sum_{h,i} w_hi KL(a_hi || s_j / S_i)
    per row and head, S_i = sum_{j<=i} s_j. The masses come from one causal attention backward (no (T, T) tensor).
    att, q, k (B, T, H, hd) with q, k detached; log_s (B, T)."""

    @staticmethod
    def forward(ctx, att, log_s, q, k):
        ctx.save_for_backward(log_s, q, k)
        return att.view_as(att)

    @staticmethod
    def backward(ctx, g):
        log_s, q, k = ctx.saved_tensors
        B, T, H, hd = q.shape
        acc = acc_dtype(g.dtype)
        w = g.to(acc).norm(dim=-1)                                                     # (B, T, H)
        w = w / w.sum(1, keepdim=True).clamp(min=1e-30)                                # over queries, per row and head
        with torch.enable_grad():
            v = torch.zeros_like(q).transpose(1, 2).requires_grad_()                    # (B, H, T, hd)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v, is_causal=True)
            mass, = torch.autograd.grad(out[..., 0], v, grad_outputs=w.transpose(1, 2).to(out.dtype))
        M = mass[..., 0].to(acc).sum(1)                        # (B, T) sum_{h, i >= j} w_hi a_hij: the teacher
        s = log_s.to(acc).exp()
        G = (w.sum(2) / s.cumsum(1)).flip(1).cumsum(1).flip(1)  # (B, T) sum_{h, i >= j} w_hi / S_i
        return g, ((s * G - M) / (B * H)).to(log_s.dtype), None, None


class SparseCache(nn.Module):
    """Reads the cache with multi-head attention and fuses it into y: out = y + g * attend(q, cache). Keys and
    values come from y_j, log s_j is added to the logits; a learned null slot makes an empty cache well defined."""

    def __init__(self, config):
        super().__init__()
        D, H = config.n_embd, config.n_head
        self.n_head, self.K, self.R, self.tau, self.L = H, config.K, config.R, config.cache_tau, config.cache_chunk
        self.impl, self.signal = config.cache_impl, config.cache_signal
        self.qkv = nn.Linear(D, 3 * D, bias=config.bias)
        self.gate = nn.Linear(D, D, bias=config.bias)
        self.proj = nn.Linear(D, D, bias=config.bias)
        self.null_k = nn.Parameter(torch.randn(H, D // H) * 0.02)
        self.null_v = nn.Parameter(torch.zeros(H, D // H))

    def plan(self, s):
        """(cand, end): the exact cache, widened in training by R positions drawn uniformly or by s ('weighted')."""
        noise = None
        if self.training and self.R != 0:
            noise = torch.rand_like(s, dtype=torch.float32)                                 # (B, T)
            if self.signal == 'weighted':  # Gumbel-top-R over log s: R draws without replacement, by s
                noise = torch.log(s.float().clamp(min=1e-30)) - torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-7)))
        return kernels().cache_plan(s, self.K, self.tau, self.L, self.R, noise, impl=self.impl, reference=cache_plan)

    def soft(self):
        """Whether this training step reads every j <= i ('dense', or 'mixed' on heads of its coin)."""
        return self.training and (self.signal == 'dense' or self.signal == 'mixed' and bool(torch.rand(()) < 0.5))

    def forward(self, y, s, want_state=False):
        # y (B, T, D) the scan output, s (B, T) scores
        B, T, D = y.shape
        H, hd, L = self.n_head, D // self.n_head, self.L
        q, k, v = self.qkv(y).view(B, T, 3, H, hd).unbind(2)              # (B, T, H, hd) each
        log_s = torch.log(s.clamp(min=1e-30))                              # (B, T)
        if self.soft():  # every j <= i, eligible or not: tau then acts at eval and in decoding alone
            att = cache_attention_dense(q, k, v, log_s, self.null_k, self.null_v).reshape(B, T, D)
        else:
            cand, end = self.plan(s.detach())
            att = kernels().cache_readout(q, k, v, log_s, end, cand, self.null_k, self.null_v, L, impl=self.impl,
                                          reference=cache_attention_torch)                       # (B, T, H, hd)
            if self.training and self.signal == 'distill':
                att = ScoreDistill.apply(att, log_s, q.detach().contiguous(), k.detach().contiguous())
            att = att.reshape(B, T, D)
        out = y + torch.sigmoid(self.gate(y)) * self.proj(att)
        if not want_state:
            return out, None
        # the state after the last position: its row's exact cache, best first by THE RULE
        if self.training:  # the selection signal may have widened the plan
            cand, end = cache_plan(s.detach(), self.K, self.tau, L, self.R, None)
        N = cand.shape[2]
        last = cand[:, (T - 1) // L]                                               # (B, N) the last chunk's list
        pos = torch.where((last >= 0) & (end.gather(1, last.clamp(min=0)) > T - 1), last, -1)   # (B, N)
        score = torch.where(pos >= 0, s.detach().gather(1, pos.clamp(min=0)), -math.inf)
        best = rank(score, torch.where(pos >= 0, pos, T))
        n = N if self.K is None else self.K
        pos, score = pos.gather(1, best)[:, :n], score.gather(1, best)[:, :n]        # (B, n)
        at = torch.arange(B, device=y.device)[:, None], pos.clamp(min=0)
        slots = CacheSlots(k=k[at].view(B, n, H, hd).transpose(1, 2), v=v[at].view(B, n, H, hd).transpose(1, 2),
                           score=score, pos=pos)
        return out, slots.compact() if self.K is None else slots

    def empty_state(self, B, device, dtype):
        K, H, hd = self.K or 0, self.n_head, self.qkv.in_features // self.n_head
        kv = torch.zeros(B, H, K, hd, device=device, dtype=dtype)
        return CacheSlots(k=kv, v=kv.clone(), score=torch.full((B, K), -math.inf, device=device, dtype=dtype),
                          pos=torch.full((B, K), -1, dtype=torch.long, device=device))

    def step(self, y, s, t, slots):
        # one position: y (B, D), s (B,), t the position -> the output (B, D), the new slots
        B, D = y.shape
        H, hd = self.n_head, D // self.n_head
        q, k, v = self.qkv(y).view(B, 3, H, hd).unbind(1)   # (B, H, hd) each
        eligible = s > self.tau
        if self.K is None and bool(eligible.any()):        # unbounded: open a slot, never evict
            slots = slots.grow()
        if slots.pos.shape[1] > 0:
            weakest = rank(slots.score, slots.pos)[:, -1]                                       # (B,) THE RULE
            take = eligible & (s.to(slots.score.dtype) > slots.score.gather(1, weakest[:, None])[:, 0])
            put = (torch.arange(slots.pos.shape[1], device=y.device) == weakest[:, None]) & take[:, None]  # (B, K)
            slots = CacheSlots(k=torch.where(put[:, None, :, None], k[:, :, None], slots.k),
                               v=torch.where(put[:, None, :, None], v[:, :, None], slots.v),
                               score=torch.where(put, s[:, None].to(slots.score.dtype), slots.score),
                               pos=torch.where(put, t, slots.pos))
        # attend over the filled slots plus the null slot
        valid = slots.pos >= 0                                                        # (B, K)
        logits = torch.einsum('bhd,bhkd->bhk', q, slots.k) / math.sqrt(hd)
        logits = logits + torch.where(valid, torch.log(slots.score.clamp(min=1e-30)), -math.inf)[:, None]
        null = (q * self.null_k.to(q.dtype)).sum(-1, keepdim=True) / math.sqrt(hd)  # (B, H, 1)
        w = torch.softmax(torch.cat([logits, null], -1), -1)                       # (B, H, K+1)
        att = torch.einsum('bhk,bhkd->bhd', w[..., :-1], slots.v) + w[..., -1:] * self.null_v.to(v.dtype)
        return y + torch.sigmoid(self.gate(y)) * self.proj(att.reshape(B, D)), slots


# -----------------------------------------------------------------------------
# The layer and the block
#
# A mixer (MIPTLayer, the twin's SelfAttention, the peers in peers.py) has forward(x (B, T, D), want_state) ->
# (out (B, T, D), s (B, T) or None, state or None), init_state(B, device, dtype) and step(x (B, D), state, pos) ->
# (out (B, D), new state)

class MIPTLayer(nn.Module):
    """x -> (logit, theta, u) -> the recurrence -> y = Re h -> the sparse cache (when K != 0)."""

    def __init__(self, config):
        super().__init__()
        D = config.n_embd
        self.n_embd, self.scan_impl, self.recompute = D, config.scan_impl, config.recompute
        self.proj = nn.Linear(D, 4 * D, bias=True)  # rows: [W_p | W_theta | W_r | W_i]
        self.cache = SparseCache(config) if config.cache_size != 0 else None

    def recur(self, x, h0=None):
        # x (B, T, D) normalised -> y = Re h (B, T, D), h_T (B, D), s (B, T)
        logit, theta, u_re, u_im = self.proj(x).chunk(4, dim=-1)              # (B, T, D) each
        y, h_last = mipt_recurrence(logit, theta, u_re, u_im, h0, impl=self.scan_impl)
        return y, h_last, torch.sigmoid(logit.to(y.dtype)).mean(-1)

    def forward(self, x, want_state=False):
        if self.recompute and self.training and torch.is_grad_enabled() and not want_state:
            # autograd keeps x alone and replays this forward (its random draws too) in backward
            return torch.utils.checkpoint.checkpoint(self._forward, x, False, use_reentrant=False)
        return self._forward(x, want_state)

    def _forward(self, x, want_state):
        y, h_last, s = self.recur(x)
        out, slots = (y, None) if self.cache is None else self.cache(y, s, want_state)
        state = MIPTState(h=h_last, s=s[:, -1].detach(), cache=slots) if want_state else None
        return out, s, state

    def init_state(self, B, device, dtype):
        return MIPTState(h=torch.zeros(B, self.n_embd, device=device, dtype=complex_dtype(dtype)),
                         s=torch.zeros(B, device=device, dtype=dtype),
                         cache=None if self.cache is None else self.cache.empty_state(B, device, dtype))

    def step(self, x, state, pos):
        # x (B, D): one token, through the same recurrence as forward, from the carried state
        y, h, s = self.recur(x[:, None], state.h)
        y, s = y[:, 0], s[:, 0]                                                # (B, D), (B,)
        out, slots = (y, None) if self.cache is None else self.cache.step(y, s, pos, state.cache)
        return out, MIPTState(h=h, s=s, cache=slots)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """LayerNorm -> mixer -> residual -> LayerNorm -> FFN -> residual (mlp=False: the first residual alone)."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mix = MIPTLayer(config) if config.mixer == 'mipt' else SelfAttention(config)
        self.drop = nn.Dropout(config.dropout)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias) if config.mlp else None
        self.mlp = MLP(config) if config.mlp else None

    def ffn(self, x):
        return x if self.mlp is None else x + self.mlp(self.ln_2(x))

    def forward(self, x, want_state=False):
        m, s, state = self.mix(self.ln_1(x), want_state)
        return self.ffn(x + self.drop(m)), s, state

    def step(self, x, state, pos):
        m, state = self.mix.step(self.ln_1(x), state, pos)
        return self.ffn(x + m), state


# -----------------------------------------------------------------------------
# The model

def init_weights(module, n_layer, residual=('c_proj.weight', 'cache.proj.weight')):
    """GPT-2's initialisation, in place: Linear and Embedding weights N(0, 0.02), biases zero, and the projections
    into the residual stream (names ending in `residual`) N(0, 0.02 / sqrt(2 n_layer))."""
    def one(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    module.apply(one)
    for name, w in module.named_parameters():
        if name.endswith(residual):
            nn.init.normal_(w, 0.0, 0.02 / math.sqrt(2 * n_layer))


def check_decoding(config, max_new_tokens, temperature, top_k):
    """The decoding arguments that generate and engine.decode accept."""
    _need(not config.n_classes, "decoding needs a language model; this model is a classifier (n_classes > 0)")
    _need(temperature >= 0 and math.isfinite(temperature), f"temperature must be >= 0 (0 = greedy), got {temperature}")
    _need(top_k is None or top_k >= 0, f"top_k must be >= 1, or 0/None for every token, got {top_k}")
    _need(max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {max_new_tokens}")


def sample(logits, temperature=1.0, top_k=None):
    """THE sampling policy: logits (B, V) -> tokens (B,). Temperature 0 is greedy, > 0 samples from
    softmax(logits / temperature); top_k None or 0 keeps every token, k > 0 the k most likely."""
    logits = logits.to(acc_dtype(logits.dtype))
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
        logits[logits < v[:, [-1]]] = -math.inf
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)[:, 0]


def _traced():  # inside a CUDA graph capture or torch.compile, where a read back to the host is not allowed
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


class MIPT(nn.Module):
    """A language model (n_classes = 0, head tied to the embedding) or a classifier read causally at each row's
    last real token (readout='last') or from the running mean up to it ('mean'). mixer='attention' makes it the
    Transformer twin: the same model around the mixer, plus learned positions."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        D = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, D)
        self.wpe = nn.Embedding(config.block_size, D) if config.mixer == 'attention' else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(D, bias=config.bias)
        if config.n_classes:
            self.head = nn.Linear(D, config.n_classes)
        else:
            self.head = nn.Linear(D, config.vocab_size, bias=False)
            self.head.weight = self.wte.weight  # tied
        init_weights(self, config.n_layer)
        for block in self.blocks:
            if isinstance(block.mix, MIPTLayer):
                with torch.no_grad():
                    block.mix.proj.bias[:D] = math.log(config.p_init / (1 - config.p_init))  # wave phase
                    block.mix.proj.weight[D:2 * D] *= 0.1                                     # small theta

    def _embed(self, idx, t0=0):
        # token ids (B, T) or (B,) from position t0 -> (B, T, D) or (B, D)
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {idx.dtype}")
        # the range check waits for a GPU: not in its training steps, nor traced, where it would split the graph
        if idx.numel() and not (idx.is_cuda and self.training or _traced()):
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"token ids must lie in [0, vocab_size={self.config.vocab_size}), got ids from {lo} to {hi}")
        x = self.wte(idx if idx.dtype in (torch.int64, torch.int32) else idx.long())
        if self.wpe is not None:
            T = idx.shape[-1] if idx.dim() == 2 else 1
            # a CUDA graph's position is a device tensor, which engine.graphed_step bounds: not read back here
            if not (torch.is_tensor(t0) and _traced()) and int(t0) + T > self.config.block_size:
                raise ValueError(f"the attention twin has learned positions up to block_size="
                                 f"{self.config.block_size}, got position {int(t0) + T - 1}; crop the context")
            x = x + self.wpe(t0 + torch.arange(T, device=idx.device)).squeeze(0)
        return self.drop(x)

    def _body(self, idx, want_state=False):
        if idx.dim() != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
            raise ValueError(f"idx must be (B, T) token ids with B, T >= 1, got shape {tuple(idx.shape)}")
        x = self._embed(idx)
        scores, states = [], []
        for block in self.blocks:
            x, s, state = block(x, want_state)
            scores.append(s)
            states.append(state)
        return self.ln_f(x), scores, states

    def _lengths(self, idx, lengths):
        B, T = idx.shape
        if lengths is None:
            return torch.full((B,), T, device=idx.device)
        if not torch.is_tensor(lengths) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool \
                or lengths.shape != (B,):
            got = f"{tuple(lengths.shape)} {lengths.dtype}" if torch.is_tensor(lengths) else type(lengths).__name__
            raise ValueError(f"lengths must be an integer tensor of shape (B,) = ({B},), got {got}")
        if not ((lengths >= 1) & (lengths <= T)).all():
            raise ValueError(f"lengths must lie in [1, T={T}], got {lengths.tolist()}")
        return lengths.to(idx.device)

    @property
    def _pools(self):  # readout='mean' carries a running sum when decoding
        return bool(self.config.n_classes) and self.config.readout == 'mean'

    def _read(self, x, lengths):
        """The classifier's read-out from the final hidden states x (B, T, D) at each row's last real token."""
        if self._pools:  # the causal running mean, so that padding never reaches it
            x = x.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        return x[torch.arange(x.shape[0], device=x.device), lengths - 1]         # (B, D)

    def forward(self, idx, targets=None, lengths=None):
        """idx (B, T). LM: targets (B, T), -1 ignored; logits (B, T, V). Classifier: targets (B,), lengths (B,) real
        tokens per right-padded row; logits (B, n_classes) read at lengths - 1, as each row would classify alone."""
        if targets is not None:
            want = (idx.shape[0],) if self.config.n_classes else tuple(idx.shape)
            if not torch.is_tensor(targets) or tuple(targets.shape) != want:
                got = tuple(targets.shape) if torch.is_tensor(targets) else type(targets).__name__
                what = 'one class per row' if self.config.n_classes else 'one next token per position, -1 ignored'
                raise ValueError(f"targets must have shape {want} ({what}), got {got}")
        x, scores, _ = self._body(idx)                    # (B, T, D)
        if self.config.n_classes:
            logits = self.head(self._read(x, self._lengths(idx, lengths)))  # (B, n_classes)
            loss = None if targets is None else F.cross_entropy(logits.to(acc_dtype(logits.dtype)), targets)
        else:
            logits = self.head(x)                         # (B, T, V)
            loss = None if targets is None else F.cross_entropy(
                logits.to(acc_dtype(logits.dtype)).view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        if loss is not None and self.training and self.config.p_penalty and scores[0] is not None:
            loss = loss + self.config.p_penalty * torch.stack([s.mean() for s in scores]).mean()  # training only
        return logits, loss

    # -------------------------------------------------------------------------
    # Decoding: O(1) state per layer for MIPT with finite K

    def init_state(self, batch_size):
        w = self.wte.weight
        pooled = w.new_zeros(batch_size, w.shape[1]) if self._pools else None
        return DecodeState(layers=[block.mix.init_state(batch_size, w.device, w.dtype) for block in self.blocks],
                           pos=0, pooled=pooled)

    def step(self, idx_t, state):
        """Consume one token per row, idx_t (B,). Returns logits (B, V) or (B, n_classes), and the same
        DecodeState advanced by one position."""
        self._check_step(idx_t, state)
        x = self._embed(idx_t, t0=state.pos)              # (B, D)
        for i, block in enumerate(self.blocks):
            x, state.layers[i] = block.step(x, state.layers[i], state.pos)
        x = self.ln_f(x)
        if state.pooled is not None:  # readout='mean': the running mean of the final hidden states
            state.pooled = state.pooled + x
            x = state.pooled / (state.pos + 1)
        state.pos = state.pos + 1
        return self.head(x), state

    @cached_property
    def _layer_states(self):  # each layer's state kind and shapes after the batch (0: a size that grows)
        return [(type(e), [tuple(t.shape[1:]) for t in e.tensors()])
                for e in (block.mix.init_state(1, 'meta', torch.float32) for block in self.blocks)]

    def _check_step(self, idx_t, state):  # this model's DecodeState (each layer's kind, widths, slots); a token a row
        if not isinstance(state, DecodeState) or len(state.layers) != len(self.blocks):
            raise ValueError(f"state must be this model's DecodeState with {len(self.blocks)} layers (model.init_state "
                             f"or model.prefill), got {type(state).__name__} with "
                             f"{len(getattr(state, 'layers', []))} layers")
        for i, (got, (kind, shapes)) in enumerate(zip(state.layers, [] if _traced() else self._layer_states)):
            tensors = list(got.tensors())
            if not (isinstance(got, kind) and len(tensors) == len(shapes) and all(
                    g.dim() - 1 == len(w) and all(a == b or b == 0 for a, b in zip(g.shape[1:], w))
                    for g, w in zip(tensors, shapes))):
                raise ValueError(f"state layer {i} ({type(got).__name__}: {[tuple(t.shape) for t in tensors]}) is not "
                                 f"of this model's layer {i} ({kind.__name__}: (B,) + {shapes}); decode from this "
                                 f"model's init_state or prefill")
        if idx_t.dim() != 1 or idx_t.shape[0] != state.batch_size or idx_t.shape[0] == 0:
            raise ValueError(f"idx_t must be (B,) = ({state.batch_size},) tokens, one per row of the state, "
                             f"got shape {tuple(idx_t.shape)}")

    @torch.no_grad()
    def prefill(self, idx):
        """A parallel pass over a prompt (B, T): the last position's logits and the decoding state, equal to
        stepping through the prompt token by token."""
        x, _, states = self._body(idx, want_state=True)
        pooled = x.sum(1) if self._pools else None
        last = pooled / idx.shape[1] if pooled is not None else x[:, -1]
        return self.head(last), DecodeState(layers=states, pos=idx.shape[1], pooled=pooled)

    @staticmethod
    def state_bytes(state):
        return sum(t.numel() * t.element_size() for t in state.tensors())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue idx (B, T) by max_new_tokens tokens, eagerly (engine.decode is the fast loop, same policy)."""
        check_decoding(self.config, max_new_tokens, temperature, top_k)
        logits, state = self.prefill(idx)
        for i in range(max_new_tokens):
            tok = sample(logits, temperature, top_k)                                   # (B,)
            idx = torch.cat([idx, tok[:, None]], dim=1)
            if i + 1 < max_new_tokens:
                logits, state = self.step(tok, state)
        return idx


# -----------------------------------------------------------------------------
# The Transformer twin: causal self-attention in place of MIPT + cache, the same model around it

@dataclass
class KVCache(State):
    """The twin's decoding state: every past key and value (it grows with the context)."""
    k: torch.Tensor                      # (B, H, t, hd)
    v: torch.Tensor                      # (B, H, t, hd)

    def append(self, k, v, pos):
        """The cache with position pos's keys and values (B, H, 1, hd) added, and the mask of held positions a
        query at pos must not see (None: every one is past)."""
        return KVCache(k=torch.cat([self.k, k], 2), v=torch.cat([self.v, v], 2)), None


class SelfAttention(nn.Module):
    """Causal multi-head self-attention: the Transformer twin's mixer."""

    def __init__(self, config):
        super().__init__()
        D = config.n_embd
        self.n_head, self.impl, self.dropout = config.n_head, config.attn_impl, config.dropout
        self.c_attn = nn.Linear(D, 3 * D, bias=config.bias)
        self.c_proj = nn.Linear(D, D, bias=config.bias)

    def _heads(self, x):
        B, T, D = x.shape
        return [t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(D, dim=2)]

    def forward(self, x, want_state=False):
        B, T, D = x.shape
        q, k, v = self._heads(x)  # (B, H, T, hd) each
        drop = self.dropout if self.training else 0.0
        if self.impl == 'sdpa':
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:  # naive: the T x T matrix in memory, as in the paper's memory figure
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), -math.inf)
            y = F.dropout(torch.softmax(att, dim=-1), drop, self.training) @ v
        out = self.c_proj(y.transpose(1, 2).reshape(B, T, D))
        # the state copies K and V out of the fused projection, so that its (B, T, 3D) output is freed
        return out, None, (KVCache(k=k.contiguous(), v=v.contiguous()) if want_state else None)

    def init_state(self, B, device, dtype):
        hd = self.c_proj.in_features // self.n_head
        empty = torch.zeros(B, self.n_head, 0, hd, device=device, dtype=dtype)
        return KVCache(k=empty, v=empty.clone())

    def step(self, x, state, pos):
        q, k, v = self._heads(x[:, None])  # (B, H, 1, hd)
        state, later = state.append(k, v, pos)
        # one query: plain softmax attention over every cached (past) key, (B, H, 1, t)
        scores = (q @ state.k.transpose(-2, -1).to(q.dtype)) / math.sqrt(q.shape[-1])
        if later is not None:
            scores = scores.masked_fill(later, -math.inf)
        y = torch.softmax(scores, dim=-1, dtype=acc_dtype(scores.dtype)).to(v.dtype)
        return self.c_proj((y @ state.v.to(v.dtype)).reshape(x.shape)), state
