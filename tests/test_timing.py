"""The timing harness's contract on cheap functions: what it calls, how often, in which order, and what it
returns. No speed targets: bounds are loose enough for a loaded, shared machine."""

import math
import sys
import time
from pathlib import Path

import pytest

from mmoe_fast import timing

ROOT = Path(__file__).resolve().parent.parent


def counter():
    calls = []
    return calls, lambda: calls.append(None)


def test_a_two_millisecond_sleep_measures_about_two_milliseconds():
    t = timing.median_time(lambda: time.sleep(2e-3), min_time=0.0, min_reps=5, warmup=1)
    assert 2e-3 <= t < 0.1  # sleep never returns early; a busy machine may wake it late


def test_median_time_calls_warmup_then_reps_capped_by_max_reps():
    calls, fn = counter()
    timing.median_time(fn, min_time=60.0, min_reps=2, max_reps=4, warmup=3)  # max_reps ends it, not min_time
    assert len(calls) == 3 + 4


def test_median_time_keeps_calling_until_min_time():
    calls, fn = counter()
    start = time.perf_counter()
    timing.median_time(fn, min_time=0.02, min_reps=1, warmup=0)
    assert time.perf_counter() - start >= 0.02 and len(calls) > 1


def test_interleaved_gives_each_contender_one_median_per_pass_in_turn():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    result = timing.interleaved(fns, passes=2, min_time=0.0, min_reps=2, max_reps=2, warmup=1)
    assert list(result) == ["a", "b", "c"]
    assert all(len(t.passes) == 2 for t in result.values())
    # each turn: 1 warm-up + 2 timed calls of one contender, then the next; the whole round twice
    assert order == (["a"] * 3 + ["b"] * 3 + ["c"] * 3) * 2


def test_interleaved_keys_may_be_any_hashable_and_figures_follow_the_work():
    fns = {("sleep", 1): lambda: time.sleep(3e-3), ("noop", 1): lambda: None}
    result = timing.interleaved(fns, passes=2, min_time=0.0, min_reps=3, warmup=0)
    assert result["sleep", 1].best >= 3e-3 > result["noop", 1].best


def test_timing_best_and_median_of_the_passes():
    t = timing.Timing((3.0, 1.0, 2.0, 10.0))
    assert t.best == 1.0 and t.median == 2.5


def test_kernel_time_off_gpu_is_one_warmup_and_cpu_reps_calls():
    calls, fn = counter()
    assert timing.kernel_time(fn, device="cpu", cpu_reps=4) >= 0
    assert len(calls) == 1 + 4


@pytest.mark.parametrize("kwargs, name", [(dict(min_time=-1.0), "min_time"), (dict(min_time=math.nan), "min_time"),
                                          (dict(min_reps=0), "min_reps"), (dict(min_reps=3, max_reps=2), "max_reps"),
                                          (dict(warmup=-1), "warmup")])
def test_bad_arguments_raise_before_any_call(kwargs, name):
    calls, fn = counter()
    with pytest.raises(ValueError, match=name):
        timing.median_time(fn, **kwargs)
    with pytest.raises(ValueError):
        timing.interleaved({"f": fn}, **kwargs)
    assert calls == []


@pytest.mark.parametrize("kwargs, message", [(dict(passes=0), "passes"), (dict(fns={}), "contender")])
def test_interleaved_refuses_no_passes_and_no_contenders(kwargs, message):
    args = dict(fns={"f": lambda: None}, min_time=0.0) | kwargs
    with pytest.raises(ValueError, match=message):
        timing.interleaved(args.pop("fns"), **args)


def test_formatting():
    assert timing.format_time(12.4e-6) == "12 us"
    assert timing.format_time(12.44e-6, us_digits=1) == "12.4 us"
    assert timing.format_time(3.456e-3) == "3.46 ms"
    assert timing.format_time(None) == "-"
    assert timing.format_ratio(3.0, 2.0) == "1.50x"
    assert timing.format_ratio(None, 2.0) == "-" and timing.format_ratio(1.0, None) == "-"


