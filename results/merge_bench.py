"""results/bench.json and results/bench.md of this turn, from two H200 bench.py runs (python results/merge_bench.py).

The first full run (results/raw/h200_call6) crashed in `batchdecode` at batch 128 x 64k: the fused cache kernel's
offsets overflowed int32 in that prefill (fixed in fad8ca7), and the illegal access ended the process, so its
`trainmix` and `mixers` never ran. The second run (results/raw/h200_call7, the fix) ran `batchdecode`, `trainmix`
and `mixers`; its time limit cut `mixers` after the fla HGRN row at 2x8192, which was printed but not yet saved:
that row is read from its log. Sections come from one run each; `runs` says which.
"""
import ast
import json
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
import bench  # noqa: E402

first = json.load(open(os.path.join(here, 'raw', 'h200_call6', 'bench', 'bench.json')))
second = json.load(open(os.path.join(here, 'raw', 'h200_call7', 'bench', 'bench.json')))
log = open(os.path.join(here, 'raw', 'h200_call7', 'bench.log')).read().splitlines()
saved = {(r['B'], r['T'], r['layer']) for r in second['mixers']}
for line in log:
    if line.startswith("{'B':"):
        row = ast.literal_eval(line)
        if (row['B'], row['T'], row['layer']) not in saved:
            second['mixers'].append({**row, 'note': 'from the log: printed, then the run was cut before saving'})
res = {k: first[k] for k in ('device', 'torch', 'date', 'budget_s', 'quick')}
res['commit'] = f"{first['commit']} (copy, scan, train, decode, memory); {second['commit']} (batchdecode, trainmix, mixers)"
res['command'] = f"{first['command']}  |  {second['command']}"
res['runs'] = [{'commit': r['commit'], 'command': r['command'], 'date': r['date'], 'section_s': r.get('section_s')}
               for r in (first, second)]
for name in ('copy', 'scan', 'train', 'decode', 'memory'):
    res[name] = first[name]
for name in ('batchdecode', 'trainmix', 'mixers'):
    res[name] = second[name]
bench.out_dir = here
bench.save(res)
print(json.dumps(res['targets'], indent=1))
