"""
Benchmarks on one GPU, in one process. Writes results/bench.json and results/bench.md.

    python bench.py                          # every section; meant to fit 9 minutes on an H200 (see budget_s)
    python bench.py --sections=scan,train    # some of: copy, scan, train, decode, memory, mixers, batchdecode, trainmix
    python bench.py --quick=True             # one shape per section, a smoke test (writes to out-bench-quick/)
    python bench.py --trainmix_compile=True  # trainmix with every block torch.compile'd, in both models alike

Options (--key=value, read as train.py reads its own; --help lists them): sections, out_dir, reps, quick, budget_s,
trainmix_compile, mixer_shapes, mixer_peers, batchdecode_batch, batchdecode_context, decode_tokens_n, trainmix_T.
budget_s (default 520): a cell that would start later than this many seconds into the run is skipped and marked
'skipped' (0 = no limit), so that the run ends, saves and prints its tables inside a 10-minute slot.

Sections
    copy    device-to-device copy bandwidth: the memory ceiling every byte floor below divides by
    scan    the MIPT recurrence alone, forward and forward+backward, (B, D, T) in SCAN_SHAPES:
            the Python loop (scan_ref), the PyTorch chunked scan, accelerated_scan.complex (if installed),
            the fused kernel, and the byte floor of each
    train   one LM training step at T = 2k and 8k (AdamW, bf16 autocast), MIPT (K=64) against the SDPA twin and
            the naive-attention twin, ~31M parameters with cl100k_base, tokens/s and peak memory; also the
            twin with no mixer at all (embedding, FFNs, head), the floor under any mixer's step
    decode  batch-1 decoding after 1k and 64k tokens of context: tokens/s and memory (MIPT eager and
            through one CUDA graph per token, engine.graphed_step)
    memory  peak training memory of the paper's classification model (d=128, 2 layers) against N; MIPT also with
            recompute=True (each MIPT layer's forward replayed in backward)
    mixers  one mixer layer alone, forward and forward+backward under bf16 autocast, D=1024, 8 heads, (B, T) in
            mixer_shapes (2x8192, 8x2048, 1x32768: 16,384 tokens at 8k and 2k, one row at 32k): MIPT K=0 and K=64
            (mipt.MIPTLayer), SDPA attention (mipt.SelfAttention) and, when flash-linear-attention is installed,
            its HGRN, GLA, Mamba2 and Gated DeltaNet (peers.py; each warmed up, i.e. autotuned, per shape before
            timing). ms, tokens/s, peak GB and each layer's decoding state per sequence. Where fla refuses a
            peer's backward (Hopper with Triton < 3.7.1: Mamba2, Gated DeltaNet), its row is skipped with a note
    batchdecode  decoding tokens/s at batch 1, 16, 128 after 8k and 64k tokens of context, the LM of `decode`:
            MIPT K=64 against the Transformer twin (a KV cache preallocated to its block size), both through one
            CUDA graph per token (engine.decode), and at batch 1 both again with the step compiled before capture
            (engine.decode(compile=True)). One random context is given to every row and prefilled at that batch:
            decoding costs the same whatever the rows hold. A twin whose KV cache would pass 100 GB is skipped
            unallocated
    trainmix  the train step where the mixer dominates: D=1024, 8 layers, 8 heads, an 8,192-word vocabulary,
            T = 8k and 32k (16,384 tokens per step, at least one row), MIPT K=64 against the SDPA twin and the
            no-mixer floor; trainmix_compile=True compiles every block of every model alike

Targets (bench.json 'targets', each {measured, goal, met}): fused_fwd_over_floor <= 1.3 and
fused_fwdbwd_over_floor <= 1.4 (scan, 8x1024x8192), fused_fwdbwd_peak_GB <= 2.5, train_T2048_mipt_over_sdpa_tokens_per_s
>= 1 (train), memory_mipt_over_sdpa_max <= 1 (memory, worst N; the recompute=True model when measured), decode_state_relative_spread <= 0.01 (decode),
cache_over_recurrence_fwdbwd <= 1 ((K64 - K0) / K0 fwd+bwd, mixers, worst shape), mipt_over_best_peer_T8192 >= 1
(mixers, tokens/s at 2x8192 against the fastest fla peer), decode_B128_64k_mipt_over_attention >= 5 and
decode_B1_graphed_tokens_per_s >= 3000 (batchdecode, worst context, the better MIPT variant),
train_mixerbound_T8192_mipt_over_sdpa >= 1.5 (trainmix, with the no-mixer ceiling beside it).

Optional peers (rows skipped when missing): flash-linear-attention for `mixers` (peers.py) and accelerated-scan
for `scan`. Offline, from the wheels in .whl/:
    pip install --no-index --no-deps --find-links .whl fla-core flash-linear-attention accelerated-scan

fla's Triton kernels autotune on their first call (GLA's for minutes on an H200), which a 10-minute slot cannot
afford. Triton keeps each autotune result in its cache, so warm it once per machine and keep it:
    export TRITON_CACHE_DIR=$PWD/.tcache && python bench.py --sections=mixers --out_dir=/tmp/warm && python bench.py

Every section saves results/bench.json when it ends; a cell that runs out of GPU memory is recorded as 'OOM'
and the run goes on. Timings: CUDA events after warm-up, medians, random inputs (never zeros).
"""

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

import engine
import mipt
import runs
from checkpoint import die
from configurator import configure
from mipt import MIPT, MIPTConfig