def test_conditions_name_the_load_average():
    assert timing.conditions().startswith("load average ")


def test_the_training_benchmark_runs_renders_and_draws(tmp_path, monkeypatch):
    """benchmarks/bench_train.py on one tiny cell: every contender timed, the limit from the GEMM rates, the
    table and the plot written (without raising the priority: tests never do)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_train", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    cell = bench.Cell("tiny", 9, 3, (5, 4), 2, (3,), 17)
    one_layer = bench.Cell("tiny", 9, 3, (5,), 2, (3,), 17)  # fit's autograd-free step
    rows = bench.run([cell, one_layer], passes=1, min_time=0.0, compile_=False, threads=1)
    assert all(set(r["times"]) == {"mmoe_fast", "mmoe_fast (autograd)", "batched eager", "loop"} for r in rows)
    assert rows[1]["best"] in ("batched eager", "loop")  # the ratio is against the others only
    assert rows[0]["limit"] == 3 * cell.forward_flops() / rows[0]["roof"] > 0
    text = bench.render(rows, "python benchmarks/bench_train.py", 1, tmp_path / "p.png")
    assert "| tiny D=9 E=3 experts=[5, 4] T=2 / B=17 |" in text
    bench.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    timing.write_section(tmp_path / "R.md", "bench_train", text)
    timing.write_section(tmp_path / "R.md", "bench_train", text)  # replaced, not appended
    assert (tmp_path / "R.md").read_text().count("<!-- bench_train:begin -->") == 1
    lines = bench.breakdown([cell, one_layer], steps=2).splitlines()  # --breakdown
    assert len(lines) == 2 and all(" a step (" in line for line in lines)
    assert "C++ kernels" in lines[1] and "the rest" in lines[1]  # the one-call step: one C++ kernel
    assert "torch GEMMs" not in lines[1]
    from mmoe_fast.backends import cpp as cpp_backend

    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", "blas")  # the layers' GEMMs on torch's BLAS: counted as GEMMs
    monkeypatch.setattr(cpp_backend, "BLAS_MIN_MACS", 0)
    assert "torch GEMMs" in bench.breakdown([cell], steps=2)


def test_the_many_runs_benchmark_runs_and_its_vmap_rules_agree(monkeypatch):
    """benchmarks/bench_fit_many.py's contenders, tiny: every one runs, and the torch.func runs through the
    replica kernels and through one call per slice end with the same weights."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_fit_many", ROOT / "benchmarks" / "bench_fit_many.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec.loader.exec_module(bench)
    fns, per_call = bench.contenders([2], 2, False, True)
    assert set(fns) == {"fit, one run at a time", "fit_many S=2", "stacked eager S=2", "torch.func vmap S=2",
                        "torch.func vmap, loop rule S=2"}
    for fn in fns.values():
        fn()
    replicas, loop = fns["torch.func vmap S=2"].params, fns["torch.func vmap, loop rule S=2"].params
    for key in replicas:
        assert (replicas[key] - loop[key]).abs().max() <= 1e-6 * (1 + loop[key].abs().max()), key


def test_the_benchmark_of_fit_many_on_other_models_runs(monkeypatch):
    """benchmarks/bench_fit_many_models.py's contenders, tiny: every one runs and says its engine."""
    import importlib.util

    from mmoe_fast import train_many

    spec = importlib.util.spec_from_file_location("bench_fit_many_models",
                                                  ROOT / "benchmarks" / "bench_fit_many_models.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(train_many, "VMAP_MIN_RUNS", 2)
    fns, per_call, engines = bench.contenders([2], 1)
    for fn in fns.values():
        fn()
    assert len(engines) == len(bench.KINDS)
    assert {kind: engine for (kind, _), engine in engines.items()} == {
        kind: "packed" if kind in bench.PACKED else "vmapped" for kind in bench.KINDS}
    assert all(per_call[(kind, "one by one")] == bench.ONE_BY_ONE for kind in bench.KINDS)
