"""
engine.py: fast decoding of a mipt model (after nanochat's engine.py).

    import engine
    for d in engine.decode(model, idx, max_new_tokens, temperature=0.8, top_k=200):   # THE decoding loop
        d.token                   # (B,) the new token; d.s each layer's score s_t (want_s=True); d.state
    step = engine.graphed_step(model, state)   # model.step as one CUDA graph replay: step(idx_t) -> (logits, state)

mipt.py defines what a step computes (model.prefill, model.step) and the sampling policy (mipt.sample); its
generate() is the plain eager loop. This file makes decoding fast and complete: a prompt goes through prefill,
every new token through step, replayed as one CUDA graph on a GPU (eager batch-1 decoding is bound by kernel
launches), optionally torch.compile'd before capture; the Transformer twin keeps its keys and values in a static
cache preallocated to block_size and slides a window past it. sample.py and bench.py decode through here.
"""

import contextlib
import math
from collections import namedtuple
from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from kernels import allow_recompiles
from mipt import DecodeState, KVCache, State, check_decoding, sample

Decoded = namedtuple('Decoded', 'token s state')  # what decode() yields for every new token


@torch.no_grad()
def decode(model, idx, max_new_tokens, temperature=1.0, top_k=None, n_vocab=None, want_s=False, graph=True,
           compile=False):
    """THE decoding loop. Continues idx (B, T) and yields one Decoded(token (B,), s, state) per new token.

    Policies (mipt.sample): temperature 0 is greedy, > 0 samples; top_k None or 0 keeps every token; n_vocab crops
    the logits to the real vocabulary (a padded vocabulary's extra ids are never emitted). The prompt goes through
    prefill (one parallel pass). Then each token goes through step, replayed as one CUDA graph when graphable(model)
    (under the caller's autocast dtype). The attention twin, past its block_size, recomputes a sliding window of its
    last block_size tokens for every new token. want_s: s is each layer's score s_t (B,) of the yielded token (MIPT),
    which costs one more step at the end; otherwise s is None. graph=False keeps eager steps even where a graph would
    apply; compile=True compiles the graphed step first (graphed_step), worth it for long generations.
    Decoded.state is the live decoding state (the graph's static one on a GPU), updated by later steps."""
    config = model.config
    check_decoding(config, max_new_tokens, temperature, top_k)
    n_vocab = n_vocab or config.vocab_size
    T = config.block_size
    window = config.mixer == 'attention'
    context = idx[:, -T:] if window else idx
    logits, state = model.prefill(context)
    context_len = context.shape[1]
    graphed = None
    if graph and graphable(model) and (max_new_tokens > 1 or want_s) and not (window and context_len >= T):
        amp = torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else None
        graphed = graphed_step(model, state, amp, compile)
    for i in range(max_new_tokens):
        tok = sample(logits[:, :n_vocab], temperature, top_k)                          # (B,)
        if i < max_new_tokens - 1 or want_s:
            if window:
                context = torch.cat([context, tok[:, None]], 1)[:, -T:]
            if window and context_len + i >= T:   # the twin past its block: a sliding window
                logits = model(context)[0][:, -1]
            else:
                logits, state = graphed(tok) if graphed else model.step(tok, state)
        s = [st.s.clone() for st in state.layers] if want_s and config.mixer == 'mipt' else None
        yield Decoded(tok, s, state)


# -----------------------------------------------------------------------------
# One step as a CUDA graph


def graph_blocker(model):
    """Why graphed_step cannot decode this model, or None: it needs MIPT with a finite cache or the twin (whose KV
    cache is then preallocated to block_size), on a GPU, in eval mode."""
    if model.config.mixer == 'mipt' and model.config.K is None:
        return "graphed_step needs a finite cache (a growing one cannot be graphed)"
    if not model.wte.weight.is_cuda:
        return "graphed_step needs the model on a CUDA device"
    if model.training:
        return "graphed_step needs an eval-mode model (no dropout)"
    return None


def graphable(model):
    """Whether graphed_step can decode this model (see graph_blocker)."""
    return graph_blocker(model) is None