# -----------------------------------------------------------------------------
sections = 'copy,scan,train,decode,memory,mixers,batchdecode,trainmix'
out_dir = 'results'
reps = 20
quick = False                  # one shape per section (and reps=5), written to out-bench-quick/ unless out_dir is given
budget_s = 520.0               # skip cells that would start after this many seconds (0: no limit)
SCAN_SHAPES = [(8, 1024, 2048), (8, 1024, 8192), (1, 1024, 65536)]  # (B, D, T)
TRAIN_T = [2048, 8192]          # the target is at 2048; 512 and 16384 left out to fit the 9-minute run
TRAIN_TOKENS = 16384           # tokens per training step, B = TRAIN_TOKENS // T
DECODE_CONTEXT = [1024, 65536]
MEMORY_N = [512, 1024, 2048, 4096, 8192, 16384]
MEMORY_BATCH = 8
MIXER_D = 1024
MIXER_HEADS = 8
mixer_shapes = '2x8192,8x2048,1x32768'  # BxT: T = 8192, 2048, 32768; 2x8192 first (a target needs it)
mixer_peers = 'hgrn,gla,mamba2,gated_deltanet'         # fla peers (peers.py), when installed
batchdecode_batch = '1,16,128'
batchdecode_context = '8192,65536'
decode_tokens_n = 64           # tokens decoded per row in batchdecode
KV_LIMIT_BYTES = 100e9         # batchdecode: skip a Transformer cell whose KV cache would pass this
trainmix_T = '8192,32768'
TRAINMIX_TOKENS = 16384
TRAINMIX_VOCAB = 8192
trainmix_compile = False
SECTIONS = ('copy', 'scan', 'train', 'decode', 'memory', 'mixers', 'batchdecode', 'trainmix')
OPTIONS = ('sections', 'out_dir', 'reps', 'quick', 'budget_s', 'trainmix_compile', 'mixer_shapes', 'mixer_peers',
           'batchdecode_batch', 'batchdecode_context', 'decode_tokens_n', 'trainmix_T')
# -----------------------------------------------------------------------------


def parse_args(argv=None):
    """The options above from config files and --key=value flags (configurator.configure; a bad one is one line
    `error: ...` and exit 2; bools take True/False); --quick=True then shrinks every option it was not given."""
    g = globals()
    defaults = {k: g[k] for k in OPTIONS}
    configure(g, OPTIONS, argv, doc=__doc__)
    unknown = [s for s in g['sections'].split(',') if s not in SECTIONS]
    if unknown:
        die(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}", 2)
    if g['quick']:
        g.update(SCAN_SHAPES=[(8, 1024, 2048)], TRAIN_T=[2048], DECODE_CONTEXT=[1024], MEMORY_N=[1024])
        for key, val in [('reps', 5), ('out_dir', 'out-bench-quick'), ('mixer_shapes', '2x8192'),
                         ('batchdecode_batch', '16'), ('batchdecode_context', '8192'), ('trainmix_T', '8192'),
                         ('decode_tokens_n', 16)]:
            if g[key] == defaults[key]:
                g[key] = val


def ints(text):
    return [int(v) for v in str(text).split(',') if v.strip()]


def shapes(text):
    """'8x2048,2x8192' -> [(8, 2048), (2, 8192)]"""
    return [tuple(int(v) for v in item.lower().split('x')) for item in text.split(',') if item.strip()]


_T0 = time.perf_counter()
_RES = {}              # the results of the run so far, saved as cells finish
_SECTION = None        # the section now running
_LAST_SAVE = 0.0


def section_rows():
    """The running section's list of rows, placed in the results at once so that checkpoint() saves them."""
    rows = []
    if _SECTION is not None:
        _RES[_SECTION] = rows
    return rows


def checkpoint(every_s=15.0):
    """Save the results so far (at most every every_s seconds), so that a run cut off mid-section keeps them."""
    global _LAST_SAVE
    if _RES and time.perf_counter() - _LAST_SAVE > every_s:
        save(_RES)
        _LAST_SAVE = time.perf_counter()


def over_budget():
    return budget_s > 0 and time.perf_counter() - _T0 > budget_s


def cleanup():
    gc.collect()
    torch.cuda.empty_cache()


