"""The README's CPU tables, in markdown, from the CSV rows the committed benchmarks append.

    python benchmarks/readme_tables.py [--ops benchmarks/results/cpu.csv] [--e2e benchmarks/results/cpu_e2e.csv]
                                       [--prefix benchmarks/results/cpu_prefix.csv]

Each table is printed from its file's latest revision (the ``git_sha`` of the last row), one row per measured
case: the last measurement of each case at that revision, so a re-run replaces a row instead of doubling it. Each
is headed by "Revision <sha>, <date UTC>" (the rows' own) and a machine line (CPU model and cores read here, so
run this on the machine that measured; versions from the rows). ``benchmarks/cpu_tables.sh`` runs the
measurements and then this. Times are p50 [p20, p80]; "vs PEFT" (> 1: faster than PEFT) is the median over the
interleaved rounds of PEFT's time / ours in the same round where the row has it (``ratio_vs_peft``), else PEFT's
p50 / ours.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NO_VALUE = "–"


def latest_rows(path: str, key_fields: tuple[str, ...]) -> list[dict]:
    """Rows of the file's last revision; of rows with equal ``key_fields``, the last one (first-seen order)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    sha = rows[-1]["git_sha"]
    latest: dict[tuple, dict] = {}
    for row in rows:
        if row["git_sha"] == sha:
            key = tuple(row[field] for field in key_fields)
            latest.pop(key, None)  # re-insert: the last measurement, in the order of the last run
            latest[key] = row
    return list(latest.values())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def heading(rows: list[dict], extra: str = "") -> str:
    """'Revision <sha>, <date UTC>' of the rows, then the machine line."""
    stamps = sorted(row["timestamp"] for row in rows)
    first, last = (s.replace("T", " ")[:19] for s in (stamps[0], stamps[-1]))
    when = first if first[:16] == last[:16] else f"{first}–{last[11:]}"
    row = rows[-1]
    versions = ", ".join(
        f"{name} {row[name]}" for name in ("torch", "transformers", "peft", "bitsandbytes") if row.get(name)
    )
    machine = f"Machine: {cpu_model()}, {os.cpu_count()} cores ({extra or row.get('device', '')}); {versions}."
    return f"Revision {row['git_sha']}, {when} UTC. {machine}"


def mb(value: str) -> str:
    return NO_VALUE if value in ("", None) else f"{float(value) / 1e6:.2f}"


def spread(p50: str, p20: str, p80: str, digits: int = 2) -> str:
    return f"{float(p50):.{digits}f} [{float(p20):.{digits}f}, {float(p80):.{digits}f}]"


def ratio(theirs: str, ours: str, paired: str | None = None) -> str:
    """The row's median of paired per-round ratios when it has one (``measure.paired_ratio``), else p50 / p50."""
    return f"{float(paired):.2f}×" if paired else f"{float(theirs) / float(ours):.2f}×"


