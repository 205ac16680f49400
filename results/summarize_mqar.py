"""MQAR from the H200 runs of `results/recall.sh RUNS JOBS mqar`, into results/mqar.json and the module-level
`targets` that results/summarize.py merges into results/summary.json.

Source: results/raw/mqar/<run>/{metrics.json, command.txt, stdout_tail.txt}, one folder per run (a run with no
metrics.json failed; its stdout's last line says why). For each (L, N) and model, the learning rate is chosen
on val accuracy; test is read once per run by train.py. Decoding state per layer, float32 throughout: MIPT's
h plus its K slots (MIPT.state_bytes of a fresh state), the peers' recurrent state and conv windows
(peers.state_bytes), attention's KV cache at L (2 L d x 4 bytes).
"""
import json
import os
import re
import sys
from dataclasses import fields

from summarize import target

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
import peers  # noqa: E402
from mipt import MIPT, MIPTConfig  # noqa: E402

raw = os.path.join(here, 'raw', 'mqar')
PEERS = ('gated_deltanet', 'mamba2', 'gla')


RUN = re.compile(r'^mqar(?P<size>\d+x\d+)-(?P<model>[^-]+)-lr(?P<lr>[0-9.]+e-\d+)(?:-(?P<tag>.+))?$')


def model_name(run):
    """'mqar512x64-K64-lr2.2e-3' -> ('512x64', 'K64', '2.2e-3'); a MIPT run's exploration ('K4R8': R=8) and
    a budget tag ('-e16') are variants of the same row, chosen on val like the learning rate."""
    m = RUN.match(run)
    if m is None:
        raise SystemExit(f"summarize_mqar.py: cannot read the run name {run!r} (mqar<L>x<N>-<model>-lr<lr>[-<tag>])")
    return m['size'], re.sub(r'(K\d+)R\d+$', r'\1', m['model']), m['lr']


def state_bytes(m, L):
    cfg = m['model_config']
    D, H = cfg['n_embd'], cfg['n_head']
    if m['peer']:
        return peers.state_bytes(m['peer'], D, H)
    if cfg['mixer'] == 'attention':
        return 2 * L * D * 4
    model = MIPT(MIPTConfig(**{k: v for k, v in cfg.items() if k in {f.name for f in fields(MIPTConfig)}}))
    return MIPT.state_bytes(model.init_state(1)) // cfg['n_layer']


runs = {}
for run in sorted(os.listdir(raw)):
    d = os.path.join(raw, run)
    size, model, lr = model_name(run)
    row = {'run': run, 'lr': float(lr), 'command': open(os.path.join(d, 'command.txt')).read().strip()}
    mpath = os.path.join(d, 'metrics.json')
    if os.path.exists(mpath):
        m = json.load(open(mpath))
        L = int(size.split('x')[0])
        row.update(val=m['best_val']['acc'], best_iter=m['best_val']['iter'], test=(m['test'] or {}).get('acc'),
                   iters=m['iters'], epochs=round(m['iters'] * m['train_config']['batch_size'] / 100_000, 2),
                   stopped='val >= 0.99' if m.get('stopped_at_target') else
                   'time limit' if m.get('stopped_at_time_limit') else 'epochs',
                   tokens_per_s=m['tokens_per_sec'], wall_s=round(m['wall_time_s']), device=m['device'],
                   commit=m['git_commit'], state_bytes_per_layer=state_bytes(m, L),
                   impl=m['model_config'].get('cache_impl') if not m['peer'] else m['peer'],
                   **({'cache_explore': m['model_config']['cache_explore']}
                      if m['model_config'].get('mixer') == 'mipt' and not m['peer']
                      and m['model_config'].get('cache_size') else {}))
    else:
        tail = open(os.path.join(d, 'stdout_tail.txt')).read().strip().splitlines()
        row.update(val=None, test=None, error=next((t for t in reversed(tail) if 'Error' in t), tail[-1] if tail else ''))
    runs.setdefault(size, {}).setdefault(model, []).append(row)

table = {}
for size, models in runs.items():
    n = int(size.split('x')[1])
    order = ['K0', f'K{n}', f'K{2 * n}', 'attn', *PEERS]
    table[size] = {}
    for model in order:
        rows = models.get(model, [])
        done = [r for r in rows if r['val'] is not None]
        best = max(done, key=lambda r: r['val']) if done else (rows[0] if rows else None)
        if best is not None:
            table[size][model] = {**best, 'lrs_tried': sorted(r['lr'] for r in rows), 'runs_tried': len(rows)}

