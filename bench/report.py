"""Results of a phased benchmark over several file systems: the JSON record,
the Markdown tables and the bar chart per phase.

Input: targets (``bench/targets.py``) whose ``details["runs"]`` hold one dict
per run mapping phase name to seconds. Every phase is summarised by median,
min and max over the runs; "total" is the sum of the phases of each run.
Ratios compare medians against the ``local`` and ``passthrough`` targets,
when those ran. Goals (issue 8, DESIGN.md "Performance budget") are judged on
the median totals of p2pfs.
"""

from __future__ import annotations

import common

FORMAT = 1
TITLES = {"mkdir": "1. create directories", "copy": "2. copy files in",
          "stat": "3. stat every file", "read": "4. read every byte",
          "compile": "5. compile and link", "total": "Andrew total"}
REFERENCES = ("local", "passthrough")
# (target, reference, limit, source) on the median total
GOALS = (("p2pfs", "local", 2.0, "issue 8"), ("p2pfs", "passthrough", 1.3, "issue 8"),
         ("p2pfs", "local", 1.10, "DESIGN.md performance budget"))


def _summaries(runs: list[dict], phases: tuple[str, ...]) -> dict:
    out = {p: common.summarize([r[p] for r in runs]) for p in phases}
    out["total"] = common.summarize([sum(r[p] for p in phases) for r in runs])
    return out


def _ratios(rows: list[dict], stat: str) -> dict:
    """{target: {"vs_local": {phase: ratio}, "vs_passthrough": ...}} of one statistic."""
    values = {d["name"]: {k: v[stat] for k, v in d["summary"].items()}
              for d in rows if "summary" in d}
    out: dict = {}
    for name, mine in values.items():
        for ref in REFERENCES:
            if ref in values and ref != name:
                out.setdefault(name, {})[f"vs_{ref}"] = {
                    k: mine[k] / values[ref][k] if values[ref][k] > 0 else None for k in mine}
    return out


def _paired_ratios(rows: list[dict], phases: tuple[str, ...]) -> dict:
    """Median of run-by-run ratios. The targets of one round ran back to back,
    so this cancels much of the load drift of a shared machine."""
    runs_of = {d["name"]: d["runs"] for d in rows if "summary" in d}
    out: dict = {}
    for name, runs in runs_of.items():
        for ref in REFERENCES:
            if ref not in runs_of or ref == name or len(runs_of[ref]) != len(runs):
                continue
            pairs = [({**a, "total": sum(a[p] for p in phases)},
                      {**b, "total": sum(b[p] for p in phases)}) for a, b in zip(runs, runs_of[ref])]
            out.setdefault(name, {})[f"vs_{ref}"] = {
                k: common.summarize([a[k] / b[k] for a, b in pairs])["median"]
                if all(b[k] > 0 for _, b in pairs) else None
                for k in (*phases, "total")}
    return out


def build(targets, tree: dict, args, machine: dict) -> dict:
    """The JSON-ready result of one benchmark invocation (``machine`` taken
    before the runs; the load average after them is added here)."""
    phases = tuple(args.phases)
    rows = []
    for t in targets:
        d = t.describe()
        runs = d.get("runs") or []
        if runs and t.status == "ok":
            d["summary"] = _summaries(runs, phases)
        rows.append(d)
    ratios = _ratios(rows, "median")
    min_ratios = _ratios(rows, "min")  # fastest runs: the least disturbed by other load
    paired = _paired_ratios(rows, phases)
    goals = []
    for who, ref, limit, source in GOALS:
        r = ratios.get(who, {}).get(f"vs_{ref}", {}).get("total")
        goals.append({"target": who, "reference": ref, "limit": limit, "source": source,
                      "ratio": r, "met": None if r is None else r <= limit})
    config = {"runs": args.runs, "warmup": args.warmup, "scale": args.scale,
              "phases": list(phases), "compare": bool(args.compare), "tree": tree}
    machine = {**machine, "load_after": common.load_average()}
    result = {"suite": "andrew", "format": FORMAT, "machine": machine,
              "config": config, "targets": rows, "ratios": ratios, "paired_ratios": paired,
              "min_ratios": min_ratios,
              "goals": goals}
    if any(d["kind"] == "passthrough" for d in rows):
        import passthroughfs  # only here: it needs pyfuse3
        result["passthrough_cache"] = {**passthroughfs.cache_settings(),
                                       "extra_args": args.passthrough_args.split()}
    return result


def _ratio_cell(result: dict, name: str, ref: str, key: str) -> str:
    return common.fmt_ratio(result["ratios"].get(name, {}).get(f"vs_{ref}", {}).get(key))


