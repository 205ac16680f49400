"""
Diagnostics of trained needle runs, written into each run's metrics.json under 'needle_eval':
- caught: the share of val (and test) needles that the exact eval-mode cache holds at the last position, in any
  layer, and the mean tokens it stores there (the unbounded cache's sparsity);
- lengths: test accuracy on needle sequences of other lengths, drawn by the run's own generator with its test
  seed (e.g. trained at 2048, tested at 8192 and 32768), with the decoding state's bytes per sequence.

    python results/needle_eval.py out-needle2048 [more run dirs] [--lengths=8192,32768]
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
from data.needle.prepare import make_needle  # noqa: E402


def caught(model, x, needle):
    """x (B, T) ids, needle (B,) positions -> (caught (B,) bool, stored (B,) tokens in the last position's cache,
    averaged over layers), read from the decoding state that prefill exports: the exact cache, as decoding holds it."""
    _, state = model.prefill(x)
    slots = [st.cache.pos for st in state.layers if st.cache is not None]                # (B, n) each, -1 empty
    if not slots:  # no cache (K=0)
        return torch.zeros(len(x), dtype=torch.bool), torch.zeros(len(x))
    hit = torch.stack([(pos == needle[:, None]).any(1) for pos in slots]).any(0)
    stored = torch.stack([(pos >= 0).sum(1).float() for pos in slots]).mean(0)
    return hit, stored


def evaluate(run, lengths, device, batch_tokens=2 ** 18):
    m = json.load(open(os.path.join(run, 'metrics.json')))
    model = checkpoint.build_model(checkpoint.load(os.path.join(run, 'ckpt.pt')), device).eval()
    g = json.load(open(os.path.join(ROOT, 'data', m['dataset'], 'meta.json')))['generator']
    lo, hi = g['first_id'], g['first_id'] + g['n_classes'] * g['ids_per_class']
    gen = {k: g[k] for k in ('vocab_size', 'noise_lo', 'n_classes', 'ids_per_class', 'first_id')}
    out = {'caught': {}, 'lengths': {}}
    for split in ('val', 'test'):
        x, _ = make_needle(g[f'n_{split}'], seq_len=g['seq_len'], needle_span=tuple(g['needle_span']),
                           seed=g['split_seeds'][split], **gen)
        if model.config.mixer != 'mipt':
            break
        hits, stored = [], []
        for i in range(0, len(x), max(1, batch_tokens // g['seq_len'])):
            xb = x[i:i + max(1, batch_tokens // g['seq_len'])].to(device)
            with torch.no_grad():
                h, n = caught(model, xb, ((xb >= lo) & (xb < hi)).float().argmax(1))
            hits.append(h.float().cpu())
            stored.append(n.cpu())
        out['caught'][split] = {'caught': float(torch.cat(hits).mean()), 'stored': float(torch.cat(stored).mean())}
    for n in lengths:
        if model.config.mixer != 'mipt' and n > model.config.block_size:
            out['lengths'][str(n)] = None  # the twin's learned positions end at its block_size
            continue
        x, y = make_needle(g['n_test'], seq_len=n, needle_span=tuple(g['needle_span']), seed=g['split_seeds']['test'],
                           **gen)
        correct, bs = 0, max(1, batch_tokens // n)
        for i in range(0, len(x), bs):
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
                logits, _ = model(x[i:i + bs].to(device))
            correct += int((logits.argmax(-1).cpu() == y[i:i + bs]).sum())
        with torch.no_grad():  # the decoding state after one whole sequence (an unbounded cache grows)
            state_bytes = model.state_bytes(model.prefill(x[:1].to(device))[1])
        out['lengths'][str(n)] = {'acc': correct / len(x), 'state_bytes': state_bytes}
    m['needle_eval'] = out
    with open(os.path.join(run, 'metrics.json.tmp'), 'w') as f:
        json.dump(m, f, indent=2)
    os.replace(os.path.join(run, 'metrics.json.tmp'), os.path.join(run, 'metrics.json'))
    return out


def main(argv):
    lengths = [int(a) for arg in argv if arg.startswith('--lengths=') for a in arg.split('=', 1)[1].split(',') if a]
    runs = [a for a in argv if not a.startswith('--')]
    if not runs:
        sys.exit(__doc__)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    for run in runs:
        print(os.path.basename(os.path.normpath(run)), json.dumps(evaluate(run, lengths, device)))


if __name__ == '__main__':
    main(sys.argv[1:])
