"""What each training signal (cache_signal) sends to the needle's score, at initialization: one training step's
gradient of the loss with respect to every score s_j, on needle-anywhere batches at several lengths N, for the
model of config/needle.py (one MIPT layer, d=64, K=4 at 512, K=16 beyond, R=128). Reported per (N, signal): the
share of rows whose needle score gets any gradient at all, and the mean abs(dL/ds) at the needle against the mean at
the noise positions. No p_penalty: its gradient is the same at every position.

Runs on a CPU in about seven minutes (the dense pass at 8192 most of it):

    python results/signal_grad.py [--out=results/signal_grad.json]
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.needle.prepare import make_needle  # noqa: E402
from mipt import MIPT, MIPTConfig  # noqa: E402

SIGNALS = ('explore', 'weighted', 'dense')  # 'mixed' takes one of the dense and explore paths per step
LENGTHS = ((512, 4), (2048, 16), (8192, 16))
LO, HI = 10, 30  # the needle ids: 4 classes x 5 ids from 10


def score_grads(model, x, y):
    """One training step's dL/ds (B, T) of the first layer's scores; the forward runs in train mode."""
    keep = {}

    def grab(module, args):  # SparseCache.forward(y, s, ...)
        keep['s'] = args[1]
        keep['s'].retain_grad()
    h = model.blocks[0].mix.cache.register_forward_pre_hook(grab)
    try:
        model.train()
        _, loss = model(x, y)
        loss.backward()
    finally:
        h.remove()
    return keep['s'].grad


def measure(N, K, signal, seeds=(1, 2, 3), batch=16):
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = MIPT(MIPTConfig(vocab_size=300, block_size=N, n_layer=1, n_embd=64, n_head=4, dropout=0.0,
                                n_classes=4, cache_size=K, cache_explore=128, cache_signal=signal))
        x, y = make_needle(batch, seq_len=N, needle_span=(0.0, 1.0), seed=100 + seed)
        g = score_grads(model, x, y).abs()                                        # (B, T)
        needle = ((x >= LO) & (x < HI))                                          # (B, T), one per row
        rows.append((g[needle], g[~needle].view(batch, -1).mean(1)))
    at_needle = torch.cat([r[0] for r in rows])
    at_noise = torch.cat([r[1] for r in rows])
    return {'N': N, 'K': K, 'signal': signal, 'rows': len(at_needle),
            'needle_reached': float((at_needle > 0).float().mean()),
            'grad_needle': float(at_needle.mean()), 'grad_noise': float(at_noise.mean()),
            'needle_over_noise': float(at_needle.mean() / at_noise.mean().clamp(min=1e-30))}


def main(argv):
    out = next((a.split('=', 1)[1] for a in argv if a.startswith('--out=')), None)
    rows = []
    for N, K in LENGTHS:
        for signal in SIGNALS:
            r = measure(N, K, signal)
            rows.append(r)
            print(f"N={N:5d} K={K:2d} {signal:9s} needle reached {r['needle_reached']:.2f}  |dL/ds| needle "
                  f"{r['grad_needle']:.2e} noise {r['grad_noise']:.2e}  ratio {r['needle_over_noise']:.1f}", flush=True)
    if out:
        with open(out, 'w') as f:
            json.dump({'command': 'python results/signal_grad.py --out=results/signal_grad.json', 'device': 'cpu',
                       'protocol': __doc__.strip().split('\n\n')[0].replace('\n', ' '), 'rows': rows}, f, indent=1)
            f.write('\n')


if __name__ == '__main__':
    main(sys.argv[1:])
