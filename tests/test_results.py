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
