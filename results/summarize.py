"""Rebuild every experiment file in results/ and results/summary.json from the raw runs, always the same way:

    python results/summarize.py

Each step is a flat script that writes its own experiment files and leaves its targets in a module-level dict
`targets`; this script runs the steps in the fixed order of STEPS and writes summary.json from their targets in
that order. Two steps may not define the same target. Then `python results/report.py` rebuilds RESULTS.md.
"""
import json
import os
import runpy
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = (
    'summarize_h100.py',    # results/experiments.sh on an H100: classification, LMs, the needle before the signal
    'summarize_recall.py',  # results/recall.sh needle / long / lm on an H200: the needle with the selection signal
    'summarize_mqar.py',    # results/recall.sh mqar on an H200
    'summarize_signal.py',  # results/recall.sh signal / goals: the training signals on val, the recall goals
)


def target(measured, goal, met, source, note='', sense=None):
    """One entry of summary.json's targets: met is computed by the caller from measured. sense ('>=' or '<='), where
    given, says which side of goal meets it (needed where measured is None: a target not run yet)."""
    t = {'measured': measured, 'goal': goal, 'met': met, 'source': source, 'note': note}
    return {**t, 'sense': sense} if sense else t


def mean(xs):
    """The mean of the values that are not None, or None."""
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def merge(parts):
    """The targets of every step, in order; a name defined twice is an error, not a silent overwrite."""
    out = {}
    for step, targets in parts:
        for name, t in targets.items():
            if name in out:
                raise SystemExit(f'error: target {name!r} is defined by two steps (the second: {step})')
            out[name] = t
    return out


if __name__ == '__main__':
    parts = [(step, runpy.run_path(os.path.join(HERE, step), run_name='__main__')['targets']) for step in STEPS]
    with open(os.path.join(HERE, 'summary.json'), 'w') as f:
        json.dump({'targets': merge(parts)}, f, indent=1)
        f.write('\n')
    print(f'wrote results/summary.json ({sum(len(t) for _, t in parts)} targets from {len(STEPS)} steps)')
