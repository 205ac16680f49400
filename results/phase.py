"""
The measurement rate at work (the paper's section 6): for one trained MIPT checkpoint, the
mean score s_t = mean_d p_t per layer, and the fraction of tokens in the particle phase (s_t > 0.5) as
the sequence length N grows, overall and by quarter of the sequence.

    python results/phase.py --out_dir=out-lm-imdb --out=results/phase_lm_imdb.json
    python results/phase.py --out_dir=out-needle --out=results/phase_needle.json

Needle checkpoints (a dataset made by data/needle/prepare.py, whose meta.json records its generator) read
fresh needle sequences of length N, drawn like the dataset's val split (its seed, its span and classes);
any other checkpoint reads windows of N tokens from its dataset's val split (LM: at random offsets;
classification and seq sets: starting at a random document / row, running on into the next ones).
Every N in --Ns is evaluated, also past the training block size (a MIPT model has no positional limit).
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import runs  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = 'out'
out = ''                      # JSON file to write; '' prints only
Ns = '128,256,512,1024,2048,4096'
n_seq = 16                    # sequences per N
threshold = 0.5               # s_t above this: particle phase
seed = 2                      # for the windows (needle sequences use the dataset's val seed)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
note = ''                     # free text stored in the JSON (which run the checkpoint is)
# -----------------------------------------------------------------------------
configure(globals(), doc=__doc__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
path = os.path.join(out_dir, 'ckpt.pt')
ck = checkpoint.load(path)
if ck['model_args'].get('mixer') != 'mipt' or ck.get('peer'):
    checkpoint.die(f"{path} holds a {ck.get('peer') or ck['model_args'].get('mixer')} model; the measurement rate "
                   f"needs a MIPT one")
model = checkpoint.build_model(ck, device, path).eval()
cfg, tc, meta = model.config, ck['train_config'], ck.get('meta') or {}
gen = torch.Generator().manual_seed(seed)
needle = meta.get('generator') if (meta.get('generator') or {}).get('function') == 'make_needle' else None
if tc['task'] == 'needle':  # a checkpoint of train.py's former in-process needle task (val seed needle_seed + 2)
    needle = dict(vocab_size=tc['needle_vocab'], needle_span=tc['needle_span'], n_classes=tc['needle_classes'],
                  split_seeds={'val': tc['needle_seed'] + 2})


def sequences(N):
    """(n_seq, N) token ids."""
    if needle:
        from data.needle import make_needle
        kw = {k: needle[k] for k in ('vocab_size', 'noise_lo', 'n_classes', 'ids_per_class', 'first_id') if k in needle}
        return make_needle(n_seq, seq_len=N, needle_span=tuple(needle['needle_span']),
                           seed=needle['split_seeds']['val'], **kw)[0]
    data_dir = tc.get('data_dir') or os.path.join(ROOT, 'data', tc['dataset'])
    data = np.memmap(os.path.join(data_dir, 'val.bin'), dtype=np.dtype(meta['dtype']), mode='r')
    if tc['task'] == 'classify':
        starts = np.load(os.path.join(data_dir, 'val.idx.npy'))[:-1]
    elif tc['task'] == 'seq':
        starts = np.arange(0, len(data), meta['seq_len'])
    else:
        starts = np.arange(max(len(data) - N, 0))
    starts = starts[starts + N <= len(data)]
    if not len(starts):
        checkpoint.die(f"{data_dir}/val.bin holds {len(data)} tokens: too few for windows of N={N}")
    ix = starts[torch.randint(len(starts), (n_seq,), generator=gen)].tolist()
    return torch.stack([torch.from_numpy(data[i:i + N].astype(np.int64)) for i in ix])


res = {'out_dir': out_dir, 'note': note, 'task': tc['task'],
       'dataset': meta.get('name', tc.get('dataset')), 'block_size': cfg.block_size,
       'n_layer': cfg.n_layer, 'K': cfg.cache_size, 'threshold': threshold, 'n_seq': n_seq, 'by_N': {}}
ctx = torch.autocast('cuda', dtype=torch.bfloat16) if 'cuda' in device else torch.autocast('cpu', enabled=False)
for N in [int(n) for n in Ns.split(',')]:
    with torch.no_grad(), ctx:
        st = runs.probe(model, sequences(N).to(device))
    s = torch.stack([x.float() for x in st['s']])                      # (layers, n_seq, N)
    quarters = [s[:, :, i * N // 4:(i + 1) * N // 4] for i in range(4)]
    res['by_N'][N] = {
        'p_mean': s.mean((1, 2)).tolist(),                              # per layer
        'particle_fraction': (s > threshold).float().mean((1, 2)).tolist(),
        'particle_fraction_by_quarter': [(q > threshold).float().mean().item() for q in quarters],
        's_max': s.amax((1, 2)).tolist()}
    r = res['by_N'][N]
    print(f"N={N:6d}  mean p per layer " + ' '.join(f'{v:.3f}' for v in r['p_mean']) +
          "  | particle fraction per layer " + ' '.join(f'{v:.4f}' for v in r['particle_fraction']) +
          "  | by quarter " + ' '.join(f'{v:.4f}' for v in r['particle_fraction_by_quarter']))
if out:
    with open(out, 'w') as f:
        json.dump(res, f, indent=1)
    print(f"-> {out}")