def ops_table(path: str) -> str:
    """``peft-kernels bench`` rows (benchmarks/run.py): PEFT vs the reference backend, torch.compile as a ratio."""
    rows = latest_rows(path, ("op", "mode", "shape", "provider"))
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["p50_ms"]:
            cases.setdefault((row["op"], row["shape"], row["mode"]), {})[row["provider"]] = row
    lines = [
        heading(rows),
        "| op, shape | mode | PEFT p50 ms | ours (reference) p50 ms | vs PEFT | ceiling: the base GEMM alone, p50 ms "
        "| `torch.compile` of the formula, vs PEFT | allocated MB, PEFT → ours | peak MB | saved for backward MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (op, shape, mode), by in cases.items():
        peft, ours, compiled, base = (by.get(p) for p in ("peft", "reference", "reference+compile", "base"))
        if peft is None or ours is None:
            continue
        saved = (
            NO_VALUE if mode in ("no-grad-fwd", "decode") else f"{mb(peft['saved_bytes'])} → {mb(ours['saved_bytes'])}"
        )
        cells = [
            f"{op}, {shape}",
            mode,
            spread(peft["p50_ms"], peft["p20_ms"], peft["p80_ms"]),
            spread(ours["p50_ms"], ours["p20_ms"], ours["p80_ms"]),
            ratio(peft["p50_ms"], ours["p50_ms"], ours.get("ratio_vs_peft")),
            f"{float(base['p50_ms']):.2f}" if base else NO_VALUE,
            ratio(peft["p50_ms"], compiled["p50_ms"], compiled.get("ratio_vs_peft")) if compiled else NO_VALUE,
            f"{mb(peft['alloc_bytes'])} → {mb(ours['alloc_bytes'])}",
            f"{mb(peft['peak_bytes'])} → {mb(ours['peak_bytes'])}",
            saved,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def e2e_table(path: str) -> str:
    """``bench_e2e.py`` rows: one line per method, PEFT vs ours (peft_kernels, or patch_peft() + peft)."""
    rows = latest_rows(path, ("method", "provider"))
    methods: dict[str, dict[str, dict]] = {}
    for row in rows:
        methods.setdefault(row["method"], {})[row["provider"]] = row
    lines = [
        heading(rows),
        "| method | train step p50 [p20, p80] ms, PEFT | ours | vs PEFT | step allocated MB, PEFT → ours | step peak MB "
        "| saved for backward MB | decode tokens/s, PEFT → ours | same greedy tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, by in methods.items():
        peft = by.get("peft")
        ours = next((row for provider, row in by.items() if provider != "peft"), None)
        if peft is None or ours is None:
            continue
        name = method if ours["provider"] == "peft_kernels" else f"{method} ({ours['provider']})"
        step = ("train_step_p50_ms", "train_step_p20_ms", "train_step_p80_ms")
        cells = [
            name,
            spread(*(peft[k] for k in step), digits=1),
            spread(*(ours[k] for k in step), digits=1),
            ratio(peft["train_step_p50_ms"], ours["train_step_p50_ms"], ours.get("ratio_vs_peft")),
            f"{mb(peft['step_alloc_bytes'])} → {mb(ours['step_alloc_bytes'])}",
            f"{mb(peft['step_peak_bytes'])} → {mb(ours['step_peak_bytes'])}",
            f"{mb(peft['saved_bytes'])} → {mb(ours['saved_bytes'])}",
            f"{float(peft['decode_tok_per_s_p50']):.1f} → {float(ours['decode_tok_per_s_p50']):.1f}",
            ours["same_tokens_as_peft"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prefix_table(path: str, ours: str = "pk-fused") -> str:
    """``bench_prefix.py`` rows: training step and per generated token, PEFT vs our fused prefix cache."""
    rows = latest_rows(path, ("provider", "mode", "metric", "B", "T", "P"))
    values: dict[tuple, dict] = {}
    for row in rows:
        values[(row["B"], row["T"], row["P"], row["provider"], row["metric"])] = row
    shapes = list(dict.fromkeys((row["B"], row["T"], row["P"]) for row in rows))
    threads = rows[-1].get("threads")
    lines = [
        heading(rows, f"{threads} thread(s)" if threads else ""),
        "| B × T × P | training step: allocated MB, PEFT → ours | peak MB | ms p50 [p20, p80], PEFT | ours | vs PEFT "
        "| per generated token: allocated MB, PEFT → ours | ms, PEFT → ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:

        def get(provider, metric, shape=shape):
            return values.get((*shape, provider, metric))

        if get("peft", "time") is None or get(ours, "time") is None:
            continue
        theirs_t, ours_t = get("peft", "time"), get(ours, "time")
        per_token = [get(p, "bytes_per_token") for p in ("peft", ours)]
        per_token_ms = [get(p, "time_per_token") for p in ("peft", ours)]
        cells = [
            " × ".join(shape),
            f"{mb(get('peft', 'bytes_allocated')['p50'])} → {mb(get(ours, 'bytes_allocated')['p50'])}",
            f"{mb(get('peft', 'peak_bytes')['p50'])} → {mb(get(ours, 'peak_bytes')['p50'])}",
            spread(theirs_t["p50"], theirs_t["p20"], theirs_t["p80"], digits=1),
            spread(ours_t["p50"], ours_t["p20"], ours_t["p80"], digits=1),
            ratio(theirs_t["p50"], ours_t["p50"], (get(ours, "ratio_vs_peft") or {}).get("p50")),
            " → ".join(f"{float(r['p50']) / 1e6:.3f}" if r else NO_VALUE for r in per_token),
            " → ".join(f"{float(r['p50']):.2f}" if r else NO_VALUE for r in per_token_ms),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=os.path.join(RESULTS, "cpu.csv"))
    parser.add_argument("--e2e", default=os.path.join(RESULTS, "cpu_e2e.csv"))
    parser.add_argument("--prefix", default=os.path.join(RESULTS, "cpu_prefix.csv"))
    args = parser.parse_args(argv)
    tables = (("Ops", ops_table, args.ops), ("End to end", e2e_table, args.e2e), ("Prefix", prefix_table, args.prefix))
    for title, table, path in tables:
        if not os.path.exists(path):
            print(f"{title}: {path} not found", file=sys.stderr)
            continue
        print(f"**{title}** (`{os.path.relpath(path)}`)\n\n{table(path)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
