"""Diagnostic behind the tuner fix of session 8: YOLOv8n on the first N frames of vtest.avi under
relative (input, layer) thresholds, with or without the dense fallback, reporting f1_stable, F1,
the delta frames' MACs and how every frame ran.

    python3 benchmarks/tune_dense_fallback_diag.py N DENSE_ABOVE|off INPUT:LAYERS:GROUP ...

GROUP: all (every layer at LAYERS), nohead (model.22.* held at 0), headonly, or one layer's name.
Dense results are cached in /tmp/tuner2/refs<N>.pkl. One thread; CPU seconds per setting printed.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn, not an installed one
import sys, time, pickle, os, collections, torch, numpy as np
torch.set_num_threads(1)
from deltacnn.commands.common import get_task, load_model, open_video, build_delta
from deltacnn.calibration import measure_scales
from deltacnn.tasks.base import to_float
N = int(sys.argv[1]); DA = None if sys.argv[2] == "off" else float(sys.argv[2])
task = get_task("yolov8n"); dev = torch.device("cpu"); dense = load_model(task, dev)
src = open_video("/usr/share/doc/opencv-doc/examples/data/vtest.avi", N)
Path("/tmp/tuner2").mkdir(exist_ok=True)
cache = f"/tmp/tuner2/refs{N}.pkl"
xs = [task.preprocess(f) for f in src]
if os.path.exists(cache):
    refs = pickle.load(open(cache, "rb"))
else:
    with torch.no_grad():
        refs = [task.postprocess(dense(x)) for x in xs]
    pickle.dump(refs, open(cache, "wb"))
print("frames", len(xs), flush=True)
dm = build_delta(dense, xs[0], min_blob=3, dense_above=DA)
sc = measure_scales(dm, xs[0]); dm.enable_stats(True)
known = dm.thresholds.known
head = [k for k in known if k.startswith("model.22.")]
for spec in sys.argv[3:]:
    ti, tg, grp = spec.split(":"); ti, tg = float(ti), float(tg)
    th = dm.thresholds
    th.input, th.default, th.overrides = ti, (0.0 if grp in known or grp == "headonly" else tg), {}
    if grp == "nohead": th.overrides = {k: 0.0 for k in head}
    elif grp == "headonly": th.overrides = {k: tg for k in head}
    elif grp in known: th.overrides = {grp: tg}
    dm.reset(); m = []; macs = dense_m = 0; modes = collections.Counter(); t0 = time.process_time()
    for i, x in enumerate(xs):
        y = dm(x); fs = dm.frame_stats(); modes[dm.last_mode] += 1
        if not fs.keyframe: macs += fs.macs; dense_m += fs.dense_macs
        m.append(task.agreement(task.postprocess(to_float(y)), refs[i]))
    f1s = [x['f1_stable'] for x in m]
    blocks = [np.mean(f1s[i:i+20]) for i in range(0, len(m), 20)]
    print(f"{spec:28s} f1s={np.mean(f1s):.4f} f1={np.mean([x['f1'] for x in m]):.4f} MACs={macs/max(dense_m,1):.1%} "
          f"modes={dict(modes)} cpu={time.process_time()-t0:.0f}s blocks {' '.join(f'{b:.2f}' for b in blocks)}", flush=True)
