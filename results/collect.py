"""Gather runs/*/metrics.json (with each run's command.txt and its val curve from log.jsonl) into one JSON list:
python results/collect.py RUNS_DIR OUT_FILE"""
import glob
import json
import os
import sys

runs = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], '*', 'metrics.json'))):
    with open(path) as f:
        m = json.load(f)
    m['run'] = os.path.basename(os.path.dirname(path))
    cmd = os.path.join(os.path.dirname(path), 'command.txt')
    if os.path.exists(cmd):
        m['command'] = open(cmd).read().strip()
    log = os.path.join(os.path.dirname(path), 'log.jsonl')
    if os.path.exists(log):
        evals = [json.loads(line) for line in open(log) if '"eval"' in line]
        m['val_curve'] = [[e['iter'], e['eval'].get('acc', e['eval'].get('loss'))] for e in evals]
    runs.append(m)
with open(sys.argv[2], 'w') as f:
    json.dump(runs, f, indent=1)
print(f'{len(runs)} runs -> {sys.argv[2]}')