def timed(fn, n=None):
    """Median milliseconds of fn() over n runs after warm-up, with CUDA events."""
    n = n or reps
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def peak(fn):
    """Peak bytes allocated while fn() runs, beyond what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def oom_guard(fn):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        cleanup()
        return 'OOM'


def cell(row, fields, fn):
    """Run one measurement cell into row: 'skipped' past the time budget, 'OOM' when out of GPU memory,
    'error' (with the message in row['error']) on any other failure, so that the section goes on."""
    if over_budget():
        row.update({f: 'skipped' for f in fields})
        row['note'] = 'time budget'
        return
    try:
        fn()
    except torch.cuda.OutOfMemoryError:
        row.update({f: 'OOM' for f in fields if not isinstance(row.get(f), float)})
    except Exception as exc:  # a kernel that fails to compile, a missing feature: record it, go on
        row.update({f: 'error' for f in fields if not isinstance(row.get(f), float)})
        row['error'] = f'{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ""}'
        print(f"!! {row}", flush=True)
    finally:
        cleanup()
        checkpoint()


def bench_copy():
    x = torch.randn(256 * 2**20, device='cuda')  # 1 GiB
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x))
    return {'bytes': 2 * x.numel() * 4, 'ms': ms, 'GBps': 2 * x.numel() * 4 / ms / 1e6}


def scan_inputs(B, T, D, requires_grad=False):
    g = torch.Generator(device='cuda').manual_seed(B + T + D)
    xs = [torch.randn(B, T, D, device='cuda', generator=g) for _ in range(4)]
    xs[0] = xs[0] - 2.0  # logits around p = 0.12
    return [x.requires_grad_(requires_grad) for x in xs]


def bench_scan(bw):
    rows = section_rows()
    try:
        from accelerated_scan.complex import scan as acc_scan
    except ImportError:
        acc_scan = None
        print('accelerated_scan not installed: its rows are skipped')
    for B, D, T in SCAN_SHAPES:
        n = B * T * D
        row = {'B': B, 'D': D, 'T': T}
        if over_budget():
            row['note'] = 'skipped: time budget'
            rows.append(row)
            continue
        xs = scan_inputs(B, T, D)
        dy = torch.randn(B, T, D, device='cuda')

        def fused(xs, impl):
            return mipt.mipt_recurrence(*xs, impl=impl)[0]

        def fwd_bwd(impl):
            xg = [x.detach().requires_grad_() for x in xs]
            fused(xg, impl).backward(dy)

        with torch.no_grad():
            row['kernel_fwd_ms'] = timed(lambda: fused(xs, 'cuda'))
            row['torch_fwd_ms'] = timed(lambda: fused(xs, 'torch'), n=5)
        row['kernel_fwdbwd_ms'] = timed(lambda: fwd_bwd('cuda'))
        row['torch_fwdbwd_ms'] = oom_guard(lambda: timed(lambda: fwd_bwd('torch'), n=5))
        row['kernel_fwdbwd_peak_GB'] = peak(lambda: fwd_bwd('cuda')) / 1e9
        # byte floors: forward reads logit, theta, u_re, u_im and writes y (20 B per element);
        # backward also reads dy and the four inputs again and writes four gradients (36 B more)
        row['kernel_fwd_floor_ms'] = 20 * n / bw * 1e3
        row['kernel_fwdbwd_floor_ms'] = (20 + 36) * n / bw * 1e3
        if T <= 8192:
            p = torch.sigmoid(xs[0])
            a = torch.polar(1 - p, xs[1])
            b = p * torch.complex(xs[2], xs[3])
            row['loop_fwd_ms'] = timed(lambda: mipt.scan_ref(a, b), n=3)
        if acc_scan is not None:
            row.update(bench_accelerated_scan(acc_scan, xs, dy, B, T, D, bw))
        rows.append(row)
        print(row, flush=True)
        xs = dy = None
        cleanup()
    return rows


def bench_accelerated_scan(acc_scan, xs, dy, B, T, D, bw):
    """The closest public peer. It scans (B, D, T) complex tensors; a user must build a and b."""
    n = B * T * D
    out = {}

    def end_to_end(xs):
        p = torch.sigmoid(xs[0])
        a = torch.polar(1 - p, xs[1]).transpose(1, 2).contiguous()           # (B, D, T)
        b = (p * torch.complex(xs[2], xs[3])).transpose(1, 2).contiguous()
        return acc_scan(a, b).real.transpose(1, 2)                           # (B, T, D)

    def e2e_fwd_bwd():
        xg = [x.detach().requires_grad_() for x in xs]
        end_to_end(xg).backward(dy)

    with torch.no_grad():
        p = torch.sigmoid(xs[0])
        a = torch.polar(1 - p, xs[1]).transpose(1, 2).contiguous()
        b = (p * torch.complex(xs[2], xs[3])).transpose(1, 2).contiguous()
        out['accscan_fwd_ms'] = timed(lambda: acc_scan(a, b))
        out['accscan_e2e_fwd_ms'] = timed(lambda: end_to_end(xs))
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
    gh = torch.randn_like(a)

    def scan_fwd_bwd():
        acc_scan(ag, bg).backward(gh)

    out['accscan_fwdbwd_ms'] = timed(scan_fwd_bwd)
    out['accscan_e2e_fwdbwd_ms'] = timed(e2e_fwd_bwd)
    out['accscan_e2e_fwdbwd_peak_GB'] = peak(e2e_fwd_bwd) / 1e9
    out['accscan_fwd_floor_ms'] = 24 * n / bw * 1e3  # read a, b (8 B each), write h (8 B)
    return out


def lm_config(mixer, T, attn_impl='sdpa'):
    """~31M parameters with cl100k_base (vocab padded to 100,352): 4 layers, 256 wide."""
    return MIPTConfig(vocab_size=100352, block_size=T, n_layer=4, n_embd=256, n_head=4,
                      mixer=mixer, attn_impl=attn_impl, cache_size=64 if mixer == 'mipt' else 0)


class NoMixer(torch.nn.Module):
    """Stands in for the mixer of every block: the step of the rest of the model, a floor for any mixer."""

    def forward(self, x, want_state=False):
        return x, None, None


def train_row(row, model, B, T, vocab):
    """Time one AdamW step of model on (B, T) random tokens under bf16 autocast into row."""
    opt = runs.optimizer(model, 0.1, 3e-4, (0.9, 0.95), 'cuda')
    idx = torch.randint(0, vocab, (B, T + 1), device='cuda')

    def train_step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        row['ms'] = timed(train_step, n=5)
        row['tokens_per_s'] = B * T / row['ms'] * 1e3
        row['peak_GB'] = peak(train_step) / 1e9
    finally:
        opt.zero_grad(set_to_none=True)


def bench_train():
    rows = section_rows()
    for T in TRAIN_T:
        B = max(1, TRAIN_TOKENS // T)
        for name, mixer, impl in [('mipt_K64', 'mipt', 'sdpa'), ('attention_sdpa', 'attention', 'sdpa'),
                                  ('attention_naive', 'attention', 'naive'), ('no_mixer', 'attention', 'sdpa')]:
            row = {'T': T, 'B': B, 'model': name}

            def run():
                model = MIPT(lm_config(mixer, T, impl)).cuda()
                if name == 'no_mixer':
                    for block in model.blocks:
                        block.mix = NoMixer()
                row['params'] = runs.num_params(model, non_embedding=False)
                train_row(row, model, B, T, 100277)
            cell(row, ('ms', 'tokens_per_s', 'peak_GB'), run)
            rows.append(row)
            print(row, flush=True)
    return rows


def bench_trainmix():
    """The train step at D=1024, 8 layers and a small vocabulary, so that the mixer dominates it."""
    rows = section_rows()
    for T in ints(trainmix_T):
        B = max(1, TRAINMIX_TOKENS // T)
        for name, mixer in [('mipt_K64', 'mipt'), ('attention_sdpa', 'attention'), ('no_mixer', 'attention')]:
            row = {'T': T, 'B': B, 'model': name, 'compiled': trainmix_compile}

            def run():
                cfg = MIPTConfig(vocab_size=TRAINMIX_VOCAB, block_size=T, n_layer=8, n_embd=1024, n_head=8,
                                 mixer=mixer, cache_size=64 if mixer == 'mipt' else 0)
                model = MIPT(cfg).cuda()
                if name == 'no_mixer':
                    for block in model.blocks:
                        block.mix = NoMixer()
                row['params'] = runs.num_params(model, non_embedding=False)
                if trainmix_compile:
                    for block in model.blocks:  # the same treatment for every model
                        block.compile()
                train_row(row, model, B, T, TRAINMIX_VOCAB)
            cell(row, ('ms', 'tokens_per_s', 'peak_GB'), run)
            rows.append(row)
            print(row, flush=True)
    return rows


# -----------------------------------------------------------------------------
# Decoding


def decode_tokens(model, prompt, n, batch=1, graph=True, compile=False):
    """n greedy tokens per row after prompt (1, T), copied to `batch` rows, through engine.decode (the one decoding
    loop: a parallel prefill, then one step per token, replayed as a CUDA graph when graph and the model allows
    it, compiled first when compile) under bf16 autocast. Returns (tokens (batch, n), seconds for n steps at
    the rate of the timed ones, decoding state bytes): the clock runs over the last n - 2 steps, after prefill,
    graph capture and two steps."""
    assert n >= 3, 'time at least one step after the first two'
    out, t0 = [], None
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        steps = engine.decode(model, prompt.expand(batch, -1), n, temperature=0, want_s=True, graph=graph,
                              compile=compile)
        for i, d in enumerate(steps):
            out.append(d.token)
            if i == 1:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    return torch.stack(out, 1), secs * n / (n - 2), MIPT.state_bytes(d.state)


def bench_decode():
    rows = section_rows()
    for ctx in DECODE_CONTEXT:
        for name, mixer in [('mipt_K64', 'mipt'), ('mipt_K64_graph', 'mipt'), ('attention_sdpa', 'attention')]:
            row = {'context': ctx, 'model': name}

            def run():
                model = MIPT(lm_config(mixer, ctx + 256)).cuda().eval()
                prompt = torch.randint(0, 100277, (1, ctx), device='cuda')
                _, secs, nbytes = decode_tokens(model, prompt, 64, graph=name.endswith('graph'))
                row['tokens_per_s'] = 64 / secs
                row['state_MB'] = nbytes / 1e6
            cell(row, ('tokens_per_s', 'state_MB'), run)
            rows.append(row)
            print(row, flush=True)
    return rows


def bench_batchdecode():
    """Decoding tokens/s against batch and context, the LM of bench_decode: MIPT K=64 against the Transformer twin
    (its KV cache preallocated to its block size), both through one CUDA graph per token; at batch 1 also with
    the step compiled before capture (engine.decode(compile=True)), for both alike."""
    rows = section_rows()
    n = decode_tokens_n
    for ctx in ints(batchdecode_context):
        for name, mixer in [('mipt_K64_graph', 'mipt'), ('attention_sdpa', 'attention'),
                            ('mipt_K64_graph_compiled', 'mipt'), ('attention_sdpa_compiled', 'attention')]:
            compiled = name.endswith('_compiled')
            for B in [b for b in ints(batchdecode_batch) if b == 1 or not compiled]:
                row = {'context': ctx, 'batch': B, 'model': name}
                cfg = lm_config(mixer, ctx + n + 8)
                if mixer == 'attention':  # the KV cache at the end, bf16: B x T x (k, v) x layers x D x 2 bytes
                    kv = B * (ctx + n + 2) * 2 * cfg.n_layer * cfg.n_embd * 2
                    row['state_MB'] = kv / 1e6
                    if kv > KV_LIMIT_BYTES:
                        row['tokens_per_s'] = row['ms_per_step'] = row['peak_GB'] = 'skipped'
                        row['note'] = f'KV cache {kv / 1e9:.0f} GB > {KV_LIMIT_BYTES / 1e9:.0f} GB, not allocated'
                        rows.append(row)
                        print(row, flush=True)
                        continue

                def run():
                    model = MIPT(cfg).cuda().eval()
                    prompt = torch.randint(0, 100277, (1, ctx), device='cuda')
                    row['graphed'] = engine.graphable(model)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    _, secs, nbytes = decode_tokens(model, prompt, n, batch=B, graph=True, compile=compiled)
                    row['tokens_per_s'] = B * n / secs
                    row['ms_per_step'] = secs / n * 1e3
                    row['state_MB'] = nbytes / 1e6
                    row['peak_GB'] = torch.cuda.max_memory_allocated() / 1e9
                cell(row, ('tokens_per_s', 'ms_per_step', 'peak_GB'), run)
                rows.append(row)
                print(row, flush=True)
    return rows


# -----------------------------------------------------------------------------
# One mixer layer alone


def mixer_layers():
    """[(name, build, state bytes per sequence at context T, impl)] for the mixers section."""
    D, H = MIXER_D, MIXER_HEADS

    def mipt_mixer(mixer, K):
        def build():  # initialised as in a model (p_init bias, small theta); one layer, a token vocabulary of 64
            cfg = MIPTConfig(vocab_size=64, block_size=65536, n_layer=1, n_embd=D, n_head=H, mixer=mixer,
                             cache_size=K)
            return MIPT(cfg).blocks[0].mix
        return build

    def mipt_state(K):
        layer = mipt.MIPTLayer(MIPTConfig(n_embd=D, n_head=H, cache_size=K))
        nbytes = MIPT.state_bytes(layer.init_state(1, 'cpu', torch.bfloat16))  # bf16 decoding, as in `decode`
        return lambda T: nbytes

    layers = [('mipt_K0', mipt_mixer('mipt', 0), mipt_state(0), 'mipt'),
              ('mipt_K64', mipt_mixer('mipt', 64), mipt_state(64), 'mipt'),
              ('attention_sdpa', mipt_mixer('attention', 0), lambda T: 2 * T * D * 2, 'sdpa')]  # bf16 K and V
    try:
        import peers
    except ImportError:
        peers = None
    want = [p for p in mixer_peers.split(',') if p]
    if peers is None or not peers.available():
        why = 'peers.py missing' if peers is None else peers._FLA_ERROR
        print(f"flash-linear-attention not importable ({why}): the fla peers' rows are skipped "
              f"(`{getattr(peers, 'INSTALL', 'pip install flash-linear-attention fla-core')}`)")
        return layers, None
    for name in want:
        if name not in peers.PEERS:
            die(f"unknown peer {name!r} in mixer_peers; peers: {', '.join(peers.PEERS)}", 2)
        nbytes = peers.state_bytes(name, D, H)
        layers.append((f'fla_{name}', lambda name=name: peers.make_mixer(name, D, H), lambda T, b=nbytes: b, 'fla'))
    return layers, peers


# fla peers whose training backward peers.py replaces on Hopper with Triton < 3.7.1 (peers.hopper_triton_bug):
# not timed there, since the substitute is a slow reference, not the peer's kernel
SUBSTITUTED = ('fla_mamba2', 'fla_gated_deltanet')


def bench_mixers():
    rows = section_rows()
    D = MIXER_D
    layers, peers = mixer_layers()
    built = {}
    warmed = set()
    for B, T in shapes(mixer_shapes):
        x = torch.randn(B, T, D, device='cuda', requires_grad=True)  # a LayerNorm's output: fp32 under autocast
        dys = {}
        for name, build, state, kind in layers:
            row = {'B': B, 'T': T, 'tokens': B * T, 'layer': name}

            if kind == 'fla' and name in SUBSTITUTED and peers.hopper_triton_bug():
                row.update(fwd_ms='skipped', fwdbwd_ms='skipped', tokens_per_s='skipped', peak_GB='skipped',
                           note=f"fla refuses this peer's backward here ({peers._substitute_note()}, fla #640); "
                                "the reference substitute that peers.py trains with says nothing about its speed")
                rows.append(row)
                print(row, flush=True)
                continue

            def run():
                if name not in built:
                    built[name] = build().cuda()
                layer = built[name]
                row['params'] = sum(p.numel() for p in layer.parameters())
                if hasattr(layer, 'impl'):
                    row['impl'] = layer.impl
                row['state_bytes'] = state(T)

                def fwd():
                    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
                        return layer(x)[0]

                def fwd_bwd():
                    x.grad = None
                    with torch.autocast('cuda', dtype=torch.bfloat16):
                        out = layer(x)[0]
                    dy = dys.get(out.dtype)
                    if dy is None:
                        dy = dys[out.dtype] = torch.randn(out.shape, device='cuda', dtype=out.dtype)
                    out.backward(dy)

                if (name, B, T) not in warmed:  # compile, autotune (fla: Triton, can take minutes), allocate
                    t0 = time.perf_counter()
                    if peers is not None and kind == 'fla':
                        peers.warmup(layer, B, T, D, 'cuda', torch.bfloat16)
                    fwd_bwd()
                    fwd()
                    torch.cuda.synchronize()
                    row['warmup_s'] = time.perf_counter() - t0
                    warmed.add((name, B, T))
                row['fwd_ms'] = timed(fwd)
                row['fwdbwd_ms'] = timed(fwd_bwd)
                row['tokens_per_s'] = B * T / row['fwdbwd_ms'] * 1e3
                layer.zero_grad(set_to_none=True)
                x.grad = None
                row['peak_GB'] = peak(fwd_bwd) / 1e9
                layer.zero_grad(set_to_none=True)
                x.grad = None
            cell(row, ('fwd_ms', 'fwdbwd_ms', 'tokens_per_s', 'peak_GB'), run)
            if name in built:
                built[name].zero_grad(set_to_none=True)
            x.grad = None
            rows.append(row)
            print(row, flush=True)
        x = dys = None
        cleanup()
    return rows


def bench_memory():
    """The paper's peak-memory figure: its classification model (d=128, 2 layers, K=16), batch MEMORY_BATCH."""
    rows = section_rows()
    for N in MEMORY_N:
        for name, mixer, impl in [('mipt_K16', 'mipt', 'sdpa'), ('mipt_K16_recompute', 'mipt', 'sdpa'),
                                  ('attention_sdpa', 'attention', 'sdpa'), ('attention_naive', 'attention', 'naive')]:
            row = {'N': N, 'model': name, 'batch': MEMORY_BATCH}

            def run():
                cfg = MIPTConfig(vocab_size=100352, block_size=N, n_layer=2, n_embd=128, n_head=4, mixer=mixer,
                                 attn_impl=impl, cache_size=16 if mixer == 'mipt' else 0, n_classes=4,
                                 recompute=name.endswith('recompute'))
                model = MIPT(cfg).cuda()
                idx = torch.randint(0, 100277, (MEMORY_BATCH, N), device='cuda')
                y = torch.randint(0, 4, (MEMORY_BATCH,), device='cuda')

                def step():
                    _, loss = model(idx, y)   # float32, as the paper's classifier
                    loss.backward()
                row['peak_MB'] = peak(step) / 1e6
            cell(row, ('peak_MB',), run)
            rows.append(row)
            print(row, flush=True)
    return rows