def markdown(result: dict) -> str:
    cfg, tree = result["config"], result["config"]["tree"]
    phases = [*cfg["phases"], "total"]
    ok = [d for d in result["targets"] if "summary" in d]
    refs = [r for r in REFERENCES if any(d["name"] == r for d in ok)]
    out = [f"# Andrew benchmark: {tree['name']} {tree['version']}", "",
           f"{tree['files']} files in {tree['directories']} directories, {tree['bytes']:,} bytes, "
           f"x{cfg['scale']} per run; {cfg['runs']} measured run(s) after {cfg['warmup']} warm-up"
           f"{', targets interleaved run by run' if cfg['compare'] else ''}; "
           f"build `{' '.join(tree['build'])}`. Times: median, min and max over the runs.",
           "", common.machine_markdown(result["machine"])]
    if "passthrough_cache" in result:
        c = result["passthrough_cache"]
        out += [f"- pass-through kernel cache: entry {c['entry_timeout']} s, attr "
                f"{c['attr_timeout']} s, negative {c['negative_timeout']} s, keep_cache "
                f"{c['keep_cache']}, write-back {c['writeback_cache']}, read-ahead "
                f"{c.get('read_ahead_kb')} KiB, `{','.join(c['mount_options'])}`"]
    out.append("")
    m = result["machine"]
    busy = max([*(m.get("load") or [0])[:1], *(m.get("load_after") or [0])[:1]])
    if m.get("cores") and busy > 0.75 * m["cores"]:
        out += [f"Note: the machine was busy (load {busy} on {m['cores']} cores) with other work; "
                "timings are noisy, and the min column is the closest to the uncontended cost.", ""]
    out += ["## Targets", "", common.markdown_table(
        ["target", "what", "status"],
        [[d["name"], d["label"], d["status"] + (f": {d['reason']}" if d["reason"] else "")]
         for d in result["targets"]])]
    for d in result["targets"]:
        if d["status"] != "ok":
            out += ["", f"{d['name']}: {d['reason'] or d['status']}"]
    head = ["target", "median", "min", "max", *[f"x {r}" for r in refs]]
    for key in phases if ok else ():
        rows = []
        for d in ok:
            s = d["summary"][key]
            rows.append([d["name"], common.fmt_seconds(s["median"]), common.fmt_seconds(s["min"]),
                         common.fmt_seconds(s["max"]),
                         *[_ratio_cell(result, d["name"], r, key) for r in refs]])
        out += ["", f"## {TITLES.get(key, key)}", "", common.markdown_table(head, rows, right=range(1, 9))]
    def listed(key):
        return "; ".join(f"{name} {common.fmt_ratio(v['total'])} {ref[3:]}"
                         for name, refs_ in result.get(key, {}).items()
                         for ref, v in refs_.items() if name not in REFERENCES or ref == "vs_local")
    if result.get("paired_ratios"):
        out += ["", "Other views of the total, less sensitive to a busy machine: the median of "
                f"the run-by-run ratios (each round ran the targets back to back): "
                f"{listed('paired_ratios')}; the ratio of the fastest runs: {listed('min_ratios')}."]
    goals = [g for g in result["goals"] if g["ratio"] is not None]
    if goals:
        out += ["", "## Goals (median Andrew total)", ""]
        out += [f"- {g['target']} <= {g['limit']}x {g['reference']} ({g['source']}): "
                f"{g['ratio']:.2f}x, {'met' if g['met'] else 'NOT met'}" for g in goals]
    return "\n".join(out) + "\n"


def chart(result: dict, path) -> None:
    """One bar chart per phase (and the total): median bars, min-max whiskers,
    the ratio to the local directory written over each bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [*result["config"]["phases"], "total"]
    ok = [d for d in result["targets"] if "summary" in d]
    cols = 3
    rows = (len(phases) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, phases):
        top = max((d["summary"][key]["max"] for d in ok), default=1.0)
        unit, k = ("s", 1.0) if top >= 1 else ("ms", 1e3) if top >= 1e-3 else ("us", 1e6)
        med = [d["summary"][key]["median"] * k for d in ok]
        lo = [m - d["summary"][key]["min"] * k for m, d in zip(med, ok)]
        hi = [d["summary"][key]["max"] * k - m for m, d in zip(med, ok)]
        xs = range(len(ok))
        ax.bar(xs, med, yerr=[lo, hi], capsize=4, color=colours[:len(ok)])
        ax.set_xticks(list(xs), [d["name"] for d in ok], fontsize=8)
        ax.set_title(TITLES.get(key, key), fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        for x, d, m in zip(xs, ok, med):
            r = result["ratios"].get(d["name"], {}).get("vs_local", {}).get(key)
            if r is not None:
                ax.annotate(f"{r:.2f}x", (x, m), ha="center", va="bottom", fontsize=8,
                            xytext=(0, 2), textcoords="offset points")
    for ax in list(axes.flat)[len(phases):]:
        ax.set_visible(False)
    cfg, m = result["config"], result["machine"]
    fig.suptitle(f"Andrew benchmark, {cfg['tree']['name']} {cfg['tree']['version']} x{cfg['scale']}, "
                 f"median of {cfg['runs']} (whiskers: min-max) - {m.get('cpu')}, {m.get('date')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
