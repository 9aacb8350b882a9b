"""Tables and the closing summary of the GPU check (benchmarks/gpu.sh, benchmarks/gpu.py), without
torch: the summary stage must work whatever happened to the others.

    python benchmarks/gpu_report.py DIR    # print and write DIR/SUMMARY.md from what a gpu.sh run left in DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

QUANTITIES = ("diag_ggn", "diag_ggn_mc", "hesscale")
# BackPACK's counterpart of each quantity. It has no HesScale: hesscale is compared with DiagGGNMC,
# BackPACK's cheapest diagonal (one sampled column), and with the forward+backward.
BACKPACK_OF = {"diag_ggn": "backpack/diag_ggn", "diag_ggn_mc": "backpack/diag_ggn_mc",
               "hesscale": "backpack/diag_ggn_mc"}


def _compare(a, b, strict=False):
    """``a < b`` (``strict``) or ``a <= b``; ``None`` where either was not measured."""
    if a is None or b is None:
        return None
    return a < b if strict else a <= b


def criteria(results: dict) -> list[dict]:
    """Per network and quantity, what the issue judges: fused at most inductor's time, below BackPACK's
    time, at most BackPACK's peak memory; its numbers checked; Triton kernels launched on CUDA."""
    rows = []
    cuda = results["meta"].get("device") == "cuda"
    for cfg, net in results["configs"].items():
        res = net.get("methods", {})
        for q in QUANTITIES:
            f = res.get(f"fxcurv/fused/{q}", {})
            ind = res.get(f"fxcurv/inductor/{q}", {})
            bp_id = BACKPACK_OF[q]
            bp = res.get(bp_id, {})
            row = {"config": cfg, "quantity": q, "fused_ms": f.get("median_ms"), "fused_mb": f.get("peak_mb"),
                   "fused_status": f.get("status"), "inductor_ms": ind.get("median_ms"),
                   "eager_ms": res.get(f"fxcurv/eager/{q}", {}).get("median_ms"),
                   "backpack": bp_id.split("/", 1)[1] if bp_id else None, "backpack_ms": bp.get("median_ms"),
                   "backpack_mb": bp.get("peak_mb"), "x_fwdbwd": f.get("x_fwdbwd")}
            oks = [c.get("ok") for c in f.get("checks", {}).values() if "ok" in c]
            row["checked"] = None if not oks else all(oks)
            row["max_rel_diff"] = max((c["max_rel_diff"] for c in f.get("checks", {}).values()
                                       if c.get("max_rel_diff") is not None), default=None)
            row["launches"] = sum(f.get("triton_launches_per_call", {}).values()) if f else None
            row["fused_le_inductor"] = _compare(row["fused_ms"], row["inductor_ms"])
            row["fused_lt_backpack"] = _compare(row["fused_ms"], row["backpack_ms"], strict=True)
            row["mem_le_backpack"] = _compare(row["fused_mb"], row["backpack_mb"])
            row["triton_ran"] = (row["launches"] or 0) > 0 if cuda and f.get("status") == "ok" else None
            rows.append(row)
    return rows


def fmt_ms(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if v < 1 else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def fmt_mb(v) -> str:
    return "–" if v is None else (f"{v:.1f}" if v < 10 else f"{v:.0f}")


def _ratio(a, b) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}"


def _mark(v) -> str:
    return "–" if v is None else ("yes" if v else "**NO**")


def _rel(v) -> str:
    return "–" if v is None else f"{v:.1e}"


