"""
The measurement rate at work (PAPER.md, the paper's section 6): for one trained MIPT checkpoint, the
mean score s_t = mean_d p_t per layer, and the fraction of tokens in the particle phase (s_t > 0.5) as
the sequence length N grows, overall and by quarter of the sequence.

    python results/phase.py --out_dir=out-lm-imdb --out=results/phase_lm_imdb.json
    python results/phase.py --out_dir=out-needle --out=results/phase_needle.json

LM checkpoints read windows of N tokens from the dataset's val split; needle checkpoints read fresh
needle sequences of length N (train.py's val seed). Both are evaluated at every N in --Ns, also past the
training block size (a MIPT model has no positional limit).
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from mipt import MIPT, MIPTConfig  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = 'out'
out = ''                      # JSON file to write; '' prints only
Ns = '128,256,512,1024,2048,4096'
n_seq = 16                    # sequences per N
threshold = 0.5               # s_t above this: particle phase
seed = 2                      # for the LM windows (needle sequences use train.py's val seed)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
note = ''                     # free text stored in the JSON (which run the checkpoint is)
# -----------------------------------------------------------------------------
configure(globals(), doc=__doc__)

ck = torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)
cfg = MIPTConfig(**ck['model_args'])
if cfg.mixer != 'mipt':
    sys.exit(f"error: {out_dir} holds an attention checkpoint; the measurement rate needs a MIPT one")
model = MIPT(cfg)
model.load_state_dict(ck['model'])
model.eval().to(device)
tc, meta = ck['train_config'], ck.get('meta') or {}
gen = torch.Generator().manual_seed(seed)


def sequences(N):
    """(n_seq, N) token ids."""
    if tc['task'] == 'needle':
        from data.needle import make_needle
        return make_needle(n_seq, seq_len=N, vocab_size=tc['needle_vocab'], needle_span=tuple(tc['needle_span']),
                           n_classes=tc['needle_classes'], seed=tc['needle_seed'] + 2)[0]  # train.py's val seed
    path = os.path.join(tc['data_dir'] or os.path.join('data', tc['dataset']), 'val.bin')
    data = np.memmap(path, dtype=np.dtype(meta['dtype']), mode='r')
    ix = torch.randint(len(data) - N, (n_seq,), generator=gen).tolist()
    return torch.stack([torch.from_numpy(data[i:i + N].astype(np.int64)) for i in ix])


res = {'out_dir': out_dir, 'note': note, 'task': tc['task'],
       'dataset': 'needle' if tc['task'] == 'needle' else tc.get('dataset'), 'block_size': cfg.block_size,
       'n_layer': cfg.n_layer, 'K': cfg.cache_size, 'threshold': threshold, 'n_seq': n_seq, 'by_N': {}}
ctx = torch.autocast('cuda', dtype=torch.bfloat16) if 'cuda' in device else torch.autocast('cpu', enabled=False)
for N in [int(n) for n in Ns.split(',')]:
    with torch.no_grad(), ctx:
        st = model.probe(sequences(N).to(device))
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