def graphed_step(model, state, dtype=None, compile=False):
    """model.step as one CUDA graph replay, for decoding on a GPU. Returns a function idx_t (B,) -> (logits, state)
    that continues from `state`; the state it returns is held in static tensors, updated in place by every call (keep
    stepping it through the returned function, not through model.step). MIPT with a finite cache, or the twin (see
    graph_blocker). dtype: the autocast dtype to decode in (None: the weights' dtype), with the Linear weights cast
    to it once (linears_cast): the graph then reads that snapshot, not later changes to the weights (decode builds
    a graph per call). compile: torch.compile the step before capturing it (fewer, fused kernels per token;
    seconds of compilation first)."""
    if graph_blocker(model):
        raise ValueError(graph_blocker(model))
    dev = model.wte.weight.device
    block_size = model.config.block_size
    twin = model.config.mixer == 'attention'
    if twin:  # the twin's cache, preallocated to its block size (fresh tensors, written in place uncloned)
        if state.pos >= block_size:
            raise ValueError(f"graphed_step: the twin's context ({state.pos}) already fills its block_size "
                             f"({block_size})")
        state = DecodeState(layers=[to_static(st, block_size) for st in state.layers], pos=state.pos,
                            pooled=state.pooled)
    kv = {id(t) for st in state.layers if isinstance(st, StaticKVCache) for t in (st.k, st.v)}
    static = map_state(state, lambda t: t.to(dev) if id(t) in kv else t.to(dev).clone())
    static.pos = torch.as_tensor(state.pos, device=dev).clone()  # a tensor, so that it is not baked in
    tok = torch.zeros(static.batch_size, dtype=torch.long, device=dev)
    ctx = torch.autocast('cuda', dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()

    def step_fn(idx_t, st):
        return step_into(model, idx_t, st)
    if compile:  # the copies into the static state compile with the step, so they fuse into its kernels
        allow_recompiles()
        step_fn = torch.compile(step_fn, dynamic=False)

    def run():
        with torch.no_grad(), ctx:
            return step_fn(tok, static)

    # to undo each warm-up step; not the static KV cache, whose warm-up write lies at position pos, masked
    # until the first real step overwrites it (one copy of the largest state, not two)
    saved = map_state(static, lambda t: t if id(t) in kv else t.clone())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(dev), linears_cast(model, dtype) as cast:  # Linear weights cast once, not per token
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside the graph (kernel loading, workspaces)
            for _ in range(2):
                run()
                copy_state_(static, saved)  # undone each time: both stay at pos (< block_size for the twin)
        torch.cuda.current_stream(dev).wait_stream(side)
        with torch.cuda.graph(graph, stream=side):
            logits = run()

    left = [block_size - state.pos if twin else math.inf]

    def step(idx_t):
        if left[0] <= 0:  # counted on the host: the graph's position lives on the device
            raise ValueError(f"graphed_step: the twin's context reached its block_size ({block_size});"
                             f" decode slides a window past it")
        left[0] -= 1
        tok.copy_(idx_t)
        graph.replay()
        return logits.clone(), static
    step.weights = cast  # the graph reads these copies: they live as long as step
    return step


def step_into(model, idx_t, state):
    """model.step, with the new state written into state's own tensors (what graphed_step captures: a graph reads
    and writes fixed memory). state.pos must be a tensor. Returns the logits."""
    if not torch.is_tensor(state.pos):
        raise ValueError("step_into advances state.pos in place: it must be a tensor (use model.step for an int)")
    logits, new = model.step(idx_t, map_state(state, lambda t: t))  # a shallow copy: step rebinds its fields
    copy_state_(state, new)
    return logits


def map_state(state, fn):
    """A new state (a mipt.State) of the same structure with fn applied to every tensor."""
    def m(x):
        return fn(x) if torch.is_tensor(x) else map_state(x, fn) if isinstance(x, State) else x
    return type(state)(**{f.name: ([m(x) for x in v] if isinstance(v := getattr(state, f.name), list) else m(v))
                          for f in fields(state)})


def copy_state_(dst, src):
    """Copy src's tensors into dst's tensors, in place (shapes must match; a tensor that src shares with dst, e.g.
    a static KV cache written in place, is left as it is). Returns dst."""
    for d, s in zip(list(dst.tensors()), list(src.tensors()), strict=True):
        if d is not s:
            d.copy_(s)
    return dst


@dataclass
class StaticKVCache(KVCache):
    """The twin's KVCache in fixed (B, H, capacity, hd) tensors: positions < pos are filled, a step writes position
    pos in place and masks the later ones."""

    def append(self, k, v, pos):
        at = torch.as_tensor(pos, device=k.device).view(1)
        self.k.index_copy_(2, at, k.to(self.k.dtype))
        self.v.index_copy_(2, at, v.to(self.v.dtype))
        return self, torch.arange(self.k.shape[2], device=k.device) > at                     # (capacity,)


def to_static(cache, capacity):
    """A KVCache's keys and values in a StaticKVCache of `capacity` positions, for a CUDA graph."""
    B, H, t, hd = cache.k.shape
    if t > capacity:
        raise ValueError(f"a static KV cache of {capacity} positions cannot hold {t}")
    k, v = (torch.zeros(B, H, capacity, hd, device=x.device, dtype=x.dtype) for x in (cache.k, cache.v))
    k[:, :, :t], v[:, :, :t] = cache.k, cache.v
    return StaticKVCache(k=k, v=v)


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