def criteria_markdown(rows: list[dict]) -> str:
    out = ["| network | quantity | fused ms | inductor ms | fused ÷ inductor | BackPACK | BackPACK ms | "
           "fused ÷ BackPACK | fused MB | BackPACK MB | ≤ inductor | < BackPACK | mem ≤ BackPACK | checked "
           "(max rel. diff) | Triton launches |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['quantity']} | {fmt_ms(r['fused_ms'])} | {fmt_ms(r['inductor_ms'])} | "
                   f"{_ratio(r['fused_ms'], r['inductor_ms'])} | {r['backpack'] or '–'} | {fmt_ms(r['backpack_ms'])} | "
                   f"{_ratio(r['fused_ms'], r['backpack_ms'])} | {fmt_mb(r['fused_mb'])} | {fmt_mb(r['backpack_mb'])} | "
                   f"{_mark(r['fused_le_inductor'])} | {_mark(r['fused_lt_backpack'])} | "
                   f"{_mark(r['mem_le_backpack'])} | {_mark(r['checked'])} ({_rel(r['max_rel_diff'])}) | "
                   f"{'–' if r['launches'] is None else r['launches']} |")
    return "\n".join(out)


def config_markdown(net: dict) -> str:
    head = (f"### {net['config']}: {net['source']}, N = {net['batch']}, {net['params']:,} parameters "
            f"({net['rounds']} rounds)")
    out = [head, "", "| method | status | time ms (median) | q1–q3 ms | wall ms | ÷ fwd+bwd | peak MB | "
           "max rel. diff (vs) | first call s |", "|---|---|---|---|---|---|---|---|---|"]
    for mid, r in net["methods"].items():
        status = r["status"]
        if status in ("skipped", "unavailable"):
            status += f": {r.get('reason', '')}"
        elif status == "error":
            status += f" ({r.get('phase')}): {r.get('error', '')[:160]}"
        checks = r.get("checks", {})
        diffs = [c for c in checks.values() if c.get("max_rel_diff") is not None]
        worst = max(diffs, key=lambda c: c["max_rel_diff"], default=None)
        cell = "–" if worst is None else (f"{worst['max_rel_diff']:.1e} ({worst['vs']})"
                                          + ("" if all(c.get("ok") for c in diffs) else " **DIFFERS**"))
        if any("note" in c for c in checks.values()) and worst is None:
            cell = "not compared: random draws"
        q13 = "–" if r.get("q1_ms") is None else f"{fmt_ms(r['q1_ms'])}–{fmt_ms(r['q3_ms'])}"
        xf = "–" if r.get("x_fwdbwd") is None else f"{r['x_fwdbwd']:.2f}×"
        first = "–" if r.get("first_call_s") is None else f"{r['first_call_s']:.2f}"
        out.append(f"| {mid} | {status.replace('|', '/')} | {fmt_ms(r.get('median_ms'))} | {q13} | "
                   f"{fmt_ms(r.get('median_wall_ms'))} | {xf} | {fmt_mb(r.get('peak_mb'))} | {cell} | {first} |")
    return "\n".join(out)


