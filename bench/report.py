"""Turn one results JSON into the terminal table, docs/performance.md and its chart.

    python bench/report.py bench/results/bench-YYYYmmdd-HHMMSS.json
        [--doc docs/performance.md] [--chart docs/performance.png]

run.py calls the same functions at the end of a run; this entry point
regenerates the doc from a stored run without measuring anything.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, SYSTEMS
from targets import ROW_BY_KEY, ROWS, Row, met

DOC = REPO / "docs" / "performance.md"
CHART = REPO / "docs" / "performance.png"


# -- reading a run -----------------------------------------------------------------


def _cells(data: dict) -> dict[tuple[str, str], dict]:
    return {(r["workload"], r["system"]): r for r in data["results"]}


def _label(row: Row, sizes: dict) -> str:
    return row.title.format(n=f"{sizes['meta_files']:,}", src=f"{sizes['source_files']:,}",
                            mem=f"{sizes['memory_files']:,}",
                            app=f"{sizes.get('append_writes', 0):,}")


def _rate(cell: dict | None) -> float | None:
    if cell is None or cell.get("error") or cell.get("rate") is None:
        return None
    return float(cell["rate"])


def _figure(cell: dict | None) -> str:
    if cell is None:
        return "-"
    if cell.get("error"):
        return cell["error"]
    rate, unit = cell["rate"], cell["unit"]
    digits = 1 if rate < 100 else 0
    return f"{rate:,.{digits}f} {unit}"


def _ratio(a: float | None, b: float | None, *, percent: bool) -> str:
    if a is None or b is None or b <= 0:
        return "-"
    return f"{a / b:.0%}" if percent else f"{a / b:.2f}x"


def table_rows(data: dict) -> list[dict[str, str]]:
    """One dict per measured row: the figures, the ratios and the target verdict."""
    cells = _cells(data)
    measured = {r["workload"] for r in data["results"]}
    rows = []
    for row in ROWS:
        if row.key not in measured:
            continue
        kernel, ours, theirs, old = (cells.get((row.key, s)) for s in SYSTEMS)
        k, e, f, o = _rate(kernel), _rate(ours), _rate(theirs), _rate(old)
        verdict = "-"
        if row.target is not None:
            ok = None if e is None else met(row.target, e, k, f)
            verdict = {True: "met", False: "NOT met", None: "n/a"}[ok]
        memory = row.target is not None and row.target.kind == "max"
        rows.append({
            "key": row.key,
            "workload": _label(row, data["sizes"]),
            "kernel": _figure(kernel),
            "ext4box": _figure(ours),
            "fuse2fs": _figure(theirs),
            "ext4box/kernel": "-" if memory else _ratio(e, k, percent=True),
            "fuse2fs/kernel": "-" if memory else _ratio(f, k, percent=True),
            "ext4box/fuse2fs": "-" if memory else _ratio(e, f, percent=False),
            "pyfuse3": _figure(old),
            "ext4box/pyfuse3": "-" if memory else _ratio(e, o, percent=False),
            "target": row.target.text if row.target else "(no target)",
            "met": verdict,
        })
    return rows


_COLUMNS = ("workload", "kernel", "ext4box", "fuse2fs", "ext4box/kernel", "fuse2fs/kernel",
            "ext4box/fuse2fs", "pyfuse3", "ext4box/pyfuse3", "target", "met")


def text_table(data: dict) -> str:
    rows = table_rows(data)
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) if rows else len(c) for c in _COLUMNS}
    line = "  ".join(f"{c:<{widths[c]}}" for c in _COLUMNS)
    out = [line, "-" * len(line)]
    out += ["  ".join(f"{r[c]:<{widths[c]}}" for c in _COLUMNS) for r in rows]
    out.append("(rates: higher is better; ratios are rate / rate; memory: peak RSS)")
    return "\n".join(out)


def markdown_table(data: dict) -> str:
    rows = table_rows(data)
    out = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in rows:
        cells = [r[c] for c in _COLUMNS]
        if r["met"] == "NOT met":
            cells[-1] = "**NOT met**"
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# -- the chart -----------------------------------------------------------------------


def write_chart(data: dict, path: Path) -> str | None:
    """Bars of ext4box and fuse2fs as % of the kernel, the target marked; None or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    cells = _cells(data)
    rows = [row for row in ROWS if row.target is None or row.target.kind != "max"]
    rows = [row for row in rows if (row.key, "kernel") in cells]
    if not rows:
        return "no workload was measured on the kernel"
    fig, ax = plt.subplots(figsize=(10, 0.62 * len(rows) + 1.6))
    height = 0.38
    percents: list[float] = []
    notes: list[tuple[float, str, str]] = []  # written once the axis limits are known
    for i, row in enumerate(rows):
        k = _rate(cells.get((row.key, "kernel")))
        for offset, system, colour in ((-height / 2, "ext4box", "#1f77b4"),
                                       (height / 2, "fuse2fs", "#ff7f0e")):
            value = _rate(cells.get((row.key, system)))
            y = i + offset
            if value is None or k is None:
                cell = cells.get((row.key, system))
                why = (cell or {}).get("error") or "not measured"
                notes.append((y, f"{system}: {why}", colour))
                continue
            pct = 100 * value / k
            percents.append(pct)
            ax.barh(y, pct, height=height, color=colour,
                    label=system if i == 0 else None)
            ax.text(pct * 1.04, y, f"{pct:.0f}%", va="center", fontsize=7)
        target = _target_percent(row, cells)
        if target is not None:
            ax.plot([target, target], [i - 0.45, i + 0.45], color="crimson", linewidth=2,
                    label="issue-7 target for ext4box" if i == 0 else None)
    ax.axvline(100, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    shown = [p for p in percents if p > 0] or [100.0]
    low = 10 ** math.floor(math.log10(min(1.0, min(shown) / 1.5)))
    high = 10 ** math.ceil(math.log10(max(1000.0, max(shown) * 3)))
    ax.set_xlim(low, high)
    ticks = [t for e in range(round(math.log10(low)), round(math.log10(high)) + 1)
             for t in (10.0 ** e, 3 * 10.0 ** e) if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    for y, text, colour in notes:
        ax.text(low * 1.1, y, text, va="center", fontsize=7, color=colour)
    ax.set_yticks(range(len(rows)), [_label(row, data["sizes"]) for row in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed as % of the kernel's ext4 (log scale; dashed line = kernel)")
    commit = str(data["machine"]["git"]["commit"])[:10]
    ax.set_title(f"ext4box and fuse2fs vs the kernel ({data['started'][:10]}, {commit})",
                 fontsize=10, pad=24)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8,
              frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _target_percent(row: Row, cells: dict) -> float | None:
    """Where ext4box's target lies on the chart's % -of-kernel axis."""
    if row.target is None:
        return None
    if row.target.kind == "kernel":
        return 100 * row.target.value
    k = _rate(cells.get((row.key, "kernel")))
    f = _rate(cells.get((row.key, "fuse2fs")))
    if row.target.kind == "fuse2fs" and k and f:
        return 100 * row.target.value * f / k
    return None


# -- the document --------------------------------------------------------------------


def _machine_section(data: dict) -> list[str]:
    m = data["machine"]
    git = m["git"]
    state = "dirty working tree (uncommitted changes)" if git["dirty"] else "clean tree"
    lines = ["| | |", "|---|---|",
             f"| CPU | {m['cpu']}, {m['cores']} cores (hypervisor: "
             f"{m.get('hypervisor', '?')}) |",
             f"| RAM | {m['ram_gib']} GiB |",
             f"| load average (1/5/15 min) | {_load(m, 'load_at_start')} at the start, "
             f"{_load(m, 'load_at_end')} at the end of the run |",
             f"| kernel | {m['kernel']} |",
             f"| disk under the images | {m['disk']} |",
             f"| Python | {m['python']} |",
             f"| fuse2fs | {m['fuse2fs']} (libfuse {m['libfuse (fuse2fs)']}) |",
             f"| fio / e2fsprogs | {m['fio']} / {m['e2fsprogs']} |",
             f"| ext4box commit | `{git['commit']}`, {state} |"]
    if git["dirty"] and git["dirty_files"]:
        files = ", ".join(f"`{f}`" for f in git["dirty_files"][:12])
        more = " …" if len(git["dirty_files"]) > 12 else ""
        lines.append(f"| changed files | {files}{more} |")
    return lines


def _load(machine: dict, key: str) -> str:
    value = machine.get(key)
    return " / ".join(f"{x:.1f}" for x in value) if value else "?"


def _memory_section(data: dict) -> list[str]:
    cell = _cells(data).get(("memory-rss", "ext4box"))
    if cell is None:
        return ["Not measured in this run (`--workloads memory`)."]
    if cell.get("error"):
        return [f"Failed: {cell['error']}"]
    d = cell["details"]
    verdict = "meets" if d["peak_mib"] < ROW_BY_KEY["memory-rss"].target.value else "misses"
    return [
        f"**Peak RSS of `ext4box serve`: {d['peak_mib']:.0f} MiB** (VmHWM), which {verdict}"
        f" the < 200 MiB target.",
        "",
        f"- image: {d['image_gib']} GiB apparent ({d['image_disk_mib']} MiB on disk), "
        f"{d['image_files']:,} files in directories of 1,000, served read-only;",
        f"- walk: `find -printf %s` over {d['entries']:,} entries (lookup + getattr of each) in "
        f"{d['stat_walk_seconds']} s, then {d['files_read']:,} files read "
        f"({d['bytes_read']:,} bytes); {d['walk_seconds']} s in all;",
        f"- RSS: {d['start_mib']:.0f} MiB once mounted, {d['end_mib']:.0f} MiB at the end, "
        f"highest sample {d['sampled_peak_mib']:.0f} MiB.",
    ]


def _caches_section(data: dict) -> list[str]:
    caches = data["machine"]["server_caches"]
    lines = []
    for name, value in caches.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={v}" for k, v in value.items())
            lines.append(f"- {name}: {inner}")
        elif isinstance(value, list):
            lines.append(f"- {name}: " + "; ".join(f"`{v}`" for v in value))
        else:
            lines.append(f"- {name}: {value}")
    return lines


def _warnings(data: dict) -> list[str]:
    found = []
    for r in data["results"]:
        if r.get("note"):
            found.append(f"- {r['workload']} on {r['system']}: {r['note'].splitlines()[0]}")
        if r.get("error") and not str(r["error"]).startswith("refused"):
            found.append(f"- {r['workload']} on {r['system']}: {r['error']}")
    return found


_DIRECT_KEYS = ("seq-read-direct", "seq-write-direct", "rand-read-direct")


def _direct_io_line(data: dict) -> str | None:
    """Which systems took O_DIRECT in this run, read from the direct workloads' cells."""
    cells = [r for r in data["results"] if r["workload"] in _DIRECT_KEYS]
    if not cells:
        return None
    verdicts = []
    for system in SYSTEMS:
        mine = [r for r in cells if r["system"] == system]
        if not mine:
            continue
        refused = sorted({r["error"] for r in mine if str(r.get("error")).startswith("refused")})
        verdicts.append(f"{system}: " + ("; ".join(refused) if refused else "accepted"))
    return "O_DIRECT in this run — " + ", ".join(verdicts) + "."


def _busy_line(data: dict) -> str | None:
    """A caution when other work competed for the CPUs during the run."""
    m = data["machine"]
    loads = [x[0] for x in (m.get("load_at_start"), m.get("load_at_end")) if x]
    if not loads or max(loads) <= (m.get("cores") or 1):
        return None
    return (f"Caution: the load average reached {max(loads):.1f} on {m['cores']} cores — other "
            "processes competed for the CPUs, so workloads that take well under a second vary "
            "a lot between runs. Compare ratios within the run; `--repeat 3` keeps the best "
            "of three.")


def markdown(data: dict, source: str, chart: str | None) -> str:
    rows = table_rows(data)
    targets = [r for r in rows if r["met"] in ("met", "NOT met")]
    met_count = sum(r["met"] == "met" for r in targets)
    sizes = data["sizes"]
    quick = " (**--quick smoke run: small sizes, not for the record**)" if data["quick"] else ""
    out = [
        "# Performance",
        "",
        f"<!-- Generated by bench/report.py from {source}. Do not edit: rerun `make bench`,",
        "     or `python bench/report.py RESULTS.json` to regenerate from stored figures. -->",
        "",
        f"Measured {data['started']} in {data['duration_s'] / 60:.1f} min{quick}, "
        f"best of {data['repeat']} run(s) per cell: **{met_count} of {len(targets)} "
        f"issue-7 targets met**. Kernel = the kernel's ext4 on a loop device; every "
        f"system serves the same image in the same run.",
        "",
        "## Results",
        "",
        markdown_table(data),
        "",
        "Rates are higher-is-better (MB/s = 10^6 bytes/s). `ext4box/kernel` and "
        "`fuse2fs/kernel` divide rates, so 50% is half the kernel's speed; `ext4box/fuse2fs` "
        "is the metadata targets' ratio. `pyfuse3` is ext4box on its second FUSE backend "
        "(`-o backend=pyfuse3`, the transport before issue 13), and `ext4box/pyfuse3` the "
        "native transport's gain over it. A cell reading `refused: ERRNO` is a system that "
        "refused the workload (for O_DIRECT: the open or the first aligned transfer failed).",
        "",
    ]
    if direct := _direct_io_line(data):
        out += [direct, ""]
    if busy := _busy_line(data):
        out += [busy, ""]
    if chart:
        out += [f"![ext4box and fuse2fs as % of the kernel]({chart})", "",
                "Bars: speed as % of the kernel. Red ticks: ext4box's target (for the "
                "metadata rows, 3x fuse2fs expressed as % of the kernel).", ""]
    out += ["## Memory", "", *_memory_section(data), "", "Cache sizes the server ran with "
            "(read from the code: `ext4box serve` takes no cache-size option):", "",
            *_caches_section(data), ""]
    out += ["## Machine", "", *_machine_section(data), ""]
    out += [
        "## Method",
        "",
        f"- Read image (`mkfs.ext4 -d`, 4 KiB blocks): a {sizes['seq_mb']} MiB file of random "
        f"data, {sizes['meta_files']:,} small files in 100 directories, a source-like tree "
        f"of {sizes['source_files']:,} text files. Write workloads each get a fresh sparse "
        "copy of a write image (a preallocated "
        f"{sizes['random_write_mb']} MiB file for the random writes), mounted read-write, "
        "and `e2fsck -fn` checks it after the unmount.",
        "- Mounts: kernel `mount -o ro|rw` of a loop device; `ext4box serve IMAGE MNT -o ro|rw` "
        "(pyfuse3: `-o ro|rw,backend=pyfuse3`); `fuse2fs -f IMAGE MNT -o ro|rw,fakeroot`. "
        "A fresh mount per measurement and "
        "`echo 3 > /proc/sys/vm/drop_caches` before it. Each image is read once, untimed, "
        "before the measurements, so that in a VM the host's cache of the image file is "
        "equally warm for every system: cold means cold in this machine's page cache.",
        "- Data workloads are fio jobs (psync, iodepth 1, one job). Reads are timed by fio's "
        "summed read latencies (ns resolution), writes by fio's runtime with `end_fsync=1`, "
        f"so the final fsync counts. Random jobs do "
        f"{sizes['random_ios']:,} I/Os of 4 KiB (fio's default fadvise hint turns readahead "
        "off for them). The warm re-read is the same file read once more on the same mount "
        "right after the cold read (by a new fio process, so a new open).",
        f"- Metadata phases: {sizes['meta_files']:,} empty files created in 100 directories "
        "(+ syncfs), then on fresh mounts each: lstat of every file, listdir of every "
        "directory, unlink of every file (+ syncfs). untar: `tar -xf` + syncfs. find: plain "
        "`find` over the tree. ls -lR and find + cat have no issue-7 target.",
        f"- Small appends: {sizes.get('append_writes', 0):,} write(2)s of 4 bytes on an "
        "O_APPEND fd, then fsync (fstests generic/069's pattern), on a fresh copy of the "
        "write image; ext4box once as mounted by default and once with `-o writeback_cache`, "
        "the kernel and fuse2fs once, their figure in both rows.",
        "- Memory: see above; the image is built once and cached under the work directory.",
        "",
    ]
    warnings = _warnings(data)
    if warnings:
        out += ["## Warnings from this run", "", *warnings, ""]
    return "\n".join(out)


def write_doc(data: dict, source: Path, doc: Path = DOC, chart: Path = CHART) -> list[str]:
    """Write the chart and the doc; returns the problems worth printing (e.g. no chart)."""
    problems = []
    why_no_chart = write_chart(data, chart)
    if why_no_chart:
        problems.append(f"no chart: {why_no_chart}")
    rel_chart = None if why_no_chart else _relative(chart, doc.parent)
    try:
        shown = str(source.resolve().relative_to(REPO))
    except ValueError:
        shown = str(source)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(markdown(data, shown, rel_chart))
    return problems


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="regenerate docs/performance.md from a run")
    parser.add_argument("results", type=Path, help="a bench/results/*.json file")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--chart", type=Path, default=CHART)
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    print(text_table(data))
    for problem in write_doc(data, args.results, args.doc, args.chart):
        print(f"report: {problem}", file=sys.stderr)
    print(f"wrote {args.doc} and {args.chart}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
