"""
Long-context needle: a checkpoint trained on the needle anywhere in N tokens, tested on the same task at
longer N (a MIPT model has no position embedding and a constant decoding state, so it reads any length;
the attention twin's learned positions stop at its block_size, and it is reported as such).

    python data/needle/prepare.py --seq_len 2048 --span 0.0 1.0 --out_dir data/needle2048
    python train.py config/needle.py --dataset=needle2048 --block_size=2048 --out_dir=out-n2048
    python results/needle_long.py --out_dirs=out-n2048,out-n2048-attn --Ns=2048,8192,32768,131072 \
        --out=results/needle_long.json

For every checkpoint and N: accuracy on n_test fresh test sequences (the needle prepare script's
generator with the checkpoint's generator arguments, its test seed, and seq_len N), the peak GPU memory of
one test forward pass at batch_size, and the decoding state's bytes after the whole sequence (prefill).
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import build_model, die, load  # noqa: E402
from configurator import configure  # noqa: E402
from data.needle.prepare import SPLIT_SEED_OFFSET, make_needle  # noqa: E402

# -----------------------------------------------------------------------------
out_dirs = 'out'              # comma-separated run directories (their ckpt.pt)
Ns = '2048,8192,32768,131072'
n_test = 1000                 # test sequences per N
tokens_per_batch = 1 << 20    # batch size = max(1, tokens_per_batch // N)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
out = ''                      # JSON file to write; '' prints only
# -----------------------------------------------------------------------------
configure(globals(), doc=__doc__)
ctx = torch.autocast('cuda', dtype=torch.bfloat16) if 'cuda' in device else torch.autocast('cpu', enabled=False)
rows = []
for run in out_dirs.split(','):
    ck = load(os.path.join(run, 'ckpt.pt'))
    gen = dict((ck.get('meta') or {}).get('generator') or {})
    if not gen:
        die(f"{run}: its dataset has no needle generator arguments (meta['generator']); is it a needle run?", 2)
    model = build_model(ck, device).eval()
    cfg = model.config
    for N in [int(n) for n in Ns.split(',')]:
        row = {'run': run, 'mixer': cfg.mixer, 'cache_size': cfg.cache_size, 'n_layer': cfg.n_layer,
               'trained_N': cfg.block_size, 'N': N}
        if cfg.mixer == 'attention' and N > cfg.block_size:
            row['note'] = f'learned positions stop at block_size={cfg.block_size}'
            rows.append(row)
            print(row)
            continue
        args = {k: gen[k] for k in ('vocab_size', 'noise_lo', 'n_classes', 'ids_per_class', 'first_id') if k in gen}
        span = tuple(gen.get('needle_span', gen.get('span', (0.0, 1.0))))
        x, y = make_needle(n_test, seq_len=N, needle_span=span, seed=gen.get('seed', 0) + SPLIT_SEED_OFFSET['test'], **args)
        bs = max(1, tokens_per_batch // N)
        correct, t0 = 0, time.time()
        if 'cuda' in device:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with torch.no_grad(), ctx:
            for i in range(0, n_test, bs):
                logits, _ = model(x[i:i + bs].to(device))
                correct += (logits.argmax(-1).cpu() == y[i:i + bs]).sum().item()
            _, state = model.prefill(x[:1].to(device))
        row.update(acc=correct / n_test, n_test=n_test, batch_size=bs, seconds=round(time.time() - t0, 2),
                   state_bytes=model.state_bytes(state))
        if 'cuda' in device:
            row['peak_forward_MB'] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
        rows.append(row)
        print(row, flush=True)
if out:
    with open(out, 'w') as f:
        json.dump({'command': 'python results/needle_long.py ' + ' '.join(sys.argv[1:]), 'rows': rows}, f, indent=1)
    print(f"written to {out}")