def results_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# fxcurv on {meta['device_name']}", "",
             f"{meta['timestamp']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta.get('cuda')}, "
             f"BackPACK {meta['backpack']}; float32, TF32 {'on' if meta['tf32'] else 'off'}; timer: {meta['timer']}; "
             f"{meta['repeats']} rounds at most, {meta['warmup']} warm-up calls after the first; "
             f"{meta.get('wall_s', 0):.0f} s.", ""]
    if meta.get("notes"):
        lines += [f"- {n}" for n in meta["notes"]] + [""]
    lines += ["## Criteria", "", "fused (Triton) against inductor (the same program, `torch.compile`d) and "
              "BackPACK (hesscale: BackPACK has no HesScale; its DiagGGNMC, the cheapest BackPACK diagonal, "
              "stands in). Times: medians.", "", criteria_markdown(results.get("criteria", [])), ""]
    lines += ["## Per network", ""]
    for net in results["configs"].values():
        if "methods" in net:
            lines += [config_markdown(net), ""]
        else:
            lines += [f"### {net['config']}", "", f"{net.get('status', 'failed')}: "
                      f"{net.get('reason') or net.get('error', '?')}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the closing summary of gpu.sh


def _junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["time_s"] = sum(float(s.get("time", 0)) for s in suites)
    out["failed"] = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                msg = (el.get("message") or "").strip().splitlines()
                out["failed"].append(f"{case.get('classname')}::{case.get('name')} [{kind}] {msg[0][:160] if msg else ''}")
    return out


def summarize(out: Path) -> str:
    lines = ["== fxcurv GPU check: summary =="]
    stages = out / "stages.tsv"
    if stages.exists():
        rows = [ln.split("\t") for ln in stages.read_text().splitlines() if ln.strip()]
        lines.append("stages: " + " | ".join(f"{r[0]} {r[1]} ({r[3]} s)" + (f" {r[4]}" if len(r) > 4 and r[4] else "")
                                             for r in rows))
    for junit in sorted((out / "tests").glob("junit*.xml")) if (out / "tests").exists() else []:
        try:
            j = _junit(junit)
        except (ET.ParseError, OSError) as e:
            lines.append(f"tests: {junit.name} unreadable: {e}")
            continue
        passed = j["tests"] - j["failures"] - j["errors"] - j["skipped"]
        lines.append(f"tests ({junit.name}): {passed} passed, {j['failures']} failed, {j['errors']} errors, "
                     f"{j['skipped']} skipped in {j['time_s']:.0f} s")
        lines += [f"  {f}" for f in j["failed"][:25]]
        if len(j["failed"]) > 25:
            lines.append(f"  ... and {len(j['failed']) - 25} more (tests/junit*.xml)")
    results = out / "bench" / "results.json"
    if results.exists():
        r = json.loads(results.read_text())
        meta = r["meta"]
        lines.append(f"bench: {meta['device_name']} | torch {meta['torch']} | triton {meta['triton']} | BackPACK "
                     f"{meta['backpack']} | timer {meta['timer']} | {meta.get('wall_s', 0):.0f} s"
                     + (" | INTERRUPTED" if meta.get("interrupted") else ""))
        lines += [f"  note: {n}" for n in meta.get("notes", [])]
        w = max([len("network")] + [len(c["config"]) for c in r.get("criteria", [])]) + 2
        hdr = (f"{'network':<{w}}{'quantity':<12}{'fused':>9}{'induct.':>9}{'f/ind':>6}{'BackPACK':>9}{'f/BP':>6}"
               f"{'MB fused':>9}{'MB BP':>8}  ok    launches")
        lines.append(hdr)
        for c in r.get("criteria", []):
            flags = "".join("." if v else ("x" if v is False else "-") for v in
                            (c["fused_le_inductor"], c["fused_lt_backpack"], c["mem_le_backpack"], c["checked"]))
            lines.append(f"{c['config']:<{w}}{c['quantity']:<12}{fmt_ms(c['fused_ms']):>9}{fmt_ms(c['inductor_ms']):>9}"
                         f"{_ratio(c['fused_ms'], c['inductor_ms']):>6}{fmt_ms(c['backpack_ms']):>9}"
                         f"{_ratio(c['fused_ms'], c['backpack_ms']):>6}{fmt_mb(c['fused_mb']):>9}{fmt_mb(c['backpack_mb']):>8}"
                         f"  {flags}  {'-' if c['launches'] is None else c['launches']}")
        lines.append("  ok: fused <= inductor time, < BackPACK time, <= BackPACK memory, numbers checked ('.' met, "
                     "'x' NOT met, '-' not measured); ms: medians; BackPACK for hesscale: DiagGGNMC (it has no "
                     "HesScale); launches: Triton kernels per fused call")
        for cfg, net in r["configs"].items():
            for mid, m in net.get("methods", {}).items():
                if m.get("status") == "error":
                    lines.append(f"  ERROR {cfg} {mid} ({m.get('phase')}): {m.get('error', '')[:200]}")
            if "methods" not in net:
                lines.append(f"  {cfg}: {net.get('status')}: {net.get('reason') or net.get('error', '')}"[:300])
    else:
        lines.append("bench: no results.json")
    lines.append(f"files under {out}: " + ", ".join(sorted(str(p.relative_to(out)) for p in out.rglob("*")
                                                          if p.is_file())))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    text = summarize(out)
    (out / "SUMMARY.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
