"""Paired A/B of the layers this lane changed (cats, slices, Densify, the box decode) against the whole delta
frame: session 11 conversion vs the current one, 1 thread, CPU clock, variant order alternating frame by frame.

    PYTHONPATH=/work/shared/bench python3 benchmarks/cpu_tail_ab.py
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import warnings, time, statistics, importlib, sys; warnings.simplefilter("ignore")
import torch
torch.set_num_threads(1)
from cpu_profile import load, convert_at
from deltacnn.layers import Densify, DenseCall, DeltaCat, DeltaSlice
from deltacnn.models.yolov8 import DeltaBoxDecode
C = importlib.import_module("deltacnn.convert")
model, frames = load("yolov8n", 200, 50)
new = convert_at(model, frames, "deltacnn/data/yolov8n_vtest.json", 1)
o1, o2 = C._delta_tail_of, C._Converter._channel_range
C._delta_tail_of = lambda n: None
C._Converter._channel_range = lambda self, n: None
old = convert_at(model, frames, "deltacnn/data/yolov8n_vtest.json", 1)
C._delta_tail_of, C._Converter._channel_range = o1, o2
spent = {"new": [0.0], "old": [0.0]}
def wrap(m, key):
    f = m.forward
    def timed(*a, **k):
        t0 = time.process_time()
        try: return f(*a, **k)
        finally: spent[key][0] += time.process_time() - t0
    m.forward = timed
for key, dm in (("old", old), ("new", new)):
    for m in dm.graph_module.modules():
        if isinstance(m, (Densify, DenseCall, DeltaCat, DeltaSlice)): wrap(m, key)
tot = {"new": [], "old": []}; tail = {"new": [], "old": []}
with torch.no_grad():
    for i, f in enumerate(frames):
        order = (("old", old), ("new", new)) if i % 2 else (("new", new), ("old", old))
        for key, dm in order:
            spent[key][0] = 0.0
            t0 = time.process_time(); dm(f); dt = time.process_time() - t0
            if i >= 2 and dm.last_mode == "delta":
                tot[key].append(dt * 1e3); tail[key].append(spent[key][0] * 1e3)
d = [a - b for a, b in zip(tot["new"], tot["old"])]; dt_ = [a - b for a, b in zip(tail["new"], tail["old"])]
print("delta frames", len(d), "total old %.1f new %.1f paired %+.2f mean %+.2f median" % (statistics.median(tot["old"]), statistics.median(tot["new"]), statistics.mean(d), statistics.median(d)))
print("cats+slices+densify+decode: old %.2f new %.2f paired %+.2f mean %+.2f median" % (statistics.median(tail["old"]), statistics.median(tail["new"]), statistics.mean(dt_), statistics.median(dt_)))
