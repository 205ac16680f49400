"""
mipt.py: MIPT-SSM in one file.

MIPT-SSM (Y. Fan, arXiv 2604.07716) is a sequence model whose state is a complex "wave" h_t in C^D.
Each token measures the state at a learned rate p_t in (0, 1), per channel:

    h_t = (1 - p_t) * exp(i theta_t) * h_{t-1}  +  p_t * u_t          y_t = Re h_t

* p -> 0, the wave phase: the state only rotates. Its norm is kept, so old tokens interfere
  instead of being forgotten.
* p -> 1, the particle phase: the state collapses onto the current token u_t.

Because the gate changes from token to token, the layer escapes the paper's no-go theorem (one fixed
operator cannot both keep every norm and erase a chosen state). The recurrence is a first-order linear
scan h_t = a_t h_{t-1} + b_t, so training runs it in parallel over time and decoding runs it one token
at a time with O(1) state.

Tokens measured hard are "facts": a causal sparse cache keeps the K tokens with the highest score
s_t = mean_d p_t and every position reads it with attention, fused into y through a sigmoid gate.
Decoding then needs O(D) state plus an O(K D) cache per layer, where a Transformer needs O(T D).
Selection itself has no gradient; in training, R random earlier positions are attended beside the
cache (with the same log s_j bias), so that p also learns about tokens the cache has not caught yet.

Glossary (code name: paper symbol, shape)
    logit   W_p x_t + bias           pre-sigmoid measurement, (B, T, D); its bias starts at
                                     logit(p_init) = logit(0.1), so a fresh model is in the wave phase
    p       p_t = sigmoid(logit)     measurement rate, (B, T, D)
    theta   theta_t = W_theta x_t    phase angle, (B, T, D); weights start 10x smaller than the rest
    u       u_t = W_r x_t + i W_i x_t   the token written into the state, complex (B, T, D)
    a, b    a_t = (1-p_t) e^{i theta_t}, b_t = p_t u_t   the scan's gate and input, complex (B, T, D)
    h       h_t                      the complex state, (B, T, D); h_0 = 0
    y       y_t = Re h_t             the layer's output, (B, T, D)
    s       s_t = mean_d p_t         a token's measurement score, (B, T)
    tau     cache_tau                a token is eligible for the cache when s_t > tau
    K       cache_size               cache slots per layer (0: no cache, -1: unbounded, None inside)
    L       cache_chunk              query chunk of the cache's training path
    end     cache_intervals          token j is in the cache of queries j <= i < end_j, (B, T)
    R       cache_explore            training only: random earlier positions each query also attends to
                                     (-1: all of them, i.e. dense soft selection; 0: off)
    readout readout                  classifier: 'last' reads the final hidden state at the last real
                                     token; 'mean' its running mean over positions (the paper's demo)
    state   DecodeState              decoding: per layer a MIPTState (h (B, D) complex, s (B,), cache:
                                     CacheSlots k, v (B, H, K, hd), score, pos (B, K)) or the twin's KVCache;
                                     pos, the tokens consumed; pooled (B, D), the running sum for 'mean'

Contents, top to bottom: config, scans, the MIPT recurrence, the decoding state, the causal sparse
cache, the blocks (MIPT and its Transformer twin), the model, decoding, and appendices that load the
fused CUDA scan (kernels.cu) and the fused cache read-out (cache_kernel.py, Triton), and that help compile
and capture decoding.
"""

import contextlib
import math
import os
import warnings
from collections import namedtuple
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# Config


@dataclass
class MIPTConfig:
    vocab_size: int = 65
    block_size: int = 256        # longest training sequence (MIPT itself has no length limit)
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4              # heads of the cache read-out (MIPT) or of self-attention (twin)
    dropout: float = 0.0
    bias: bool = True
    mixer: str = 'mipt'          # 'mipt' | 'attention' (the Transformer twin)
    attn_impl: str = 'sdpa'      # 'sdpa' (fused) | 'naive' (materialises T x T, for the memory figure)
    cache_size: int = 16         # K: 0 = no cache, -1 = unbounded
    cache_tau: float = 0.0       # tau: eligible when s_t > tau
    cache_chunk: int = 128       # L: query chunk of the exact causal cache in training
    cache_explore: int = 64      # R: exploration candidates per query in training (0 off, -1 all)
    p_init: float = 0.1          # initial measurement rate
    p_penalty: float = 0.0       # optional sparsity penalty on s, added to the loss
    n_classes: int = 0           # 0 = language model, > 0 = classifier
    readout: str = 'last'        # classifier read-out: 'last' | 'mean'
    scan_impl: str = 'auto'      # 'auto' (CUDA kernel when available) | 'torch' | 'cuda'
    cache_impl: str = 'auto'     # the cache's training read-out: 'auto' (Triton kernel on a GPU) | 'torch' | 'triton'
    recompute: bool = False      # training: keep only each MIPT layer's input, run its forward again in backward

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        for f in fields(self):  # types first: MIPTConfig(n_layer='2') or n_embd=32.5 fail here, by name
            v, want = getattr(self, f.name), f.type
            ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, f.name, float(v))
                ok = True
            need(ok, f"{f.name} must be {want.__name__}, got {v!r} ({type(v).__name__})")
        need(self.mixer in ('mipt', 'attention'), f"mixer must be 'mipt' or 'attention', got {self.mixer!r}")
        need(self.attn_impl in ('sdpa', 'naive'), f"attn_impl must be 'sdpa' or 'naive', got {self.attn_impl!r}")
        need(self.scan_impl in ('auto', 'torch', 'cuda'),
             f"scan_impl must be 'auto', 'torch' or 'cuda', got {self.scan_impl!r}")
        need(self.cache_impl in ('auto', 'torch', 'triton'),
             f"cache_impl must be 'auto', 'torch' or 'triton', got {self.cache_impl!r}")
        need(self.readout in ('last', 'mean'), f"readout must be 'last' or 'mean', got {self.readout!r}")
        for name in ('vocab_size', 'block_size', 'n_layer', 'n_embd', 'n_head', 'cache_chunk'):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); change one of them")
        need(self.cache_size >= -1, f"cache_size must be -1 (unbounded), 0 (no cache) or K > 0, got {self.cache_size}")
        need(self.cache_explore >= -1, f"cache_explore must be -1 (all), 0 (off) or R > 0, got {self.cache_explore}")
        need(0.0 <= self.cache_tau < 1.0, f"cache_tau must lie in [0, 1) since s_t is a mean of sigmoids, got {self.cache_tau}")
        need(0.0 < self.p_init < 1.0, f"p_init must lie in (0, 1), got {self.p_init}")
        need(0.0 <= self.dropout < 1.0, f"dropout must lie in [0, 1), got {self.dropout}")
        need(self.n_classes >= 0, f"n_classes must be 0 (language model) or > 0, got {self.n_classes}")
        need(self.p_penalty >= 0.0, f"p_penalty must be >= 0, got {self.p_penalty}")
        if self.mixer == 'attention':
            need(self.cache_size == 0 or self.cache_size == MIPTConfig.cache_size,
                 "the attention mixer has no sparse cache: set cache_size=0 (or leave it at its default)")
            need(self.p_penalty == 0.0, "p_penalty only applies to mixer='mipt'")

    @property
    def K(self):
        """Cache slots: None when unbounded. The one internal spelling of "unbounded"."""
        return None if self.cache_size == -1 else self.cache_size


