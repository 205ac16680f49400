"""The cache's training signals compared on validation, and the recall goals with the chosen signal, from the GPU
runs of results/recall.sh (sets signal and goals), into results/signal.json and the module-level `targets` that
results/summarize.py merges into results/summary.json.

Sources, in results/raw/: signal_runs.json and goals_runs.json (results/collect.py of each call's runs, with
results/needle_eval.py's caught fraction and other lengths inside each run). A goal whose runs are missing stays
in the targets with measured None and a note saying what ran. Selection is on validation only; test is read once
per run by train.py.
"""
import json
import os
import re

from summarize import mean, target

here = os.path.dirname(os.path.abspath(__file__))
raw = os.path.join(here, 'raw')
# the commands as run (ONLY picks the runs of a set that one device call could hold)
SIGNAL_CMD = ("ONLY='signal-(a512|a2048|f1024|v2000)-((explore|dense-pen1.0|mixed-pen1.0)-s[12]|weighted-s1)$' "
              "MINUTES=4.5 bash results/recall.sh RUNS 28 signal")
GOALS_CMD = ("ONLY='goal-(a512|a2048|demoK1|demoK4|v5000)-s[1-5]$|goal-unb2048-tau0.5-s[1-5]$|goal-(a512|a2048|demoK4|"
             "v5000)-attn-s1$' SIGNAL=\"--cache_signal=mixed --p_penalty=1.0\" bash results/recall.sh RUNS 34 goals")
SEEDS = 5


def load(name):
    path = os.path.join(raw, name)
    return {r['run']: r for r in json.load(open(path))} if os.path.exists(path) else {}


def row(r):
    """One run: val at its best checkpoint, test read there once, the caught fraction, other lengths."""
    ev = r.get('needle_eval') or {}
    caught = ev.get('caught') or {}
    return {'val': r['best_val'].get('acc'), 'best_iter': r['best_val'].get('iter'), 'iters': r.get('iters'),
            'test': (r.get('test') or {}).get('acc'), 'wall_time_s': r.get('wall_time_s'),
            'stopped_at_time_limit': r.get('stopped_at_time_limit'), 'device': r.get('device'),
            'train_loss': r.get('final_train_loss'),
            'caught_val': (caught.get('val') or {}).get('caught'), 'caught_test': (caught.get('test') or {}).get('caught'),
            'stored_test': (caught.get('test') or {}).get('stored'),
            'lengths': ev.get('lengths') or {},
            'val_curve': r.get('val_curve'), 'command': r.get('command')}


signal_runs, goal_runs = load('signal_runs.json'), load('goals_runs.json')

# 1. the signals on validation: config -> signal -> seed -> row
name = re.compile(r'^signal-(\w+?)-(.+)-s(\d+)$')
compare = {}
for run, r in sorted(signal_runs.items()):
    m = name.match(run)
    if m:
        compare.setdefault(m.group(1), {}).setdefault(m.group(2), {})[int(m.group(3))] = row(r)
for cfg in compare.values():
    for sig, seeds in cfg.items():
        cfg[sig] = {'seeds': seeds, 'val_mean': mean(s['val'] for s in seeds.values()),
                    'val_min': min((s['val'] for s in seeds.values() if s['val'] is not None), default=None),
                    'caught_val_mean': mean(s['caught_val'] for s in seeds.values())}

# the choice: the best mean over the cells of each signal's mean val (cells where some signal is missing count as 0)
cells = sorted(compare)
choice = {sig: mean((compare[c].get(sig) or {}).get('val_mean') or 0.0 for c in cells)
          for sig in sorted({sig for c in cells for sig in compare[c]})}
chosen = max(choice, key=choice.get) if choice else None

