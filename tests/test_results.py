"""The results document is built from results/*.json by one command; the committed one must be current."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_results_document_is_up_to_date():
    spec = importlib.util.spec_from_file_location('report', os.path.join(ROOT, 'results', 'report.py'))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.main(['--check']) in (0, None)


def test_no_target_is_met_unmeasured_or_on_the_wrong_side():
    import json
    targets = json.load(open(os.path.join(ROOT, 'results', 'summary.json')))['targets']
    for name, t in targets.items():
        if t['measured'] is None:
            assert not t['met'], name
        elif t.get('sense') and t['met']:
            assert t['measured'] >= t['goal'] if t['sense'] == '>=' else t['measured'] <= t['goal'], name


def test_recall_sh_only_picks_runs_even_when_the_pattern_starts_with_a_dash(tmp_path):
    """ONLY='-(explore)-s1' once reached grep as options and ran nothing; with PY=echo each picked run writes only its
    command."""
    import subprocess
    env = dict(os.environ, ONLY='-(explore)-s1', PY='echo')
    subprocess.run(['bash', os.path.join(ROOT, 'results', 'recall.sh'), str(tmp_path / 'runs'), '2', 'signal'],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    assert sorted(os.listdir(tmp_path / 'runs')) == [f'signal-{c}-explore-s1' for c in ('a2048', 'a512', 'demo', 'f1024', 'v2000')]