out = {'protocol': 'Zoology MQAR, V=8192, 2 layers, d_model 128, 100k train / 3k val / 3k test, AdamW wd 0.1, '
                   'cosine; shrunk: at most MINUTES (7-8) of wall time per run (several runs share one H200), '
                   'cosine over 4, 16 or 64 epochs (run tags e16/e64), stop at val 0.99; per row the run with the '
                   'best val among the lrs, exploration R (MIPT: K<k>R<r> runs; untagged R is 64) and budgets tried',
       'command': 'SIZES="512x64 128x8 ..." LRS="..." MINUTES=8 [EPOCHS=16 TAG=e16] bash results/recall.sh RUNS 8 '
                  'mqar; python results/summarize_mqar.py (each run: results/raw/mqar/<run>/command.txt)',
       'table': table, 'runs': runs}
with open(os.path.join(here, 'mqar.json'), 'w') as f:
    json.dump(out, f, indent=1)


t512 = table.get('512x64', {})
mipt = t512.get('K64', {}).get('test')
peer_scores = {p: t512[p]['test'] for p in PEERS if p in t512 and t512[p].get('test') is not None}
t = targets = {}
if mipt is not None:
    t['mqar_512x64_d128_mipt_acc'] = target(mipt, 0.99, mipt >= 0.99, 'results/mqar.json',
                                            f"K=64 (=N), shrunk budget ({t512['K64']['epochs']} epochs, "
                                            f"{t512['K64']['stopped']}); attention twin {t512.get('attn', {}).get('test', 0):.3f}")
if mipt is not None and peer_scores:
    best = max(peer_scores, key=peer_scores.get)
    missing = [p for p in PEERS if p not in peer_scores]
    gap = mipt - peer_scores[best]
    t['mqar_512x64_mipt_minus_best_peer'] = target(
        gap, 0.0, gap > 0 and not missing, 'results/mqar.json',
        f"best recurrent peer {best} at {peer_scores[best]:.4f}; peers' epochs in the same minutes: " +
        ', '.join(f"{p} {t512[p].get('epochs')}" for p in peer_scores) +
        " (on the H200 image fla refuses the gated backward, so peers.py trains Gated DeltaNet and Mamba2 "
        "through slower exact substitutes)" + (f"; not measured: {', '.join(missing)}" if missing else ''))
# Zoology's Figure 2 protocol (bash results/recall.sh RUNS 8 zoology): the twin as Zoology's attention, MIPT K=N; until
# it runs, the twin's figure here is the shrunk budget's, so the target says which protocol it comes from
ZOO = 'bash results/recall.sh RUNS 8 zoology'
for key, size, d in (('mqar_256x16_d128_twin_acc', '256x16', 128), ('mqar_512x64_d128_twin_acc', '512x64', 128),
                     ('mqar_512x64_d64_twin_acc', '512x64', 64)):
    r = table.get(size, {}).get('attn') if d == 128 else None
    m = None if r is None else r.get('test')
    t[key] = target(m, 0.99, m is not None and m >= 0.99, 'results/mqar.json',
                    (f"the shrunk budget ({r.get('epochs')} epochs, {r.get('stopped')}, lr {r['lr']}), not Zoology's "
                     f"protocol; that run ({ZOO}) not run yet" if m is not None else f"not run yet: {ZOO} on a GPU"),
                    sense='>=')
kn = t512.get('K64', {}).get('test')
t['mqar_512x64_d128_mipt_KN_acc'] = target(kn, 0.99, kn is not None and kn >= 0.99, 'results/mqar.json',
                                           f"K=64 (=N), the shrunk budget; Zoology's protocol ({ZOO}) not run yet",
                                           sense='>=')
for size in table:
    print(f"== {size}")
    for model, r in table[size].items():
        print(f"  {model:15s} val {r.get('val')} test {r.get('test')} lr {r['lr']} epochs {r.get('epochs')} "
              f"({r.get('stopped')}) state {r.get('state_bytes_per_layer')} {r.get('error', '')[:90]}")
for k in ('mqar_512x64_d128_mipt_acc', 'mqar_512x64_mipt_minus_best_peer'):
    if k in t:
        print(f"{k}: {t[k]['measured']} (goal {t[k]['goal']}, met {t[k]['met']}) {t[k]['note']}")
