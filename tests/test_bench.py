"""bench.py's targets, computed from made-up results on the CPU (the measurements themselves need a GPU)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402


def test_decode_target_takes_the_better_variant_at_its_slowest_context():
    rows = [{'context': c, 'batch': 1, 'model': m, 'graphed': True, 'tokens_per_s': v}
            for m, c, v in [('mipt_K64_graph', 8192, 1300.0), ('mipt_K64_graph', 65536, 1290.0),
                            ('mipt_K64_graph_compiled', 8192, 2300.0), ('mipt_K64_graph_compiled', 65536, 2200.0),
                            ('attention_sdpa_compiled', 8192, 5000.0)]]
    t = bench.targets({'batchdecode': rows})['decode_B1_graphed_tokens_per_s']
    assert t['measured'] == 2200.0 and t['model'] == 'mipt_K64_graph_compiled' and t['at_context'] == 65536
    assert not t['met']


def test_best_peer_ignores_skipped_peers():
    rows = [{'B': 2, 'T': 8192, 'layer': name, 'fwdbwd_ms': ms, 'tokens_per_s': 16384 / ms * 1e3 if ms else 'skipped'}
            for name, ms in [('mipt_K0', 2.0), ('mipt_K64', 5.0), ('fla_hgrn', 4.0), ('fla_gla', 10.0)]]
    rows.append({'B': 2, 'T': 8192, 'layer': 'fla_mamba2', 'fwdbwd_ms': 'skipped', 'tokens_per_s': 'skipped'})
    t = bench.targets({'mixers': rows})
    assert t['mipt_over_best_peer_T8192']['best_peer'] == 'fla_hgrn'
    assert t['mipt_over_best_peer_T8192']['measured'] == 4.0 / 5.0
    assert t['cache_over_recurrence_fwdbwd']['measured'] == (5.0 - 2.0) / 2.0


def test_met_is_computed_from_measured():
    """A target that measured nothing (the twin out of memory) is not met, whatever else the row says."""
    assert bench.target(None, 5.0, True)['met'] is None
    assert bench.target(6.0, 5.0, True)['met'] is True and bench.target(6.0, 5.0)['met'] is False
    rows = [{'context': 65536, 'batch': 128, 'model': 'mipt_K64_graph', 'tokens_per_s': 9000.0},
            {'context': 65536, 'batch': 128, 'model': 'attention_sdpa', 'tokens_per_s': 'OOM'},
            {'context': 65536, 'batch': 16, 'model': 'mipt_K64_graph', 'tokens_per_s': 1600.0},
            {'context': 65536, 'batch': 16, 'model': 'attention_sdpa', 'tokens_per_s': 200.0}]
    t = bench.targets({'batchdecode': rows})['decode_B128_64k_mipt_over_attention']
    assert t['measured'] is None and t['met'] is None and t['note'] == 'attention OOM' and t['at_B16'] == 8.0
    text = bench.summary({'device': 'cpu', 'torch': torch.__version__, 'commit': 'x', 'targets': {'k': t}})
    assert 'yes' not in text.splitlines()[-1] and '—' in text.splitlines()[-1]


@pytest.fixture
def options():
    """bench's settings, put back after a test that parses flags into them."""
    keys = bench.OPTIONS + ('SCAN_SHAPES', 'TRAIN_T', 'DECODE_CONTEXT', 'MEMORY_N')
    saved = {k: getattr(bench, k) for k in keys}
    yield
    for k, v in saved.items():
        setattr(bench, k, v)


def test_flags_go_through_the_configurator(options, capsys):
    bench.parse_args(['--quick=True', '--reps=7', '--sections=scan,decode'])
    assert (bench.quick, bench.reps, bench.sections) == (True, 7, 'scan,decode')      # given: kept
    assert bench.out_dir == 'out-bench-quick' and bench.mixer_shapes == '2x8192'       # not given: quick's
    for bad, msg in [(['--repz=3'], "unknown key 'repz'"), (['--reps=many'], 'reps expects an int'),
                     (['--sections=scan,warp'], 'unknown section(s) warp; sections: copy, scan')]:
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(bad)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and msg in err and err.startswith('error: ') and err.count('\n') == 1
