"""mipt.py is the whole model: copied alone into an empty folder, the API example runs there with torch alone."""
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the README's API example, with checks: a language model with a K=4 cache, trained a step, decoded
EXAMPLE = '''
import sys
import torch
from mipt import MIPT, MIPTConfig

torch.manual_seed(0)
cfg = MIPTConfig(vocab_size=65, block_size=256, n_layer=2, n_embd=64, n_head=4,
                 mixer='mipt', cache_size=4, cache_tau=0.0,   # cache_size: 0 none, -1 unbounded
                 cache_explore=8)                             # R exploration candidates (training only)
model = MIPT(cfg)
idx = torch.randint(0, 65, (2, 40))
logits, loss = model(idx, targets=idx)          # (2, 40, 65)
loss.backward()
assert logits.shape == (2, 40, 65) and torch.isfinite(loss)

model.eval()
out = model.generate(idx[:, :10], max_new_tokens=20, temperature=0.8, top_k=20)   # (2, 30)
assert out.shape == (2, 30) and torch.equal(out[:, :10], idx[:, :10])

state = model.init_state(batch_size=2)          # DecodeState: layers (MIPTState: h, s, cache slots), pos
for t in range(idx.shape[1]):
    logits, state = model.step(idx[:, t], state)    # one token per row; memory constant in the steps
last, pre = model.prefill(idx)                  # the same state from one parallel pass
assert torch.allclose(last, logits, atol=1e-4, rtol=1e-4) and pre.pos == state.pos == 40
assert state.layers[0].cache.pos.shape == (2, 4) and model.state_bytes(state) == model.state_bytes(pre)

clf = MIPT(MIPTConfig(vocab_size=65, n_classes=4, readout='last', cache_size=4))
logits, loss = clf(idx, targets=torch.tensor([0, 3]), lengths=torch.tensor([40, 17]))  # right-padded
assert logits.shape == (2, 4)
print('ok', sorted(m for m in ('kernels', 'cache_kernel', 'engine', 'triton') if m in sys.modules))
'''


def run(code, cwd):
    # -E: no PYTHONPATH, so that only the folder itself (sys.path[0] for -c) holds project files
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-E', '-c', code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_mipt_py_alone_runs_the_api_example(tmp_path):
    shutil.copy(os.path.join(ROOT, 'mipt.py'), tmp_path)
    r = run(EXAMPLE, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ['ok', '[]']


def test_mipt_py_alone_refuses_a_forced_kernel_in_one_line(tmp_path):
    shutil.copy(os.path.join(ROOT, 'mipt.py'), tmp_path)
    r = run("import torch\nfrom mipt import MIPT, MIPTConfig\n"
            "MIPT(MIPTConfig(scan_impl='cuda', cache_size=4))(torch.zeros(1, 5, dtype=torch.long))", tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "RuntimeError: recurrence with impl='cuda' needs kernels.py beside mipt.py; use 'auto' or 'torch'")


def test_the_cpu_path_imports_no_kernel_module_beside_kernels_py():
    """In the repository, a CPU forward with the default 'auto' settings asks kernels.py, which picks the reference
    without importing the Triton kernel module (nor Triton)."""
    r = run(EXAMPLE, ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ['ok', "['kernels']"]


def test_the_readme_api_example_runs_beside_mipt_py_alone(tmp_path):
    """The README's API section promises its first example needs mipt.py alone and torch."""
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        api = f.read().split('\n## API', 1)[1]
    example = re.search(r'```python\n(.*?)```', api, re.S).group(1)
    shutil.copy(os.path.join(ROOT, 'mipt.py'), tmp_path)
    r = run(example, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
