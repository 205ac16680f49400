"""
Benchmarks on one GPU, in one process. Writes results/bench.json and results/bench.md.

    python bench.py                          # every section
    python bench.py --sections=scan,train    # some of: copy, scan, train, decode, memory

Sections
    copy    device-to-device copy bandwidth: the memory ceiling every byte floor below divides by
    scan    the MIPT recurrence alone, forward and forward+backward, (B, D, T) in SCAN_SHAPES:
            the Python loop (scan_ref), the PyTorch chunked scan, accelerated_scan.complex (if installed),
            the fused kernel, and the byte floor of each
    train   one LM training step (AdamW, bf16 autocast), MIPT (K=64) against the SDPA Transformer twin and
            the naive-attention twin, ~31M parameters with cl100k_base, tokens/s and peak memory; also the
            twin with no mixer at all (embedding, FFNs, head), the floor under any mixer's step
    decode  batch-1 decoding after 1k, 8k and 64k tokens of context: tokens/s and memory (MIPT eager and
            through one CUDA graph per token, model.graphed_step)
    memory  peak training memory of the paper's classification model (d=128, 2 layers) against N

Timings: CUDA events after warm-up, medians, random inputs (never zeros).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

import mipt
from mipt import MIPT, MIPTConfig

# -----------------------------------------------------------------------------
sections = 'copy,scan,train,decode,memory'
out_dir = 'results'
reps = 20
SCAN_SHAPES = [(8, 1024, 2048), (8, 1024, 8192), (1, 1024, 65536)]  # (B, D, T)
TRAIN_T = [512, 2048, 8192, 16384]
TRAIN_TOKENS = 16384           # tokens per training step, B = TRAIN_TOKENS // T
DECODE_CONTEXT = [1024, 8192, 65536]
MEMORY_N = [512, 1024, 2048, 4096, 8192, 16384]
MEMORY_BATCH = 8
for arg in sys.argv[1:]:  # --key=value overrides of the globals above
    key, _, val = arg.lstrip('-').partition('=')
    if key not in globals() or key.startswith('_') or not _:
        raise SystemExit(f"bench.py: unknown option {arg!r}; options: sections, out_dir, reps")
    globals()[key] = type(globals()[key])(val)
# -----------------------------------------------------------------------------


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
        torch.cuda.empty_cache()
        return 'OOM'


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
    rows = []
    try:
        from accelerated_scan.complex import scan as acc_scan
    except ImportError:
        acc_scan = None
        print('accelerated_scan not installed: its rows are skipped')
    for B, D, T in SCAN_SHAPES:
        n = B * T * D
        row = {'B': B, 'D': D, 'T': T}
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
        print(row)
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


def bench_train():
    rows = []
    for T in TRAIN_T:
        B = max(1, TRAIN_TOKENS // T)
        for name, mixer, impl in [('mipt_K64', 'mipt', 'sdpa'), ('attention_sdpa', 'attention', 'sdpa'),
                                  ('attention_naive', 'attention', 'naive'), ('no_mixer', 'attention', 'sdpa')]:
            row = {'T': T, 'B': B, 'model': name}
            model = MIPT(lm_config(mixer, T, impl)).cuda()
            if name == 'no_mixer':
                for block in model.blocks:
                    block.mix = NoMixer()
            row['params'] = model.get_num_params(non_embedding=False)
            opt = model.configure_optimizers(0.1, 3e-4, (0.9, 0.95), 'cuda')
            idx = torch.randint(0, 100277, (B, T + 1), device='cuda')

            def train_step():
                with torch.autocast('cuda', dtype=torch.bfloat16):
                    _, loss = model(idx[:, :-1], idx[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            def run():
                row['ms'] = timed(train_step, n=5)
                row['tokens_per_s'] = B * T / row['ms'] * 1e3
                row['peak_GB'] = peak(train_step) / 1e9
            if oom_guard(run) == 'OOM':
                row['ms'] = row['tokens_per_s'] = row['peak_GB'] = 'OOM'
            rows.append(row)
            print(row)
            del model, opt
            torch.cuda.empty_cache()
    return rows


def bench_decode():
    rows = []
    for ctx in DECODE_CONTEXT:
        for name, mixer in [('mipt_K64', 'mipt'), ('mipt_K64_graph', 'mipt'), ('attention_sdpa', 'attention')]:
            model = MIPT(lm_config(mixer, ctx + 256)).cuda().eval()
            prompt = torch.randint(0, 100277, (1, ctx), device='cuda')
            row = {'context': ctx, 'model': name}

            def run():
                with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
                    _, state = model.prefill(prompt)
                    graphed = model.graphed_step(state, torch.bfloat16) if name.endswith('graph') else None
                    tok = prompt[:, -1]
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(64):
                        logits, state = graphed(tok) if graphed else model.step(tok, state)
                        tok = logits.argmax(-1)
                    torch.cuda.synchronize()
                row['tokens_per_s'] = 64 / (time.perf_counter() - t0)
                row['state_MB'] = model.state_bytes(state) / 1e6
            if oom_guard(run) == 'OOM':
                row['tokens_per_s'] = row['state_MB'] = 'OOM'
            rows.append(row)
            print(row)
            del model
            torch.cuda.empty_cache()
    return rows


def bench_memory():
    """The paper's peak-memory figure: its classification model (d=128, 2 layers, K=16), batch MEMORY_BATCH."""
    rows = []
    for N in MEMORY_N:
        for name, mixer, impl in [('mipt_K16', 'mipt', 'sdpa'), ('attention_sdpa', 'attention', 'sdpa'),
                                  ('attention_naive', 'attention', 'naive')]:
            cfg = MIPTConfig(vocab_size=100352, block_size=N, n_layer=2, n_embd=128, n_head=4, mixer=mixer,
                             attn_impl=impl, cache_size=16 if mixer == 'mipt' else 0, n_classes=4)
            model = MIPT(cfg).cuda()
            idx = torch.randint(0, 100277, (MEMORY_BATCH, N), device='cuda')
            y = torch.randint(0, 4, (MEMORY_BATCH,), device='cuda')

            def step():
                _, loss = model(idx, y)   # float32, as the paper's classifier
                loss.backward()
            mem = oom_guard(lambda: peak(step) / 1e6)
            rows.append({'N': N, 'model': name, 'batch': MEMORY_BATCH, 'peak_MB': mem})
            print(rows[-1])
            del model
            torch.cuda.empty_cache()
    return rows