# -----------------------------------------------------------------------------
# Scans: h_t = a_t * h_{t-1} + b_t over complex (B, T, D) tensors


def scan_ref(a, b, h0=None):
    """The reference: a sequential loop over time. a, b complex (B, T, D); h0 (B, D) or None."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0.to(b.dtype)
    hs = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    return torch.stack(hs, dim=1)


def scan(a, b, h0=None):
    """The same function in parallel over time: a chunked scan, exact and differentiable.

    Time is cut into C chunks of L ~ sqrt(T) steps. (1) Each chunk scans its own steps from a zero
    state, all chunks at once, and keeps the running product of its gates. (2) A short loop over chunks
    carries the state from one chunk to the next. (3) Each step adds its chunk's incoming state times
    its running gate product. That is L + C sequential steps over (B, C, D) tensors instead of T over
    (B, D), with O(B T D) memory. Only forward multiplications: no division by gate products, which
    lose precision when |a| is near 1.
    """
    B, T, D = b.shape
    L = max(1, math.isqrt(T))
    C = -(-T // L)
    pad = C * L - T
    if pad:  # identity steps at the end change nothing before them
        a = torch.cat([a, a.new_ones(B, pad, D)], dim=1)
        b = torch.cat([b, b.new_zeros(B, pad, D)], dim=1)
    a = a.view(B, C, L, D)
    b = b.view(B, C, L, D)
    # (1) local scans and running gate products, all chunks at once
    h = b.new_zeros(B, C, D)
    A = a.new_ones(B, C, D)
    hs, As = [], []
    for l in range(L):
        h = a[:, :, l] * h + b[:, :, l]
        A = A * a[:, :, l]
        hs.append(h)
        As.append(A)
    h_loc = torch.stack(hs, dim=2)  # (B, C, L, D)
    A_loc = torch.stack(As, dim=2)  # (B, C, L, D)
    # (2) the state entering each chunk
    carry = b.new_zeros(B, D) if h0 is None else h0.to(b.dtype)
    starts = []
    for c in range(C):
        starts.append(carry)
        carry = A_loc[:, c, -1] * carry + h_loc[:, c, -1]
    start = torch.stack(starts, dim=1)  # (B, C, D)
    # (3) fix-up
    h = h_loc + A_loc * start[:, :, None]
    return h.reshape(B, C * L, D)[:, :T]


# -----------------------------------------------------------------------------
# The MIPT recurrence
#
# This is the reference path, written in PyTorch right here. On a GPU the same function runs as one
# fused CUDA kernel (kernels.cu, loaded in the appendix at the end of this file), which computes p, a
# and b in registers and never writes them to memory; tests check the two against each other.


def mipt_recurrence(logit, theta, u_re, u_im, h0=None, impl='auto'):
    """The MIPT recurrence from the layer's projections. Inputs (B, T, D) real, h0 (B, D) complex or None.
    Returns y = Re h (B, T, D) and the last state h_T (B, D), in float32 (float64 for float64 inputs),
    also under bf16 autocast: the state accumulates and PyTorch has no complex bf16."""
    if logit.shape[1] == 1 and impl != 'cuda':  # one step (decoding) needs no scan
        return recurrence_step(logit[:, 0], theta[:, 0], u_re[:, 0], u_im[:, 0], h0)
    if logit.is_cuda and logit.dtype == torch.float16:  # the kernel reads fp32 or bf16
        logit, theta, u_re, u_im = (t.float() for t in (logit, theta, u_re, u_im))
    fits = logit.is_cuda and logit.dtype in (torch.float32, torch.bfloat16)
    if impl == 'cuda' or (impl == 'auto' and fits and load_kernels() is not None):
        if not fits or load_kernels() is None:
            raise RuntimeError("scan_impl='cuda' needs float32 or bfloat16 inputs on a CUDA device and a "
                               "working nvcc; use scan_impl='auto' or 'torch' for the PyTorch scan")
        return MIPTScanCUDA.apply(logit, theta, u_re, u_im, h0)
    dtype = torch.promote_types(logit.dtype, torch.float32)
    p = torch.sigmoid(logit.to(dtype))
    a = torch.polar(1 - p, theta.to(dtype))             # (B, T, D) complex
    b = p * torch.complex(u_re.to(dtype), u_im.to(dtype))  # (B, T, D) complex
    h = scan(a, b, h0)
    return h.real, h[:, -1]


def recurrence_step(logit, theta, u_re, u_im, h0=None):
    """One step, h = (1 - p) e^{i theta} h0 + p u, in real arithmetic: elementwise work that torch.compile
    fuses into the decoding step (no complex tensors but the state's view). Inputs (B, D); returns y (B, 1, D)
    and h (B, D), as mipt_recurrence."""
    dtype = torch.promote_types(logit.dtype, torch.float32)
    p = torch.sigmoid(logit.to(dtype))
    r = 1 - p                                                                   # |a|
    a_re, a_im = r * torch.cos(theta.to(dtype)), r * torch.sin(theta.to(dtype))
    b_re, b_im = p * u_re.to(dtype), p * u_im.to(dtype)
    if h0 is None:
        h_re, h_im = b_re, b_im
    else:
        h0 = torch.view_as_real(h0.to(_complex(dtype)).resolve_conj())          # (B, D, 2)
        h_re = a_re * h0[..., 0] - a_im * h0[..., 1] + b_re
        h_im = a_re * h0[..., 1] + a_im * h0[..., 0] + b_im
    return h_re[:, None], torch.view_as_complex(torch.stack([h_re, h_im], -1))


# -----------------------------------------------------------------------------
# The decoding state: one small object per mixer, and the model's DecodeState around them (after
# nanochat's KVCache). Every tensor of a state is reachable through tensors(), which byte counts and
# CUDA-graph copies use.


class State:
    """Base of the state objects: dataclasses whose fields are tensors, other States, lists of them, or
    plain values."""

    def tensors(self):
        for f in fields(self):
            v = getattr(self, f.name)
            for x in (v if isinstance(v, list) else [v]):
                if torch.is_tensor(x):
                    yield x
                elif isinstance(x, State):
                    yield from x.tensors()

    def map(self, fn):
        """A new state of the same structure with fn applied to every tensor."""
        def m(x):
            return fn(x) if torch.is_tensor(x) else x.map(fn) if isinstance(x, State) else x
        return type(self)(**{f.name: ([m(x) for x in v] if isinstance(v := getattr(self, f.name), list) else m(v))
                             for f in fields(self)})

    def copy_(self, other):
        """Copy other's tensors into this state's tensors, in place (shapes must match; a tensor that other
        shares with this state, e.g. a static KV cache written in place, is left as it is)."""
        for dst, src in zip(list(self.tensors()), list(other.tensors()), strict=True):
            if dst is not src:
                dst.copy_(src)
        return self


def _traced():
    """Inside a CUDA graph capture or torch.compile, where reading a value back to the host is not allowed."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _complex(dtype):
    return torch.complex128 if dtype == torch.float64 else torch.complex64


Decoded = namedtuple('Decoded', 'token s state')  # what decode() yields for every new token


@dataclass
class CacheSlots(State):
    """The sparse cache's K slots. Empty slots have pos -1 and score -inf."""
    k: torch.Tensor          # (B, H, K, hd)
    v: torch.Tensor          # (B, H, K, hd)
    score: torch.Tensor      # (B, K) s_j of the cached token
    pos: torch.Tensor        # (B, K) its position

    def grow(self):
        """One more empty slot (the unbounded cache)."""
        return CacheSlots(k=F.pad(self.k, (0, 0, 0, 1)), v=F.pad(self.v, (0, 0, 0, 1)),
                          score=F.pad(self.score, (0, 1), value=-math.inf), pos=F.pad(self.pos, (0, 1), value=-1))

    def compact(self):
        """Drop the slots that are empty in every row (the unbounded cache holds only what it stored)."""
        n = int((self.pos >= 0).sum(1).max()) if self.pos.numel() else 0
        return CacheSlots(k=self.k[:, :, :n], v=self.v[:, :, :n], score=self.score[:, :n], pos=self.pos[:, :n])


@dataclass
class MIPTState(State):
    """A MIPT layer's decoding state: the complex state h, the last token's score, the cache slots."""
    h: torch.Tensor                      # (B, D) complex
    s: torch.Tensor                      # (B,) score s_t of the token just consumed
    cache: CacheSlots = None             # None without a cache (K = 0)


@dataclass
class KVCache(State):
    """The attention twin's decoding state: every past key and value (it grows with the context)."""
    k: torch.Tensor                      # (B, H, t, hd)
    v: torch.Tensor                      # (B, H, t, hd)

    def to_static(self, capacity):
        """The same keys and values in preallocated (B, H, capacity, hd) tensors, for a CUDA graph."""
        B, H, t, hd = self.k.shape
        if t > capacity:
            raise ValueError(f"a static KV cache of {capacity} positions cannot hold {t}")
        k, v = (torch.zeros(B, H, capacity, hd, device=x.device, dtype=x.dtype) for x in (self.k, self.v))
        k[:, :, :t], v[:, :, :t] = self.k, self.v
        return StaticKVCache(k=k, v=v)


@dataclass
class StaticKVCache(KVCache):
    """KVCache in fixed tensors: positions < pos are filled, a step writes position pos in place."""


@dataclass
class DecodeState(State):
    """The whole model's decoding state: one state per layer, the position (kept once), and for
    readout='mean' the running sum of the final hidden states."""
    layers: list = field(default_factory=list)
    pos: object = 0                      # tokens consumed: an int, or a device tensor under a CUDA graph
    pooled: torch.Tensor = None          # (B, D) readout='mean' only

    @property
    def batch_size(self):
        return next(self.tensors()).shape[0]

    def advance(self, n=1):
        self.pos = self.pos + n
        return self


# -----------------------------------------------------------------------------
# The causal sparse cache
#
# THE RULE, defined once by rank() and used by training (select_cache), decoding (SparseCache.step) and
# the state that prefill exports (probe's count, min(K, #eligible), follows from it): a token outranks
# another when its score s is higher, or when the scores are equal and it came earlier. The cache at
# position i holds the K best-ranked eligible tokens (s_j > tau) among positions j <= i. In decoding, a
# newcomer is the latest token, so it enters a full cache only when its score is strictly higher than the
# weakest slot's, and evicts that slot. sigmoid saturates to exactly 1.0 in float32, so ties are common:
# torch.topk alone would not do.


def rank(score, pos):
    """Order of candidates, best first, by THE RULE. score, pos (..., N) -> indices (..., N)."""
    by_pos = pos.argsort(dim=-1, stable=True)
    by_score = score.gather(-1, by_pos).argsort(dim=-1, descending=True, stable=True)
    return by_pos.gather(-1, by_score)


@torch.no_grad()
def select_cache(s, K, tau, L):
    """Exact causal cache membership for every position, without a loop over time.

    s: (B, T) scores; K: slots (None = unbounded). Positions are cut into C chunks of L queries. A chunk's
    candidates are the cache carried in from all earlier chunks plus its own L positions, since the top-K
    of a union is the top-K of the parts' top-Ks. Memory is O(T (K + L)); unbounded carries every earlier
    eligible token, so it is quadratic by nature.

    Returns cand (B, C, K + L) candidate positions (-1 = none) and member (B, C, L, K + L), True where
    candidate j is in the cache of the chunk's query l.
    """
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
    """Cache membership as one interval per token: token j is in the cache of the queries j <= i < end_j.

    By THE RULE a token enters (if ever) at its own position and, once outranked by K later ones, never
    returns, so select_cache's (B, C, L, N) membership collapses into end (B, T), one past the last query
    that holds it (end_j <= j: never cached). cand (B, C, N) is kept as each chunk's list of candidates,
    with the padding beyond T set to -1."""
    B, C, L, N = member.shape
    qpos1 = torch.arange(1, C * L + 1, device=cand.device, dtype=torch.int32).view(1, C, L, 1)
    last = torch.where(member, qpos1, 0).amax(2)                                      # (B, C, N) int32
    cand = torch.where(cand < T, cand, -1)
    end = torch.zeros(B, T + 1, dtype=last.dtype, device=cand.device)
    end.scatter_reduce_(1, torch.where(cand >= 0, cand, T).view(B, -1), last.view(B, -1), 'amax')
    return cand, end[:, :T]                                                           # (B, C, N), (B, T)


@torch.no_grad()
def add_exploration(noise, R, L, cand, end):
    """Training only: beside the exact cache, each query also attends to R random positions j <= i.

    They are drawn as a second "cache" over the uniform random keys noise (B, T) (a causal reservoir
    sample: the top-R of random keys among j <= i is a uniform R-subset), so select_cache builds them and
    causality holds by construction. R = None attends to every earlier position (dense soft selection).
    Both are intervals that start at j, so their union is one: end_j is the later of the two ends. An
    explored token already in a chunk's carried cache is listed once. Returns the widened (cand, end)."""
    xcand, xend = cache_intervals(*select_cache(noise, R, -1.0, L), noise.shape[1])
    Kc, Rc = cand.shape[2] - L, xcand.shape[2] - L
    carry, xcarry = cand[..., :Kc], xcand[..., :Rc]                                  # (B, C, Kc), (B, C, Rc)
    twice = (xcarry[..., :, None] == carry[..., None, :]).any(-1)                    # (B, C, Rc)
    cand = torch.cat([carry, torch.where(twice, -1, xcarry), cand[..., Kc:]], dim=2)  # (B, C, Kc+Rc+L)
    return cand, torch.maximum(end, xend)


@torch.no_grad()
def cache_plan(s, K, tau, L, R, noise):
    """Who attends to whom in training: (cand (B, C, N), end (B, T)) for the exact cache, widened by
    exploration when noise (B, T) holds random keys (None: exact only, as in eval)."""
    cand, end = cache_intervals(*select_cache(s, K, tau, L), s.shape[1])
    return (cand, end) if noise is None else add_exploration(noise, R, L, cand, end)


def cache_attention_torch(q, k, v, log_s, end, cand, null_k, null_v, L):
    """The cache's training-time read-out, the reference (cache_kernel.py fuses it on a GPU).

    q, k, v (B, T, H, hd); log_s, end (B, T); cand (B, C, N); null_k, null_v (H, hd). Query i attends to
    the null slot and to the candidates j of its chunk with j <= i < end_j, with log s_j added to the
    logit. Returns (B, T, H, hd)."""
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


class SparseCache(nn.Module):
    """Reads the cache with multi-head attention and fuses it into y: out = y + g * attend(q, cache).

    Keys and values are projected from y_j; log s_j is added to the logits, so p learns what is worth
    storing. A learned null slot makes an empty cache well defined."""

    def __init__(self, config):
        super().__init__()
        D, H = config.n_embd, config.n_head
        self.n_head, self.K, self.tau, self.L = H, config.K, config.cache_tau, config.cache_chunk
        self.R = None if config.cache_explore == -1 else config.cache_explore
        self.impl = config.cache_impl
        self.qkv = nn.Linear(D, 3 * D, bias=config.bias)
        self.gate = nn.Linear(D, D, bias=config.bias)
        self.proj = nn.Linear(D, D, bias=config.bias)
        self.null_k = nn.Parameter(torch.randn(H, D // H) * 0.02)
        self.null_v = nn.Parameter(torch.zeros(H, D // H))

    def forward(self, y, s, want_state=False):
        # y (B, T, D) the scan output, s (B, T) scores
        B, T, D = y.shape
        H, hd, L = self.n_head, D // self.n_head, self.L
        noise = torch.rand_like(s, dtype=torch.float32) if self.training and self.R != 0 else None
        fused = _use_fused_cache(self.impl, y.device)
        cand, end = (cache_plan_compiled if fused else cache_plan)(s.detach(), self.K, self.tau, L, self.R, noise)
        q, k, v = self.qkv(y).view(B, T, 3, H, hd).unbind(2)              # (B, T, H, hd) each
        log_s = torch.log(s.clamp(min=1e-30))                              # (B, T)
        attend = cache_attention_fused if fused else cache_attention_torch
        att = attend(q, k, v, log_s, end, cand, self.null_k, self.null_v, L).reshape(B, T, D)
        out = y + torch.sigmoid(self.gate(y)) * self.proj(att)
        if not want_state:
            return out, None
        # the decoding state after the last position: its row's exact cache, packed best first by THE RULE
        if noise is not None:  # exploration widened the plan; the state holds the exact cache alone
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
        return CacheSlots(k=torch.zeros(B, H, K, hd, device=device, dtype=dtype),
                          v=torch.zeros(B, H, K, hd, device=device, dtype=dtype),
                          score=torch.full((B, K), -math.inf, device=device, dtype=dtype),
                          pos=torch.full((B, K), -1, dtype=torch.long, device=device))

    def step(self, y, s, t, slots):
        """One position. y (B, D), s (B,), t the position; returns the output (B, D) and the new slots."""
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
# Blocks
#
# The mixer protocol (MIPTLayer and SelfAttention; the peers in peers.py follow it too):
#   forward(x (B, T, D), want_state) -> (out (B, T, D), s (B, T) or None, state or None)
#   init_state(B, device, dtype)     -> the state before any token
#   step(x (B, D), state, pos)       -> (out (B, D), new state): one token at position pos


class MIPTLayer(nn.Module):
    """x -> (logit, theta, u) -> the recurrence -> y = Re h -> the sparse cache (when K != 0)."""

    def __init__(self, config):
        super().__init__()
        D = config.n_embd
        self.n_embd, self.scan_impl, self.recompute = D, config.scan_impl, config.recompute
        self.proj = nn.Linear(D, 4 * D, bias=True)  # rows: [W_p | W_theta | W_r | W_i]
        self.cache = SparseCache(config) if config.cache_size != 0 else None

    def recur(self, x, h0=None):
        """x (B, T, D), normalised -> y = Re h (B, T, D), the last state h_T (B, D), the scores s (B, T)."""
        logit, theta, u_re, u_im = self.proj(x).chunk(4, dim=-1)              # (B, T, D) each
        y, h_last = mipt_recurrence(logit, theta, u_re, u_im, h0, impl=self.scan_impl)
        return y, h_last, torch.sigmoid(logit.to(y.dtype)).mean(-1)

    def forward(self, x, want_state=False):
        if self.recompute and self.training and torch.is_grad_enabled() and not want_state:
            # less memory: autograd keeps x alone and replays this forward (its random draws too) in backward
            return torch.utils.checkpoint.checkpoint(self._forward, x, False, use_reentrant=False)
        return self._forward(x, want_state)

    def _forward(self, x, want_state):
        y, h_last, s = self.recur(x)
        out, slots = (y, None) if self.cache is None else self.cache(y, s, want_state)
        state = MIPTState(h=h_last, s=s[:, -1].detach(), cache=slots) if want_state else None
        return out, s, state

    def init_state(self, B, device, dtype):
        return MIPTState(h=torch.zeros(B, self.n_embd, device=device, dtype=_complex(dtype)),
                         s=torch.zeros(B, device=device, dtype=dtype),
                         cache=None if self.cache is None else self.cache.empty_state(B, device, dtype))

    def step(self, x, state, pos):
        # x (B, D): one token, through the same recurrence as forward, from the carried state
        y, h, s = self.recur(x[:, None], state.h)
        y, s = y[:, 0], s[:, 0]                                                # (B, D), (B,)
        out, slots = (y, None) if self.cache is None else self.cache.step(y, s, pos, state.cache)
        return out, MIPTState(h=h, s=s, cache=slots)


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
        if isinstance(state, StaticKVCache):  # write position pos in place; later positions are masked
            at = torch.as_tensor(pos, device=x.device).view(1)
            state.k.index_copy_(2, at, k.to(state.k.dtype))
            state.v.index_copy_(2, at, v.to(state.v.dtype))
            later = torch.arange(state.k.shape[2], device=x.device) > at                     # (capacity,)
        else:
            state, later = KVCache(k=torch.cat([state.k, k], 2), v=torch.cat([state.v, v], 2)), None
        # one query: plain softmax attention over every cached (past) key, (B, H, 1, t)
        scores = (q @ state.k.transpose(-2, -1).to(q.dtype)) / math.sqrt(q.shape[-1])
        if later is not None:
            scores = scores.masked_fill(later, -math.inf)
        y = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
        return self.c_proj((y @ state.v.to(v.dtype)).reshape(x.shape)), state


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """LayerNorm -> mixer (MIPT + cache, or attention) -> residual -> LayerNorm -> FFN -> residual."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mix = MIPTLayer(config) if config.mixer == 'mipt' else SelfAttention(config)
        self.drop = nn.Dropout(config.dropout)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, want_state=False):
        m, s, state = self.mix(self.ln_1(x), want_state)
        x = x + self.drop(m)
        return x + self.mlp(self.ln_2(x)), s, state

    def step(self, x, state, pos):
        m, state = self.mix.step(self.ln_1(x), state, pos)
        x = x + m
        return x + self.mlp(self.ln_2(x)), state


# -----------------------------------------------------------------------------
# The model


class MIPT(nn.Module):
    """A language model (n_classes = 0, head tied to the embedding) or a classifier read causally at each
    sequence's last real token (readout='last') or from the running mean up to it (readout='mean').
    mixer='attention' turns it into the Transformer twin: the same embedding, LayerNorms, FFN, head and
    initialisation, plus learned positions."""

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
        self.apply(self._init_weights)
        for name, w in self.named_parameters():  # residual projections, scaled as in GPT-2
            if name.endswith(('c_proj.weight', 'cache.proj.weight')):
                nn.init.normal_(w, 0.0, 0.02 / math.sqrt(2 * config.n_layer))
        for block in self.blocks:
            if isinstance(block.mix, MIPTLayer):
                with torch.no_grad():
                    block.mix.proj.bias[:D] = math.log(config.p_init / (1 - config.p_init))  # wave phase
                    block.mix.proj.weight[D:2 * D] *= 0.1                                     # small theta

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, 0.02)

    def get_num_params(self, non_embedding=True):
        """Parameters; non_embedding leaves out the token (and position) embeddings, as the paper counts."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def _check_ids(self, idx):
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an integer tensor, got {idx.dtype}")
        # on a GPU the check waits for the device: done in eval and decoding (outside a graph capture), not in
        # every training step, nor inside torch.compile (decode(compile=True)), where it would split the graph
        if idx.numel() and not (idx.is_cuda and self.training or _traced()):
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"token ids must lie in [0, vocab_size={self.config.vocab_size}), got ids from {lo} to {hi}")

    def _embed(self, idx, t0=0):
        self._check_ids(idx)
        x = self.wte(idx)
        if self.wpe is not None:
            T = idx.shape[-1] if idx.dim() == 2 else 1
            if torch.is_tensor(t0) and _traced():  # a CUDA graph's position (graphed_step bounds it): no host sync
                pos = t0 + torch.arange(T, device=idx.device)
            else:
                t0 = int(t0)
                if t0 + T > self.config.block_size:
                    raise ValueError(f"the attention twin has learned positions up to block_size="
                                     f"{self.config.block_size}, got position {t0 + T - 1}; crop the context")
                pos = torch.arange(t0, t0 + T, device=idx.device)
            x = x + self.wpe(pos).squeeze(0)
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
            raise ValueError(f"lengths must be an integer tensor of shape (B,) = ({B},), got "
                             f"{tuple(lengths.shape) if torch.is_tensor(lengths) else type(lengths).__name__}"
                             f"{f' {lengths.dtype}' if torch.is_tensor(lengths) else ''}")
        if not ((lengths >= 1) & (lengths <= T)).all():
            raise ValueError(f"lengths must lie in [1, T={T}], got {lengths.tolist()}")
        return lengths.to(idx.device)

    @property
    def _pools(self):
        """A classifier that reads the running mean (readout='mean') carries a running sum when decoding."""
        return bool(self.config.n_classes) and self.config.readout == 'mean'

    def _read(self, x, lengths):
        """The classifier's read-out from the final hidden states x (B, T, D) at each row's last real token."""
        if self._pools:  # the causal running mean, so that padding never reaches it
            x = x.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        return x[torch.arange(x.shape[0], device=x.device), lengths - 1]         # (B, D)

    def forward(self, idx, targets=None, lengths=None, labels=None):
        """idx (B, T). LM: targets (B, T), -1 ignored, gives logits (B, T, V).
        Classifier: targets (or labels) (B,) and lengths (B,) real tokens per right-padded row, gives
        logits (B, n_classes) read at position lengths - 1, exactly as each row would classify alone."""
        targets = labels if labels is not None else targets
        x, scores, _ = self._body(idx)                    # (B, T, D)
        if self.config.n_classes:
            logits = self.head(self._read(x, self._lengths(idx, lengths)))  # (B, n_classes)
            loss = None if targets is None else F.cross_entropy(logits.float(), targets)
        else:
            logits = self.head(x)                         # (B, T, V)
            loss = None if targets is None else F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        if loss is not None and self.training and self.config.p_penalty and scores[0] is not None:
            loss = loss + self.config.p_penalty * torch.stack([s.mean() for s in scores]).mean()  # training only
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; tensors of 2 or more dimensions (weights, embeddings, null slots) decay, the rest do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=(device_type == 'cuda'))

    @torch.no_grad()
    def probe(self, idx, lengths=None):
        """Measurement statistics per layer: the mean score s, and the mean number of cached tokens at
        each row's last real position. By THE RULE the cache there holds min(K, #eligible so far)."""
        was = self.training
        self.eval()
        _, scores, _ = self._body(idx)
        self.train(was)
        if scores[0] is None:
            return {'p_mean': [], 'cache_fill': [], 's': []}
        B, T = idx.shape
        real = torch.arange(T, device=idx.device)[None] < self._lengths(idx, lengths)[:, None]   # (B, T)
        p_mean, fill = [], []
        for s in scores:
            p_mean.append((s * real).sum().item() / real.sum().item())
            n_elig = ((s > self.config.cache_tau) & real).sum(1).float()   # (B,)
            K = self.config.K
            fill.append((n_elig if K is None else n_elig.clamp(max=K)).mean().item())
        return {'p_mean': p_mean, 'cache_fill': fill, 's': scores}

    # -------------------------------------------------------------------------
    # Decoding: O(1) state per layer for MIPT with finite K

    def init_state(self, batch_size):
        w = self.wte.weight
        pooled = w.new_zeros(batch_size, w.shape[1]) if self._pools else None
        return DecodeState(layers=[block.mix.init_state(batch_size, w.device, w.dtype) for block in self.blocks],
                           pos=0, pooled=pooled)

    def step(self, idx_t, state):
        """Consume one token per row, idx_t (B,). Returns logits (B, V) or (B, n_classes), and the state
        (the same DecodeState, advanced by one position)."""
        if not isinstance(state, DecodeState) or len(state.layers) != len(self.blocks):
            raise ValueError(f"state must be this model's DecodeState with {len(self.blocks)} layers (model.init_state "
                             f"or model.prefill), got {type(state).__name__} with "
                             f"{len(getattr(state, 'layers', []))} layers")
        if idx_t.dim() != 1 or idx_t.shape[0] != state.batch_size:
            raise ValueError(f"idx_t must be (B,) = ({state.batch_size},) tokens, one per row of the state, "
                             f"got shape {tuple(idx_t.shape)}")
        x = self._embed(idx_t, t0=state.pos)              # (B, D)
        for i, block in enumerate(self.blocks):
            x, state.layers[i] = block.step(x, state.layers[i], state.pos)
        x = self.ln_f(x)
        if state.pooled is not None:  # readout='mean': the running mean of the final hidden states
            state.pooled = state.pooled + x
            x = state.pooled / (state.pos + 1)
        state.advance()
        return self.head(x), state

    def step_into(self, idx_t, state):
        """step, with the new state written into state's own tensors (what graphed_step captures: a graph
        reads and writes fixed memory). state.pos must be a tensor. Returns the logits."""
        if not torch.is_tensor(state.pos):
            raise ValueError("step_into advances state.pos in place: it must be a tensor (use step for an int)")
        logits, new = self.step(idx_t, state.map(lambda t: t))  # a shallow copy: step rebinds its fields
        state.copy_(new)
        return logits

    @torch.no_grad()
    def prefill(self, idx):
        """A parallel pass over a prompt (B, T). Returns the last position's logits and the decoding state,
        equal to stepping through the prompt token by token."""
        x, _, states = self._body(idx, want_state=True)
        pooled = x.sum(1) if self._pools else None
        last = pooled / idx.shape[1] if pooled is not None else x[:, -1]
        return self.head(last), DecodeState(layers=states, pos=idx.shape[1], pooled=pooled)

    @staticmethod
    def state_bytes(state):
        return sum(t.numel() * t.element_size() for t in state.tensors())

    def _graph_blocker(self):
        """Why graphed_step cannot decode this model, or None: it needs MIPT with a finite cache or the twin
        (whose KV cache is then preallocated to block_size), on a GPU, in eval mode."""
        if self.config.mixer == 'mipt' and self.config.K is None:
            return "graphed_step needs a finite cache (a growing one cannot be graphed)"
        if not self.wte.weight.is_cuda:
            return "graphed_step needs the model on a CUDA device"
        if self.training:
            return "graphed_step needs an eval-mode model (no dropout)"
        return None

    def graphable(self):
        """Whether graphed_step can decode this model (see _graph_blocker)."""
        return self._graph_blocker() is None

    def graphed_step(self, state, dtype=None, compile=False):
        """step as one CUDA graph replay, for decoding on a GPU (eager batch-1 decoding is bound by kernel
        launches). Returns a function idx_t (B,) -> (logits, state) that continues from `state`; the state it
        returns is held in static tensors, updated in place by every call (keep stepping it through the
        returned function, not through step). MIPT with a finite cache, or the twin (see _graph_blocker).
        dtype: the autocast dtype to decode in (None: the weights' dtype), with the Linear weights cast to it
        once (linears_cast): the graph then reads that snapshot, not later changes to the weights (decode
        builds a graph per call). compile: torch.compile the step before capturing it (fewer, fused kernels
        per token; seconds of compilation first)."""
        if self._graph_blocker():
            raise ValueError(self._graph_blocker())
        dev = self.wte.weight.device
        twin = self.config.mixer == 'attention'
        if twin:  # the twin's cache, preallocated to its block size (fresh tensors, written in place uncloned)
            if state.pos >= self.config.block_size:
                raise ValueError(f"graphed_step: the twin's context ({state.pos}) already fills its block_size "
                                 f"({self.config.block_size})")
            state = DecodeState(layers=[st.to_static(self.config.block_size) for st in state.layers],
                                pos=state.pos, pooled=state.pooled)
        kv = {id(t) for st in state.layers if isinstance(st, StaticKVCache) for t in (st.k, st.v)}
        static = state.map(lambda t: t.to(dev) if id(t) in kv else t.to(dev).clone())
        static.pos = torch.as_tensor(state.pos, device=dev).clone()  # a tensor, so that it is not baked in
        tok = torch.zeros(static.batch_size, dtype=torch.long, device=dev)
        ctx = torch.autocast('cuda', dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()

        step_fn = self.step_into
        if compile:  # the copies into the static state compile with the step, so they fuse into its kernels
            _allow_recompiles()
            step_fn = torch.compile(self.step_into, dynamic=False)

        def run():
            with torch.no_grad(), ctx:
                return step_fn(tok, static)

        # to undo each warm-up step; not the static KV cache, whose warm-up write lies at position pos, masked
        # until the first real step overwrites it (one copy of the largest state, not two)
        saved = static.map(lambda t: t if id(t) in kv else t.clone())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(dev), linears_cast(self, dtype) as cast:  # Linear weights cast once, not per token
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up outside the graph (kernel loading, workspaces)
                for _ in range(2):
                    run()
                    static.copy_(saved)  # undone each time: both stay at pos (< block_size for the twin)
            torch.cuda.current_stream(dev).wait_stream(side)
            with torch.cuda.graph(graph, stream=side):
                logits = run()

        left = [self.config.block_size - state.pos if twin else math.inf]

        def step(idx_t):
            if left[0] <= 0:  # counted on the host: the graph's position lives on the device
                raise ValueError(f"graphed_step: the twin's context reached its block_size ({self.config.block_size});"
                                 f" decode slides a window past it")
            left[0] -= 1
            tok.copy_(idx_t)
            graph.replay()
            return logits.clone(), static
        step.weights = cast  # the graph reads these copies: they live as long as step
        return step

    @torch.no_grad()
    def decode(self, idx, max_new_tokens, temperature=1.0, top_k=None, n_vocab=None, want_s=False, graph=True,
               compile=False):
        """THE decoding loop (generate, sample.py and bench.py all run it). Continues idx (B, T) and yields
        one Decoded(token (B,), s, state) per new token.

        Policies: temperature 0 is greedy, > 0 samples; top_k None or 0 keeps every token; n_vocab crops
        the logits to the real vocabulary (a padded vocabulary's extra ids are never emitted). The prompt
        goes through prefill (one parallel pass). Then each token goes through step, replayed as one CUDA
        graph when graphable() (under the caller's autocast dtype). The attention twin, past its
        block_size, recomputes a sliding window of its last block_size tokens for every new token.
        want_s: s is each layer's score s_t (B,) of the yielded token (MIPT), which costs one more step
        at the end; otherwise s is None. graph=False keeps eager steps even where a graph would apply;
        compile=True compiles the graphed step first (graphed_step), worth it for long generations.
        Decoded.state is the live decoding state (the graph's static one on a GPU), updated by later steps."""
        if self.config.n_classes:
            raise ValueError("decoding needs a language model; this model is a classifier (n_classes > 0)")
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 1, or 0/None for every token, got {top_k}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        n_vocab = n_vocab or self.config.vocab_size
        T = self.config.block_size
        window = self.config.mixer == 'attention'
        context = idx[:, -T:] if window else idx
        logits, state = self.prefill(context)
        context_len = context.shape[1]
        graphed = None
        if graph and self.graphable() and (max_new_tokens > 1 or want_s) and not (window and context_len >= T):
            amp = torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else None
            graphed = self.graphed_step(state, amp, compile)
        for i in range(max_new_tokens):
            logits = logits[:, :n_vocab].float()
            if temperature == 0:
                tok = logits.argmax(-1)                                               # (B,)
            else:
                logits = logits / temperature
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
                    logits[logits < v[:, [-1]]] = -math.inf
                tok = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)[:, 0]  # (B,)
            if i < max_new_tokens - 1 or want_s:
                if window:
                    context = torch.cat([context, tok[:, None]], 1)[:, -T:]
                if window and context_len + i >= T:   # the twin past its block: a sliding window
                    logits = self(context)[0][:, -1]
                else:
                    logits, state = graphed(tok) if graphed else self.step(tok, state)
            s = [st.s.clone() for st in state.layers] if want_s and self.config.mixer == 'mipt' else None
            yield Decoded(tok, s, state)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, n_vocab=None):
        """Continue idx (B, T) by max_new_tokens tokens: decode(), collected. Returns (B, T + max_new_tokens)."""
        new = [d.token[:, None] for d in self.decode(idx, max_new_tokens, temperature, top_k, n_vocab)]
        return torch.cat([idx] + new, dim=1)


# -----------------------------------------------------------------------------
# Appendix: the fused CUDA scan (kernels.cu). It computes p, a and b in registers from the raw
# projections, scans in fp32 with a single-pass chunked look-back, writes only y and the chunk-boundary
# states, and runs the reverse scan with conjugated gates for the gradients. Compiled on first use;
# without a GPU or a compiler, mipt_recurrence falls back to the PyTorch scan.


FWD_TILE = (8, 8)
BWD_TILE = (8, 8)
# Persistent grid size; 0 = as many blocks as are resident at once (occupancy x SMs).
MAX_BLOCKS = 0
# Debug hook for tests: when True, every output buffer is filled with NaN before the kernel
# runs, so an element the kernel fails to write shows up as NaN.
POISON_OUTPUTS = False

_KERNELS = None
_LOAD_TRIED = False


def load_kernels(verbose: bool = False):
    """Compile (once) and load kernels.cu; return the module, or None with a warning."""
    global _KERNELS, _LOAD_TRIED
    if _KERNELS is not None or _LOAD_TRIED:
        return _KERNELS
    _LOAD_TRIED = True
    if not torch.cuda.is_available():
        warnings.warn("mipt CUDA scan unavailable: no CUDA device", RuntimeWarning, stacklevel=2)
        return None
    try:
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("no CUDA toolkit (nvcc) found")
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cu")
        build = os.environ.get("MIPT_BUILD_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "mipt_kernels"
        )
        os.makedirs(build, exist_ok=True)
        _KERNELS = cpp_extension.load(
            name="mipt_kernels",
            sources=[src],
            build_directory=build,
            extra_cflags=["-O3"],
            extra_cuda_cflags=[
                "-O3",
                "-std=c++17",
                "-gencode=arch=compute_90a,code=sm_90a",
                "-gencode=arch=compute_80,code=compute_80",
                "--split-compile=0",
                "--threads=2",
                "-lineinfo",
            ],
            verbose=verbose,
        )
    except Exception as exc:  # no compiler, build failure, ...
        warnings.warn(f"mipt CUDA scan unavailable: {exc}", RuntimeWarning, stacklevel=2)
        _KERNELS = None
    return _KERNELS


def _out(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _state_as_real(h, B, D, device):
    """complex (B, D) -> contiguous float32 (B, D, 2); None -> empty tensor."""
    if h is None:
        return torch.empty(0, dtype=torch.float32, device=device)
    h = h.to(device=device, dtype=torch.complex64).resolve_conj().contiguous()
    assert h.shape == (B, D), f"state must be (B, D) = {(B, D)}, got {tuple(h.shape)}"
    return torch.view_as_real(h).contiguous()


class MIPTScanCUDA(torch.autograd.Function):
    """forward(logit, theta, u_re, u_im, h0) -> (y float32 (B,T,D), h_last complex64 (B,D))."""

    @staticmethod
    def forward(ctx, logit, theta, u_re, u_im, h0=None):
        mod = load_kernels()
        if mod is None:
            raise RuntimeError("mipt CUDA scan kernels are not available")
        if logit.dim() != 3:
            raise ValueError("inputs must be (B, T, D)")
        dtype = logit.dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"inputs must be float32 or bfloat16, got {dtype}")
        for x in (theta, u_re, u_im):
            if x.shape != logit.shape or x.dtype != dtype or x.device != logit.device:
                raise ValueError("logit, theta, u_re, u_im must share shape, dtype and device")
        logit, theta, u_re, u_im = (x.contiguous() for x in (logit, theta, u_re, u_im))
        B, T, D = logit.shape
        dev = logit.device
        h0r = _state_as_real(h0, B, D, dev)
        y = _out((B, T, D), torch.float32, dev)
        hl = _out((B, D, 2), torch.float32, dev)
        if T == 0:
            hl.copy_(h0r if h0 is not None else torch.zeros_like(hl))
            ckpt = torch.empty(0, device=dev)
        else:
            ckpt = mod.fwd(logit, theta, u_re, u_im, h0r, y, hl, *FWD_TILE, MAX_BLOCKS)
        ctx.save_for_backward(logit, theta, u_re, u_im, h0r, ckpt)
        ctx.fwd_tile = FWD_TILE
        ctx.has_h0 = h0 is not None
        ctx.h0_dtype = h0.dtype if h0 is not None else None
        return y, torch.view_as_complex(hl)

    @staticmethod
    def backward(ctx, gy, ghl):
        logit, theta, u_re, u_im, h0r, ckpt = ctx.saved_tensors
        B, T, D = logit.shape
        dev = logit.device
        if gy is None:
            gy = torch.zeros((B, T, D), dtype=torch.float32, device=dev)
        gy = gy.to(torch.float32).contiguous()
        ghlr = _state_as_real(ghl, B, D, dev)
        gl, gt, gr, gi = (_out((B, T, D), logit.dtype, dev) for _ in range(4))
        gh0 = _out((B, D, 2), torch.float32, dev)
        if T == 0:
            gh0.copy_(ghlr if ghl is not None else torch.zeros_like(gh0))
        else:
            mod = load_kernels()
            mod.bwd(logit, theta, u_re, u_im, gy, h0r, ghlr, ckpt, *ctx.fwd_tile,
                    gl, gt, gr, gi, gh0, *_bwd_tile(ctx.fwd_tile), MAX_BLOCKS)
        gh0c = None
        if ctx.has_h0 and ctx.needs_input_grad[4]:
            gh0c = torch.view_as_complex(gh0)
            if not ctx.h0_dtype.is_complex:
                gh0c = gh0c.real
            gh0c = gh0c.to(ctx.h0_dtype)
        return gl, gt, gr, gi, gh0c


def _bwd_tile(fwd_tile):
    S, L = BWD_TILE
    if (S * L) % (fwd_tile[0] * fwd_tile[1]) != 0:
        return fwd_tile
    return BWD_TILE


# -----------------------------------------------------------------------------
# Appendix: the fused cache read-out (cache_kernel.py, Triton). cache_impl='auto' uses it for tensors on
# a GPU when Triton is installed; 'triton' insists (and runs on the CPU under TRITON_INTERPRET=1).


_CACHE_KERNEL = None


def _cache_kernel():
    """cache_kernel.py, beside this file, imported once."""
    global _CACHE_KERNEL
    if _CACHE_KERNEL is None:
        import importlib.util
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache_kernel.py")
        spec = importlib.util.spec_from_file_location("mipt_cache_kernel", path)
        _CACHE_KERNEL = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_CACHE_KERNEL)
    return _CACHE_KERNEL


_FUSED = {}


def _use_fused_cache(impl, device):
    """Whether the read-out runs fused (decided once per setting and device type)."""
    if (impl, device.type) not in _FUSED:
        _FUSED[impl, device.type] = _fused_available(impl, device)
    return _FUSED[impl, device.type]


def _fused_available(impl, device):
    if impl == 'torch':
        return False
    ck = _cache_kernel()
    if impl == 'auto':
        return device.type == 'cuda' and ck.triton is not None
    if not ck.available(device):
        raise RuntimeError(f"cache_impl='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
                           f"got {device.type}{'' if ck.triton else ' without Triton'}")
    return True


def cache_attention_fused(q, k, v, log_s, end, cand, null_k, null_v, L):
    return _cache_kernel().CacheAttention.apply(q, k, v, log_s, end, cand, null_k, null_v, L)


# The plan's sorts and small tensors cost more in kernel launches than in work: on the fused path it is
# compiled once per shape and replayed as a CUDA graph (COMPILE_PLAN: a torch.compile mode, or None: eager).
COMPILE_PLAN = 'reduce-overhead'
_PLANS = {}


def cache_plan_compiled(s, K, tau, L, R, noise):
    if COMPILE_PLAN is None or s.device.type != 'cuda':
        return cache_plan(s, K, tau, L, R, noise)
    if COMPILE_PLAN not in _PLANS:
        _allow_recompiles()
        _PLANS[COMPILE_PLAN] = torch.compile(cache_plan, mode=COMPILE_PLAN, dynamic=False)
    return tuple(t.clone() for t in _PLANS[COMPILE_PLAN](s, K, tau, L, R, noise))   # graphs reuse outputs


# -----------------------------------------------------------------------------
# Appendix: compiling and capturing. graphed_step (and the cache's compiled plan) use these.


@contextlib.contextmanager
def linears_cast(model, dtype):
    """Within: every nn.Linear of model holds its float32 weight and bias cast to dtype (bf16 or fp16), as autocast
    casts them on every call: the same rounding, so the same function. graphed_step captures within it, so that a
    replay reads these copies instead of casting every weight again each token (a third of a batch-1 step, the tied
    head's 100k x D weight above all). Yields the copies, which whoever replays the graph must keep alive."""
    low = dtype in (torch.bfloat16, torch.float16)
    todo = [(m, name, p) for m in model.modules() if low and isinstance(m, nn.Linear)
            for name, p in m._parameters.items() if p is not None and p.dtype == torch.float32]
    swapped = []
    try:  # a cast that fails part way (out of memory) still puts back those before it
        for m, name, p in todo:
            cast = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            swapped.append((m, name, p))
            m._parameters[name] = cast
        yield [m._parameters[name] for m, name, _ in swapped]
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def _allow_recompiles():
    """One compiled graph per shape (and per model, for graphed_step): allow 64, not torch's default 8
    (the setting's name changed in torch 2.7)."""
    import torch._dynamo
    cfg = torch._dynamo.config
    name = 'recompile_limit' if hasattr(cfg, 'recompile_limit') else 'cache_size_limit'
    setattr(cfg, name, max(getattr(cfg, name), 64))