# 2. the goals: goal-<cell>[-attn|-tau<t>]-s<seed>
gname = re.compile(r'^goal-(\w+?)(?:-(attn|tau[\d.]+))?-s(\d+)$')
goals = {}
for run, r in sorted(goal_runs.items()):
    m = gname.match(run)
    if m:
        goals.setdefault(m.group(1), {}).setdefault(m.group(2) or 'mipt', {})[int(m.group(3))] = row(r)


def best_variant(cell, prefix):
    """Of a cell's variants starting with prefix (the unbounded cache's tau values), the best mean val."""
    vs = {v: s for v, s in goals.get(cell, {}).items() if v.startswith(prefix)}
    return max(vs, key=lambda v: mean(x['val'] for x in vs[v].values()) or 0.0) if vs else None


def min_target(cell, variant='mipt', key=lambda s: s['test'], goal=0.99, what='test accuracy'):
    seeds = goals.get(cell, {}).get(variant, {})
    vals = [key(s) for s in seeds.values()]
    vals = [v for v in vals if v is not None]
    measured = min(vals) if vals else None
    note = (f'{what}, the worst of seeds {sorted(seeds)}' if vals else f'not run: no {cell} runs in results/raw/'
            f'goals_runs.json (SIGNAL=... bash results/recall.sh RUNS 34 goals runs them)') + \
        ('' if len(vals) >= SEEDS else f' ({len(vals)} of {SEEDS} seeds)')
    return target(measured, goal, measured is not None and len(vals) >= SEEDS and measured >= goal,
                  'results/signal.json', note + ', every seed must meet it', sense='>=')


unb = best_variant('unb2048', 'tau')
targets = {
    'recall_anywhere512_K4_min_acc': min_target('a512'),
    'recall_anywhere2048_min_acc': min_target('a2048'),
    'recall_anywhere8192_min_acc': min_target('a8192'),
    'recall_train2k_test32k_min_acc': min_target('a2048', key=lambda s: (s['lengths'].get('32768') or {}).get('acc'),
                                                 what='trained at 2048, test accuracy at 32768'),
    'recall_demo_K1_min_acc': min_target('demoK1'),
    'recall_demo_K4_min_acc': min_target('demoK4'),
    'recall_unbounded2048_min_acc': min_target('unb2048', unb or 'tau', what=f'unbounded cache ({unb}, chosen on val)'),
    'recall_vocab5000_min_acc': min_target('v5000'),
}
tokens = [s['stored_test'] for s in goals.get('unb2048', {}).get(unb or '', {}).values() if s['stored_test'] is not None]
targets['recall_unbounded2048_tokens'] = target(mean(tokens), 2.0,
                                                bool(tokens) and mean(tokens) <= 2, 'results/signal.json',
                                                f'mean tokens in the last position\'s cache, test, {unb}' if tokens
                                                else 'not measured: results/needle_eval.py did not finish on the '
                                                'unbounded runs within the device call' if unb
                                                else 'not run: no unb2048 runs in results/raw/goals_runs.json', sense='<=')

with open(os.path.join(here, 'signal.json'), 'w') as f:
    json.dump({'protocol': 'needle datasets of data/needle/prepare.py; config/needle.py (one MIPT layer d=64, Adam 3e-3, '
                           'batch 128, 15 epochs) unless the run\'s command says otherwise; best val checkpoint, test '
                           'read once; caught = the share of needles that the exact eval cache holds at the last '
                           'position (results/needle_eval.py)',
               'commands': {'signal': SIGNAL_CMD, 'goals': GOALS_CMD,
                            'diagnostics': 'python results/needle_eval.py RUNS/* --lengths=8192,32768',
                            'collect': 'python results/collect.py RUNS results/raw/<name>_runs.json'},
               'choice': {'rule': 'the signal with the best mean, over the cells, of its mean val', 'chosen': chosen,
                          'mean_val_over_cells': choice},
               'compare': compare, 'goals': goals}, f, indent=1)
    f.write('\n')

if __name__ == '__main__':
    for k, t in targets.items():
        print(k, t['measured'], t['met'], t['note'])