# -----------------------------------------------------------------------------
# Targets and tables


def target(measured, goal, higher_is_better=False, **extra):
    """One target: met is computed from measured alone (None when nothing was measured)."""
    met = None if measured is None else bool(measured >= goal if higher_is_better else measured <= goal)
    return {'measured': measured, 'goal': goal, 'met': met, **extra}


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def targets(res):
    t = {}
    r = next((r for r in res.get('scan', []) if (r['B'], r['D'], r['T']) == (8, 1024, 8192)
              and _num(r.get('kernel_fwd_ms'))), None)
    if r:
        t['fused_fwd_over_floor'] = target(r['kernel_fwd_ms'] / r['kernel_fwd_floor_ms'], 1.3)
        t['fused_fwdbwd_over_floor'] = target(r['kernel_fwdbwd_ms'] / r['kernel_fwdbwd_floor_ms'], 1.4)
        t['fused_fwdbwd_peak_GB'] = target(r['kernel_fwdbwd_peak_GB'], 2.5)
    train = {(r['T'], r['model']): r.get('tokens_per_s') for r in res.get('train', [])}
    m, a, f = train.get((2048, 'mipt_K64')), train.get((2048, 'attention_sdpa')), train.get((2048, 'no_mixer'))
    if _num(m) and _num(a):
        t['train_T2048_mipt_over_sdpa_tokens_per_s'] = target(m / a, 1.0, True)
        if _num(f):  # what a free mixer would reach at this shape
            t['train_T2048_mipt_over_sdpa_tokens_per_s']['ceiling_no_mixer_over_sdpa'] = f / a
    mem = {(r['N'], r['model']): r.get('peak_MB') for r in res.get('memory', [])}
    def worst_memory(name):  # (the largest peak ratio to the SDPA twin over N, its N), or None
        ratios = [(mem[(N, name)] / mem[(N, 'attention_sdpa')], N) for N, model in mem
                  if model == name and _num(mem[(N, model)]) and _num(mem.get((N, 'attention_sdpa')))]
        return max(ratios) if ratios else None
    plain, rec = worst_memory('mipt_K16'), worst_memory('mipt_K16_recompute')
    if rec or plain:  # the recomputing model when measured (recompute=True); the plain one beside it
        ratio, N = rec or plain
        t['memory_mipt_over_sdpa_max'] = target(ratio, 1.0, at_N=N, model='mipt_K16_recompute' if rec else 'mipt_K16',
                                                without_recompute=plain[0] if plain else None)
    dec = [r['state_MB'] for r in res.get('decode', []) if r['model'] == 'mipt_K64' and _num(r.get('state_MB'))]
    if dec:
        t['decode_state_relative_spread'] = target((max(dec) - min(dec)) / min(dec), 0.01)
    # mixers: one layer at D=1024
    mix = {(r['B'], r['T'], r['layer']): r for r in res.get('mixers', [])}
    over = [((mix[(B, T, 'mipt_K64')]['fwdbwd_ms'] - r['fwdbwd_ms']) / r['fwdbwd_ms'], B, T)
            for (B, T, layer), r in mix.items() if layer == 'mipt_K0' and _num(r.get('fwdbwd_ms'))
            and _num(mix.get((B, T, 'mipt_K64'), {}).get('fwdbwd_ms'))]
    if over:
        worst, B, T = max(over)
        t['cache_over_recurrence_fwdbwd'] = target(worst, 1.0, at=f'B={B}, T={T}')
    at8k = sorted({B for (B, T, _) in mix if T == 8192}, key=lambda B: (B * 8192 != 16384, B))
    for B in at8k[:1]:  # the 16,384-token shape when measured
        m = mix.get((B, 8192, 'mipt_K64'), {}).get('tokens_per_s')
        best = max(((r['tokens_per_s'], layer) for (b, T, layer), r in mix.items()
                    if b == B and T == 8192 and layer.startswith('fla_') and _num(r.get('tokens_per_s'))), default=None)
        if _num(m) and best:
            t['mipt_over_best_peer_T8192'] = target(m / best[0], 1.0, True, best_peer=best[1], at=f'B={B}, T=8192')
    # batchdecode
    bd = {(r['context'], r['batch'], r['model']): r for r in res.get('batchdecode', [])}
    m, a = bd.get((65536, 128, 'mipt_K64_graph')), bd.get((65536, 128, 'attention_sdpa'))
    if m and _num(m.get('tokens_per_s')) and a:
        if _num(a.get('tokens_per_s')):
            t['decode_B128_64k_mipt_over_attention'] = target(m['tokens_per_s'] / a['tokens_per_s'], 5.0, True)
        elif a.get('tokens_per_s') in ('OOM', 'skipped') and a.get('note', '') != 'time budget':
            t['decode_B128_64k_mipt_over_attention'] = target(None, 5.0, True, note=f"attention {a['tokens_per_s']}")
            m16, a16 = bd.get((65536, 16, 'mipt_K64_graph'), {}), bd.get((65536, 16, 'attention_sdpa'), {})
            if _num(m16.get('tokens_per_s')) and _num(a16.get('tokens_per_s')):  # the largest batch both ran
                t['decode_B128_64k_mipt_over_attention']['at_B16'] = m16['tokens_per_s'] / a16['tokens_per_s']
    b1 = {}  # per graphed MIPT variant: its slowest context at batch 1; the target takes the better variant
    for (c, B, model), r in bd.items():
        if B == 1 and model.startswith('mipt_K64_graph') and r.get('graphed') and _num(r.get('tokens_per_s')):
            b1[model] = min(b1.get(model, (math.inf, c)), (r['tokens_per_s'], c))
    if b1:
        model, (worst, c) = max(b1.items(), key=lambda kv: kv[1][0])
        t['decode_B1_graphed_tokens_per_s'] = target(worst, 3000, True, at_context=c, model=model)
    # trainmix
    tm = {(r['T'], r['model']): r.get('tokens_per_s') for r in res.get('trainmix', [])}
    m, a, f = tm.get((8192, 'mipt_K64')), tm.get((8192, 'attention_sdpa')), tm.get((8192, 'no_mixer'))
    if _num(m) and _num(a):
        t['train_mixerbound_T8192_mipt_over_sdpa'] = target(m / a, 1.5, True)
        if _num(f):
            t['train_mixerbound_T8192_mipt_over_sdpa']['ceiling_no_mixer_over_sdpa'] = f / a
    return t


