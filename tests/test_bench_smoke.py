"""The benchmark harness runs end to end on tiny shapes, so it cannot rot between measurements."""

from __future__ import annotations

import re

from bench.harness import main


def _rows(table: str) -> dict[str, list[str]]:
    """The main table's rows: row name -> cells."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| row |")) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_smoke_table(tmp_path):
    out = tmp_path / "table.md"
    table = main(["--smoke", "--dora", "--out", str(out)])
    assert out.read_text() == table
    assert "torch " in table and "hidden 64" in table

    floors = re.search(r"FLOP floors: forward ([\d.]+)x base; training step ([\d.]+)x", table)
    fwd_floor, step_floor = float(floors.group(1)), float(floors.group(2))
    # r=4 adapters on hidden 64 / intermediate 96: a known share of the base FLOPs.
    assert 1.05 < fwd_floor < 1.3 and 1.05 < step_floor < 1.4

    rows = _rows(table)
    names = list(rows)
    assert [n.split(" (")[0] for n in names] == (["base"] * 2 + ["PEFT"] * 2 + ["lora_fx backend"] * 2
                                                 + ["lora_fx merged"] + ["PEFT DoRA"] * 2
                                                 + ["lora_fx DoRA backend"])
    for name, cells in rows.items():
        assert float(cells[0]) > 0, name
        if name.startswith("lora_fx merged"):  # inference only
            assert cells[2] == cells[3] == cells[5] == "-"
            assert cells[1].endswith("(1.000)")  # its floor is the base
            continue
        assert float(cells[2]) > 0, name
        assert float(cells[4]) >= 0 and float(cells[5]) > 0, f"{name}: no memory measured for a training step"
    for name in names[2:]:
        assert re.fullmatch(r"[\d.]+ \([\d.]+\)", rows[name][1]), rows[name]
    lora_compiled = rows[names[-5]]
    graphs, breaks, recompiles = (int(c) for c in lora_compiled[6:9])
    assert graphs == 2 and breaks == 0 and recompiles == 0  # one graph per (grad, no-grad), fullgraph
    assert [int(c) for c in rows[names[-4]][6:9]] == [1, 0, 0]  # merged: one no-grad graph
    assert [int(c) for c in rows[names[-1]][6:9]] == [2, 0, 0]  # DoRA: fullgraph too
    dora_floor = float(re.search(r"DoRA rows: ([\d.]+)x", table).group(1))
    assert dora_floor > fwd_floor and rows[names[-1]][1].endswith(f"({dora_floor:.3f})")

    scaling = re.findall(r"^\| (\d+) \| (\d+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", table, re.M)
    assert [(int(n), int(s)) for n, s in scaling] == [(1, 7), (2, 14)]


def test_qlora_bench_runs(capsys):
    import pytest

    pytest.importorskip("bitsandbytes")
    from bench.qlora import main as qlora_main

    qlora_main(["--hidden", "64", "--seq", "8", "--reps", "1", "--warmup", "0", "--compiler", "aot_eager"])
    lines = {line.split("  ")[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert set(lines) >= {"base 4-bit (compiled)", "PEFT eager", "PEFT compiled", "lora_fx backend"}
    ours = lines["lora_fx backend"]
    assert ours[-2:] == ["2", "0"]  # one graph per mode (eval forward, training step), no graph break
    assert float(ours[2]) > 0 and float(ours[4]) > 0


def test_scaling_only_table():
    table = main(["--smoke", "--scaling-only", "1"])
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1:3] for r in rows] == [[" 1 ", " 7 "], [" 2 ", " 14 "]]  # layers, sites
    assert all(float(r.split("|")[3]) > 0 for r in rows)


def test_decode_table(tmp_path):
    out = tmp_path / "decode.md"
    table = main(["--decode", "--smoke", "--reps", "1", "--out", str(out)])
    assert out.read_text() == table
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| cell")
             and not line.startswith("| variant")]
    cells = {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines)}
    assert list(cells)[:4] == ["prefill, batch 2 x 16 tokens"] + [f"decode, batch {b}: 1 token, cache 16"
                                                                   for b in (1, 8, 32)]
    for name in list(cells)[:4]:
        base, *others = cells[name]
        assert float(base) > 0 and len(others) == 3, name
        assert all(re.fullmatch(r"[\d.]+ \([\d.]+x\)", c) for c in others), cells[name]
    variants = {name: cells[name] for name in ("base", "PEFT", "lora_fx unmerged", "lora_fx merged")}
    for name, (graphs, breaks, recompiles, _) in variants.items():
        # one static graph per shape (prefill + 3 decode batches), none after warm-up, fullgraph
        assert (int(graphs), int(breaks), int(recompiles)) == (4, 0, 0), name
    scale = float(re.search(r"PEFT's logits reach (\d[\d.e+-]*\d)", table).group(1))
    for name in ("lora_fx unmerged", "lora_fx merged"):  # the same adapter as PEFT's: the same logits
        assert float(variants[name][3]) <= 1e-4 * scale, (name, variants[name])
    assert float(variants["base"][3]) > 1e-2 * scale  # ... and the adapter changes them


def test_cpu_peak_bytes_counts_allocations_of_eager_and_compiled_calls():
    """`peak_bytes` on the CPU (the running sum of the profiler's allocator events) against known
    allocations: eager tensors kept and freed, and an Inductor-compiled call whose buffers are known
    (its mm result, 4 MiB, lives while the output, 1 MiB, is computed)."""
    import torch

    from bench.harness import peak_bytes

    mib = 2**20
    assert peak_bytes(lambda: torch.empty(mib // 4), "cpu") == mib

    def kept_and_freed():
        a, b = torch.empty(mib // 4), torch.empty(mib // 2)  # 1 + 2 MiB
        del a
        return b, torch.empty(mib // 4)                     # 2 + 1 MiB: the peak was 3
    assert peak_bytes(kept_and_freed, "cpu") == 3 * mib

    w = torch.randn(256, 1024)
    x = torch.randn(1024, 256)
    fn = torch.compile(lambda x: torch.relu(x @ w) @ w.t(), backend="inductor")
    fn(x)
    assert abs(peak_bytes(lambda: fn(x), "cpu") - 5 * mib) < 64 * 1024


def test_many_adapters_table(tmp_path):
    """bench/many_adapters.py end to end on a 1-layer smoke Llama, the prefill cell only (no decode
    batches) and Dynamo's own eager backend, to stay under 30 s: the test is about the table, its
    recompile counts and its Δ logits, not the times."""
    from bench.many_adapters import main as many_adapters_main

    out = tmp_path / "many.md"
    table = many_adapters_main(["--smoke", "--layers", "1", "--batches", "", "--reps", "1", "--compiler", "eager",
                                "--out", str(out)])
    assert out.read_text() == table
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| cell",
                                                                                                      "| variant",
                                                                                                      "| max abs"))]
    cells = {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines)}
    assert list(cells)[0] == "prefill, batch 2 x 16 tokens" and not list(cells)[1].startswith("decode")
    for name in list(cells)[:1]:
        base, *others = cells[name]
        assert float(base) > 0 and len(others) == 7, cells[name]
        assert all(re.fullmatch(r"[\d.]+ \([\d.]+x\)", c) for c in others[:5]), cells[name]
        assert all(float(c) > 0 for c in others[5:]), cells[name]
    assert re.search(r"^Goal \(lora_fx mixed forward <= 1.15x lora_fx single\): (met|NOT met) ", table, re.M)
    variants = ("base", "lora_fx single", "lora_fx mixed", "lora_fx a alone", "PEFT single")
    for name in variants:  # one graph per shape (PEFT single: +1 after PEFT's mixed call), none after warm-up
        graphs, breaks, eager_frames, later = (int(c) for c in cells[name])
        assert (graphs, breaks, eager_frames, later) == (2 if name == "PEFT single" else 1, 0, 0, 0), (name,
                                                                                                      cells[name])
    counts = re.search(r"lora.graphs_compiled = (\d+) after warm-up; .*: (\d+), (\d+) \(\+0\); after timing: (\d+)\.",
                       table)
    assert counts and len(set(counts.groups())) == 1, counts  # switching adapters compiles nothing
    scale = float(re.search(r"PEFT mixed logits reach (\d[\d.e+-]*)", table).group(1))
    from bench.many_adapters import DIFF_LABELS

    for key in ("lora_fx single", "lora_fx mixed", "lora_fx mixed (2nd list)", "lora_fx a alone"):
        label = DIFF_LABELS[key]
        assert float(cells[label][0]) <= 1e-5 * scale, (label, cells[label])  # PEFT's logits, same selection
    assert float(cells[DIFF_LABELS["base"]][0]) > 1e-2 * scale  # ... and the adapters change them