def target(measured, goal, higher_is_better=False):
    met = measured >= goal if higher_is_better else measured <= goal
    return {'measured': measured, 'goal': goal, 'met': bool(met)}


def targets(res):
    t = {}
    r = next((r for r in res.get('scan', []) if (r['B'], r['D'], r['T']) == (8, 1024, 8192)), None)
    if r:
        t['fused_fwd_over_floor'] = target(r['kernel_fwd_ms'] / r['kernel_fwd_floor_ms'], 1.25)
        t['fused_fwdbwd_over_floor'] = target(r['kernel_fwdbwd_ms'] / r['kernel_fwdbwd_floor_ms'], 1.5)
        t['fused_fwdbwd_peak_GB'] = target(r['kernel_fwdbwd_peak_GB'], 2.5)
    train = {(r['T'], r['model']): r['tokens_per_s'] for r in res.get('train', [])}
    for T, goal in [(8192, 2.0), (2048, 1.3)]:
        m, a, f = train.get((T, 'mipt_K64')), train.get((T, 'attention_sdpa')), train.get((T, 'no_mixer'))
        if isinstance(m, float) and isinstance(a, float):
            t[f'train_T{T}_mipt_over_sdpa_tokens_per_s'] = target(m / a, goal, higher_is_better=True)
            if isinstance(f, float):  # what a free mixer would reach: the goal's ceiling at this shape
                t[f'train_T{T}_mipt_over_sdpa_tokens_per_s']['ceiling_no_mixer_over_sdpa'] = f / a
    dec = [r['state_MB'] for r in res.get('decode', []) if r['model'] == 'mipt_K64' and r['state_MB'] != 'OOM']
    if dec:
        t['decode_state_relative_spread'] = target((max(dec) - min(dec)) / min(dec), 0.01)
    return t


def markdown(res):
    lines = [f"device: {res['device']}, torch {res['torch']}, commit {res['commit']}, {res['date']}", '']
    if 'copy' in res:
        lines += [f"copy bandwidth: {res['copy']['GBps']:.0f} GB/s (read + write)", '']
    for sec in ('scan', 'train', 'decode', 'memory'):
        rows = res.get(sec)
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            fmt = lambda v: f'{v:.3g}' if isinstance(v, float) else str(v)
            lines += [f'### {sec}', '', '| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
            lines += ['| ' + ' | '.join(fmt(r.get(k, '')) for r in [r] for k in keys) + ' |' for r in rows]
            lines.append('')
    if res.get('targets'):
        lines += ['### targets', '', '| target | measured | goal | met |', '|---|---|---|---|']
        lines += [f"| {k} | {v['measured']:.3g} | {v['goal']} | {v['met']} |" for k, v in res['targets'].items()]
    return '\n'.join(lines) + '\n'


def main():
    if not torch.cuda.is_available():
        raise SystemExit('bench.py needs a CUDA GPU')
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    commit = os.environ.get('MIPT_COMMIT') or subprocess.run(  # MIPT_COMMIT: for a copy without .git
        ['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
    res = {'device': torch.cuda.get_device_name(), 'torch': torch.__version__, 'commit': commit or 'unknown',
           'date': datetime.now(timezone.utc).isoformat(timespec='seconds'), 'command': ' '.join(sys.argv)}
    want = sections.split(',')
    bw = None
    if 'copy' in want or 'scan' in want:
        res['copy'] = bench_copy()
        bw = res['copy']['GBps'] * 1e9
        print(res['copy'])
    for name, fn in [('scan', lambda: bench_scan(bw)), ('train', bench_train), ('decode', bench_decode),
                     ('memory', bench_memory)]:
        if name in want:
            res[name] = fn()
            save(res)  # after every section, so that a cut-off run keeps what it measured
    print(markdown(res))


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
