"""Which real architectures deltacnn.convert handles, and how well: a support table.

For each architecture of tests/arch_zoo.py (torchvision, timm, Ultralytics; random weights, no
downloads): convert it strictly, and if that fails with allow_dense_fallback=True; count the
convs that became delta layers, sit in dense islands, or stay plain dense module calls; and run
a synthetic clip (textured background, moving objects, noise) through both models at tau 0,
reporting the worst error leaf by leaf (max abs error / max abs dense value, per leaf).

    python3 benchmarks/arch_support.py [--frames 60] [--only tv_resnet18,yolov8n] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import deltacnn  # noqa: E402
import arch_zoo  # noqa: E402


def clip_for(arch: arch_zoo.Arch, frames: int, seed: int = 5) -> torch.Tensor:
    return arch_zoo.moving_clip(frames, *arch.size, seed=seed)  # the clip the tests use


def leaf_errors(got, want) -> tuple[float, float]:
    """(max abs error, max over leaves of max abs error / max abs dense value)."""
    g, r = arch_zoo.leaves(got), arch_zoo.leaves(want)
    if len(g) != len(r) or arch_zoo.structure(got) != arch_zoo.structure(want):
        raise AssertionError(f"output structure differs: {arch_zoo.structure(got)} vs {arch_zoo.structure(want)}")
    abs_err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(g, r))
    rel = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)) for a, b in zip(g, r))
    return abs_err, rel


def island_names(dm) -> list[str]:
    from deltacnn.layers import DenseIsland
    return [m.name for m in dm.graph_module.modules() if isinstance(m, DenseIsland)]


def check(arch: arch_zoo.Arch, frames: int) -> dict:
    row: dict = {"arch": arch.id, "package": arch.package}
    if not arch.available():
        row["status"] = f"skipped: {arch.package} not installed"
        return row
    model = arch_zoo.build(arch)
    clip = clip_for(arch, frames)
    dm, errors = None, []
    for fallback in (False, True):
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dm = deltacnn.convert(model, clip[0], allow_dense_fallback=fallback, dense_above=None)
            row["convert_s"] = round(time.perf_counter() - t0, 2)
            row["fallback"] = fallback
            break
        except Exception as e:  # noqa: BLE001 - the table reports every failure
            errors.append(f"{'fallback' if fallback else 'strict'}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    row["convert_errors"] = errors
    if dm is None:
        row["status"] = "does not convert"
        return row
    cov = arch_zoo.conv_coverage(model, dm, clip[0])
    row.update({k: cov[k] for k in ("convs", "delta_mac_share", "island_mac_share", "tail_mac_share",
                                    "dense_mac_share")})
    row.update({"delta_convs": len(cov["delta"]), "island_convs": cov["island"], "tail_convs": cov["tail"],
                "dense_convs": cov["dense"], "missing_convs": cov["missing"]})
    report = getattr(dm, "report", None)
    if report is not None:
        row["islands"] = [{"node": r.node, "op": r.op, "mac_share": report.share(r.macs)} for r in report.islands]
        row["island_op_mac_share"] = sum(report.share(r.macs) for r in report.islands)
        row["tails"] = [r.node for r in report.tails]
        row["tail_op_mac_share"] = sum(report.share(r.macs) for r in report.tails)
    else:
        row["islands"] = island_names(dm)
    worst_abs, worst_rel = 0.0, 0.0
    t0 = time.perf_counter()
    try:
        for t in range(frames):
            with torch.no_grad():
                want = model(clip[t])
            a, r = leaf_errors(dm(clip[t]), want)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
        row["status"] = "ok" if worst_rel < 1e-4 else "wrong output"
    except Exception as e:  # noqa: BLE001
        row["status"] = f"fails at frame {t}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        row["traceback"] = traceback.format_exc(limit=-4)
    row.update({"max_abs_err": worst_abs, "max_rel_err": worst_rel, "frames_run_s": round(time.perf_counter() - t0, 1)})
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'architecture':36s} {'status':18s} {'convs':>5s} {'delta':>5s} {'isl.c':>5s} {'tail':>4s} "
            f"{'plain':>5s} {'islands':>7s} {'isl.MAC':>7s} {'tail MAC':>8s} {'max rel err':>11s} {'run s':>6s}")
    lines = [head]
    for r in rows:
        st = r["status"] if len(r["status"]) <= 18 else r["status"][:17] + "~"
        if "convs" not in r:
            lines.append(f"{r['arch']:36s} {st:18s}")
            continue
        lines.append(f"{r['arch']:36s} {st:18s} {r['convs']:5d} {r['delta_convs']:5d} {len(r['island_convs']):5d} "
                     f"{len(r['tail_convs']):4d} {len(r['dense_convs']):5d} {len(r['islands']):7d} "
                     f"{r.get('island_op_mac_share', 0):7.1%} {r.get('tail_op_mac_share', 0):8.1%} "
                     f"{r.get('max_rel_err', float('nan')):11.1e} {r.get('frames_run_s', 0):6.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--only", default="", help="comma-separated architecture ids")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "arch_support.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    want = set(filter(None, args.only.split(",")))
    rows = []
    for arch in arch_zoo.ARCHS:
        if want and arch.id not in want:
            continue
        row = check(arch, args.frames)
        rows.append(row)
        print(table([row]).splitlines()[1], flush=True)
        for e in row.get("convert_errors", []):
            print("    " + e, flush=True)
        if not row["status"].startswith(("ok", "skipped")) and "dense_convs" in row and row["dense_convs"]:
            print(f"    dense convs: {row['dense_convs'][:6]}{' ...' if len(row['dense_convs']) > 6 else ''}")
    print()
    print(table(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": {"torch": torch.__version__}, "frames": args.frames, "rows": rows},
                              indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
