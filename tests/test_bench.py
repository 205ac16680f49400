"""bench.py's targets, computed from made-up results on the CPU (the measurements themselves need a GPU)."""
import os
import sys

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
