"""``benchmarks/readme_tables.py``: the README's CPU tables from the benchmarks' CSV rows (issue #16)."""

from __future__ import annotations

import csv
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location(
        "readme_tables", os.path.join(ROOT, "benchmarks", "readme_tables.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _op_row(provider, p50, sha="new", shape="s M=8", mode="fwd", stamp="2026-12-06T05:00:00+00:00"):
    return dict(
        op="lora_linear", mode=mode, shape=shape, provider=provider, p50_ms=p50, p20_ms=p50 * 0.9, p80_ms=p50 * 1.1,
        alloc_bytes=2_000_000, peak_bytes=1_000_000, saved_bytes="" if mode == "no-grad-fwd" else 500_000,
        device="cpu x86_64 x1 threads", torch="2.13.0+cpu", transformers="5.25.0", peft="0.21.2", bitsandbytes="0.50.2",
        git_sha=sha, timestamp=stamp,
    )  # fmt: skip


def test_ops_table_takes_the_last_revision_and_the_last_measurement_of_each_row(tables, tmp_path):
    rows = [
        _op_row("peft", 9.0, sha="old"),  # an older revision: ignored
        _op_row("reference", 1.0, sha="old"),
        _op_row("peft", 4.0),
        _op_row("reference", 8.0),  # re-measured below at the same revision: replaced
        _op_row("reference", 3.2),
        _op_row("reference+compile", 5.0),
        _op_row("base", 2.75),  # the ceiling: printed as its own time, not a ratio
        _op_row("peft", 2.0, mode="no-grad-fwd"),
        _op_row("reference", 2.5, mode="no-grad-fwd"),
    ]
    text = tables.ops_table(_write(tmp_path / "cpu.csv", rows))
    lines = text.splitlines()
    assert lines[0].startswith("Revision new, 2026-12-06 05:00:00 UTC. Machine: ")
    assert "torch 2.13.0+cpu, transformers 5.25.0, peft 0.21.2" in lines[0]
    body = [line for line in lines if line.startswith("| lora_linear")]
    assert body == [
        "| lora_linear, s M=8 | fwd | 4.00 [3.60, 4.40] | 3.20 [2.88, 3.52] | 1.25× | 2.75 | 0.80× | 2.00 → 2.00 "
        "| 1.00 → 1.00 | 0.50 → 0.50 |",
        "| lora_linear, s M=8 | no-grad-fwd | 2.00 [1.80, 2.20] | 2.50 [2.25, 2.75] | 0.80× | – | – | 2.00 → 2.00 "
        "| 1.00 → 1.00 | – |",
    ]


def test_e2e_and_prefix_tables(tables, tmp_path):
    meta = dict(torch="2.13.0+cpu", transformers="5.25.0", peft="0.21.2", git_sha="abc", timestamp="2026-12-06T05:00")
    e2e = [
        dict(method="lora", provider=provider, train_step_p50_ms=p50, train_step_p20_ms=p50 - 1,
             train_step_p80_ms=p50 + 1, step_alloc_bytes=3e6, step_peak_bytes=2e6, saved_bytes=1e6,
             decode_tok_per_s_p50=50, same_tokens_as_peft="True", **meta)
        for provider, p50 in (("peft", 110.0), ("peft_kernels", 100.0))
    ]  # fmt: skip
    text = tables.e2e_table(_write(tmp_path / "e2e.csv", e2e))
    assert "| lora | 110.0 [109.0, 111.0] | 100.0 [99.0, 101.0] | 1.10× | 3.00 → 3.00 |" in text
    prefix = []
    for provider, ms in (("peft", 20.0), ("pk-dynamic", 30.0), ("pk-fused", 16.0)):
        base = dict(op="prefix_kv", provider=provider, B=4, T=128, P=16, threads=1, **meta)
        prefix += [
            {**base, "mode": "train", "metric": "bytes_allocated", "p50": 5e6, "p20": 5e6, "p80": 5e6},
            {**base, "mode": "train", "metric": "peak_bytes", "p50": 4e6, "p20": 4e6, "p80": 4e6},
            {**base, "mode": "train", "metric": "time", "p50": ms, "p20": ms - 1, "p80": ms + 1},
            {**base, "mode": "decode", "metric": "bytes_per_token", "p50": 1e6, "p20": "", "p80": ""},
            {**base, "mode": "decode", "metric": "time_per_token", "p50": ms / 10, "p20": "", "p80": ""},
        ]
    text = tables.prefix_table(_write(tmp_path / "prefix.csv", prefix))
    assert "| 4 × 128 × 16 | 5.00 → 5.00 | 4.00 → 4.00 | 20.0 [19.0, 21.0] | 16.0 [15.0, 17.0] | 1.25× " in text
    assert "| 1.000 → 1.000 | 2.00 → 1.60 |" in text


def test_ratio_column_is_the_median_of_paired_ratios_when_the_row_has_it(tables, tmp_path):
    """PEFT 4.0 vs ours 3.2 at p50 would print 1.25×; the row's median of per-round ratios (1.02) wins."""
    rows = [{**_op_row("peft", 4.0), "ratio_vs_peft": ""}, {**_op_row("reference", 3.2), "ratio_vs_peft": 1.02}]
    text = tables.ops_table(_write(tmp_path / "cpu.csv", rows))
    assert "| 4.00 [3.60, 4.40] | 3.20 [2.88, 3.52] | 1.02× |" in text


def test_paired_ratio_cancels_drift_that_hits_both_providers_of_a_round():
    from peft_kernels.bench import measure

    # Round 2 ran on a slow stretch of the machine: both times doubled. Each round ours is 10% faster.
    peft, ours = [1.1, 2.2, 1.1], [1.0, 2.0, 1.0]
    assert measure.paired_ratio(peft, ours) == pytest.approx(1.1)
    # Medians of the two lists alone see the same 1.1 here; with unequal drift they would not.
    assert measure.paired_ratio([1.1, 3.3, 1.1, 1.1], [1.0, 3.0, 1.2, 1.2]) == pytest.approx((1.1 / 1.2 + 1.1) / 2)


def test_append_rows_keeps_the_history_when_a_column_is_added(tmp_path):
    from peft_kernels.bench import measure

    path = str(tmp_path / "rows.csv")
    measure.append_rows(path, [{"a": 1, "b": 2}], ["a", "b"])
    measure.append_rows(path, [{"a": 3, "b": 4}], ["a", "b"])
    measure.append_rows(path, [{"a": 5, "new": 9, "b": 6}], ["a", "new", "b"])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["a"], r["b"], r["new"]) for r in rows] == [("1", "2", ""), ("3", "4", ""), ("5", "6", "9")]