def fmt(v):
    if isinstance(v, float):
        return f'{v:.3g}' if abs(v) < 1e5 else f'{v:,.0f}'
    return '—' if v is None else str(v)


def markdown(res):
    lines = [f"device: {res['device']}, torch {res['torch']}, commit {res['commit']}, {res['date']}", '']
    if 'copy' in res:
        lines += [f"copy bandwidth: {res['copy']['GBps']:.0f} GB/s (read + write)", '']
    for sec in SECTIONS[1:]:
        rows = res.get(sec)
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += [f'### {sec}', '', '| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
            lines += ['| ' + ' | '.join(fmt(r.get(k, '')) for k in keys) + ' |' for r in rows]
            lines.append('')
    if res.get('targets'):
        lines += ['### targets', '', '| target | measured | goal | met |', '|---|---|---|---|']
        lines += [f"| {k} | {fmt(v['measured'])} | {v['goal']} | {v['met']} |" for k, v in res['targets'].items()]
    return '\n'.join(lines) + '\n'


def _grid(title, rows, row_key, col_key, val):
    """A small text table: one line per row_key, one column per col_key."""
    cols = list(dict.fromkeys(r[col_key] for r in rows))
    names = list(dict.fromkeys(r[row_key] for r in rows))
    cells = {(r[row_key], r[col_key]): val(r) for r in rows}
    w = max([len(str(n)) for n in names] + [len(row_key)])
    cw = max([len(str(c)) for c in cols] + [len(v) for v in cells.values()] + [6])
    out = [title, f"{row_key:<{w}}  " + '  '.join(f'{str(c):>{cw}}' for c in cols)]
    out += [f"{str(n):<{w}}  " + '  '.join(f"{cells.get((n, c), ''):>{cw}}" for c in cols) for n in names]
    return out + ['']


def _short(v, unit=1.0, digits=3):
    if not _num(v):
        return str(v)
    v = v / unit
    return f'{v:.{digits}g}' if abs(v) < 10 ** digits else f'{v:,.0f}'


def summary(res):
    """The short tables printed at the end of a run."""
    out = [f"== bench.py on {res['device']}, torch {res['torch']}, commit {res['commit']} "
           f"({time.perf_counter() - _T0:.0f} s; full tables in {os.path.join(out_dir, 'bench.md')}) =="]
    if res.get('section_s'):
        out += ['seconds per section: ' + ', '.join(f'{k} {v:.0f}' for k, v in res['section_s'].items()), '']
    if res.get('mixers'):
        rows = [dict(r, shape=f"{r['B']}x{r['T']}") for r in res['mixers']]
        out += _grid('mixers, one layer D=1024, fwd+bwd ms (BxT)', rows, 'layer', 'shape',
                     lambda r: _short(r.get('fwdbwd_ms')))
        out += _grid('mixers, fwd+bwd k tokens/s', rows, 'layer', 'shape', lambda r: _short(r.get('tokens_per_s'), 1e3))
        states = {r['layer']: r['state_bytes'] for r in res['mixers'] if _num(r.get('state_bytes'))
                  and r['layer'] != 'attention_sdpa'}
        if states:
            out += ['decode state per sequence and layer (MB): ' +
                    ', '.join(f'{k} {v / 1e6:.3g}' for k, v in states.items()) + '; attention 4 kB x T', '']
    if res.get('train'):
        out += _grid('train, LM 4x256, k tokens/s (T)', res['train'], 'model', 'T',
                     lambda r: _short(r.get('tokens_per_s'), 1e3))
    if res.get('trainmix'):
        out += _grid('trainmix, 8x1024 vocab 8192, k tokens/s (T)', res['trainmix'], 'model', 'T',
                     lambda r: _short(r.get('tokens_per_s'), 1e3))
    if res.get('batchdecode'):
        rows = [dict(r, case=f"{r['model']} @{r['context'] // 1024}k") for r in res['batchdecode']]
        out += _grid('batchdecode, tokens/s (batch)', rows, 'case', 'batch', lambda r: _short(r.get('tokens_per_s')))
        out += _grid('batchdecode, state MB (batch)', rows, 'case', 'batch', lambda r: _short(r.get('state_MB')))
    if res.get('decode'):
        out += _grid('decode, batch 1, tokens/s (context)', res['decode'], 'model', 'context',
                     lambda r: _short(r.get('tokens_per_s')))
    if res.get('memory'):
        out += _grid('memory, classifier d=128, peak MB (N)', res['memory'], 'model', 'N',
                     lambda r: _short(r.get('peak_MB')))
    if res.get('scan'):
        out.append('scan, fused kernel: fwd ms, fwd+bwd ms, each over its byte floor (B, D, T)')
        for r in res['scan']:
            if _num(r.get('kernel_fwd_ms')):
                out.append(f"{r['B']}x{r['D']}x{r['T']}: {_short(r['kernel_fwd_ms'])} ms "
                           f"({_short(r['kernel_fwd_ms'] / r['kernel_fwd_floor_ms'])}x), "
                           f"{_short(r['kernel_fwdbwd_ms'])} ms ({_short(r['kernel_fwdbwd_ms'] / r['kernel_fwdbwd_floor_ms'])}x)")
        out.append('')
    if res.get('targets'):
        w = max(len(k) for k in res['targets'])
        out += ['targets', f"{'target':<{w}}  {'measured':>10}  {'goal':>6}  met"]
        for k, v in res['targets'].items():
            extra = ', '.join(f'{a}={fmt(b)}' for a, b in v.items() if a not in ('measured', 'goal', 'met'))
            met = {True: 'yes', False: 'NO'}.get(v['met'], '—')
            out.append(f"{k:<{w}}  {fmt(v['measured']):>10}  {v['goal']:>6}  {met}"
                       + (f'  ({extra})' if extra else ''))
    errors = [(sec, r) for sec in SECTIONS[1:] for r in res.get(sec, []) if 'error' in r]
    if errors:
        sec, r = errors[0]
        where = ', '.join(f'{k}={r[k]}' for k in r if k in ('B', 'T', 'N', 'context', 'batch', 'layer', 'model'))
        out += ['', f"{len(errors)} cell(s) failed; first: {sec} {where}: {r['error']}"]
    return '\n'.join(out)


def main(argv=None):
    parse_args(argv)
    if not torch.cuda.is_available():
        die('bench.py needs a CUDA GPU')
    global _T0, _RES, _SECTION
    _T0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    commit = os.environ.get('MIPT_COMMIT') or subprocess.run(  # MIPT_COMMIT: for a copy without .git
        ['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
    res = {'device': torch.cuda.get_device_name(), 'torch': torch.__version__, 'commit': commit or 'unknown',
           'date': datetime.now(timezone.utc).isoformat(timespec='seconds'), 'command': ' '.join(sys.argv),
           'budget_s': budget_s, 'quick': quick}
    _RES = res
    want = sections.split(',')
    bw = None
    if 'copy' in want or 'scan' in want:
        res['copy'] = bench_copy()
        bw = res['copy']['GBps'] * 1e9
        print(res['copy'], flush=True)
    # mixers last: fla's first calls autotune, for how long is the least predictable
    for name, fn in [('scan', lambda: bench_scan(bw)), ('train', bench_train), ('decode', bench_decode),
                     ('memory', bench_memory), ('batchdecode', bench_batchdecode), ('trainmix', bench_trainmix),
                     ('mixers', bench_mixers)]:
        if name in want:
            t0 = time.perf_counter()
            print(f'== {name} ({t0 - _T0:.0f} s into the run)', flush=True)
            _SECTION = name
            res[name] = fn()
            _SECTION = None
            res.setdefault('section_s', {})[name] = time.perf_counter() - t0
            save(res)  # after every section (and every 15 s within one), so that a cut-off run keeps its cells
    save(res)
    print(summary(res), flush=True)


def save(res):
    res['targets'] = targets(res)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, 'bench.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, 'bench.json'))
    with open(os.path.join(out_dir, 'bench.md'), 'w') as f:
        f.write(markdown(res))


if __name__ == '__main__':
    main()
