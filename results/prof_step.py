"""Batch-1 decoding at bench's LM: the kernels of one compiled, graphed step, MIPT and the twin, at 8k context.
python results/prof_step.py (a GPU); writes prof_step.json and prof_<model>.txt under $OUT, else here."""
import sys, time, json, os, torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench, engine, mipt
from torch.profiler import profile, ProfilerActivity
torch.manual_seed(0)
out = {}
OUT = os.environ.get("OUT", ".")
for mixer in ['mipt', 'attention']:
    model = mipt.MIPT(bench.lm_config(mixer, 8192 + 256)).cuda().eval()
    prompt = torch.randint(0, 100277, (1, 8192), device='cuda')
    tok = torch.zeros(1, dtype=torch.long, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        _, st = model.prefill(prompt)
        g = engine.graphed_step(model, st, torch.bfloat16, compile=True)
        for _ in range(20): g(tok)
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(200): g(tok)
        torch.cuda.synchronize(); out[f'{mixer}_graph_ms'] = (time.perf_counter() - t) / 200 * 1e3
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(10): g(tok)
            torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.device_type.name == 'CUDA']
    out[f'{mixer}_kernels_per_step'] = sum(e.count for e in ev) / 10
    out[f'{mixer}_kernel_us_per_step'] = sum(e.self_device_time_total for e in ev) / 10
    with open(f'{OUT}/prof_{mixer}.txt', 'w') as f:
        f.write(prof.key_averages().table(sort_by='self_cuda_time_total', row_limit=60, max_name_column_width=90))
    print(out, flush=True)
json.dump(out, open(f'{OUT}/prof_step.json', 'w'), indent=1)
