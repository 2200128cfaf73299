"""Per-layer time of the cpu backend's one-call convs (DeltaConvPlan.run, run_cat) on delta frames, 1 thread, CPU clock,
with the counted multiply-adds and GMAC/s of each layer shape: which convs are slow.

    PYTHONPATH=.:/work/shared/bench python3 benchmarks/cpu_conv_layers.py centerface 8/0.2 10
"""
import sys, time, collections, statistics
import torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_profile import load, convert_at
from deltacnn.backends import cpu_fused
model_name, point, nfr = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
T = collections.defaultdict(float); M = collections.defaultdict(float); N = collections.Counter()
orig = cpu_fused.FusedCpuBackend._conv_call
def conv_call(self, d, p, spec):
    c = orig(self, d, p, spec)
    if c.run is None: return c
    key = (tuple(p.weight.shape), p.groups, tuple(d.values.shape[2:]), p.window.stride, spec.kind if spec else "lin")
    def timer(run):
        def timed(*a):
            t0 = time.process_time(); out = run(*a); T[key] += time.process_time() - t0
            M[key] += out[1] * p.weight.numel(); N[key] += 1
            return out
        return timed
    return c._replace(run=timer(c.run), run_cat=timer(c.run_cat) if c.run_cat is not None else None)
cpu_fused.FusedCpuBackend._conv_call = conv_call
model, frames = load(model_name, 200, nfr)
dm = convert_at(model, frames, point, 1)
with torch.no_grad():
    dm.reset()
    for i, f in enumerate(frames):
        if i == 2: T.clear(); M.clear(); N.clear()
        dm(f)
nd = nfr - 2
tot = sum(T.values())
print(f"total run {tot/nd*1e3:.1f} ms/frame, {sum(M.values())/nd/1e6:.0f} MMAC/frame counted, {sum(M.values())/tot/1e9:.1f} GMAC/s")
for k, v in sorted(T.items(), key=lambda kv: -kv[1])[:25]:
    print(f"{str(k):75s} {v/nd*1e3:6.2f} ms  {M[k]/nd/1e6:7.1f} MMAC  {M[k]/max(v,1e-9)/1e9:5.1f} GMAC/s  calls/frame {N[k]/nd:.0f}")
