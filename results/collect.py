"""Gather runs/*/metrics.json into one JSON list: python results/collect.py RUNS_DIR OUT_FILE"""
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
    runs.append(m)
with open(sys.argv[2], 'w') as f:
    json.dump(runs, f, indent=1)
print(f'{len(runs)} runs -> {sys.argv[2]}')
