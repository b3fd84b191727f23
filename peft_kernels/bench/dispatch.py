"""What a call through ``torch.ops.peft_kernels.*`` costs on top of the work: ``peft-kernels bench dispatch``.

Eager CPU, decode size (M = 1, K = N = 64, r = 8, fp32, no grad), so the work itself is a few µs. Rows, each the
median [p20, p80] over interleaved repetitions of ``--calls`` calls, in µs per call:

    reference        backends/reference/lora.py lora_linear_fwd called directly (the work)
    dispatch.run     ops/_dispatch.run("lora_linear_fwd", args): the body of the registered kernel (cached choice,
                     argument trimming, the work)
    op               torch.ops.peft_kernels.lora_linear_fwd (torch's custom-op call + dispatch.run)
    inference op     torch.ops.peft_kernels.lora_linear_inference, the op a no-grad one-adapter call takes (scalar
                     arguments, y only; its reference runs the same forward)
    torch floor      an op of the same schema in a scratch namespace whose kernel returns a ready result:
                     torch's own cost of calling a Python-kernel custom op with this argument list

The same two rows with the work taken out (``reference.lora_linear_fwd`` swapped for a function returning a ready
result, ``empty work``) measure the route alone, without the matmul's timing noise:

    empty work       that function called directly
    dispatch.run, empty work   /   op, empty work

All rows are timed in one interleaved set; each difference below is taken repetition by repetition:

    dispatcher overhead, empty work   dispatch.run, empty work - empty work: what peft_kernels adds per call (the
                                      cached choice, argument trimming, one call); the issue's "at most 5 µs"
    torch custom-op call, empty work  op, empty work - dispatch.run, empty work: torch's boxing of the argument
                                      lists into and out of a Python kernel, which no Python-defined op avoids;
    torch floor, empty work           torch floor - empty work: the same cost measured on the scratch op, the check
    dispatcher overhead / torch custom-op call   the same with the work in (noisier: the matmul's spread)
    op - reference                    the whole price of the route
    inference op - reference          the same for the inference form
"""

from __future__ import annotations

import argparse

import torch

from . import measure

_SCRATCH = "peft_kernels_dispatch_bench"
OURS_BOUND_US = 5.0  # issue #16: a CPU call through torch.ops costs at most this much on top of torch's own call


def _torch_floor(result):
    """A custom op with lora_linear_fwd's schema whose kernel returns ``result`` (defined once per process)."""
    from ..backends import SCHEMAS

    lib = torch.library.Library(_SCRATCH, "FRAGMENT")  # noqa: TOR901 - a scratch namespace of this benchmark

    def kernel(*_):
        return result

    lib.define(f"lora_linear_fwd{SCHEMAS['lora_linear_fwd']}")
    lib.impl("lora_linear_fwd", kernel, "CPU")
    return lib, getattr(torch.ops, _SCRATCH).lora_linear_fwd


def measure_dispatch(calls: int = 200, reps: int = 31, warmup: int = 3) -> dict[str, tuple[float, float, float]]:
    """{row: (median, p20, p80) µs per call} of the rows in the module docstring, plus the derived costs.

    Every row is timed in ONE interleaved set (each repetition runs every row once, in turn), so a load change on a
    shared machine moves all rows alike and the differences, taken repetition by repetition, cancel it.
    """
    from .. import ops  # noqa: F401 - registers torch.ops.peft_kernels
    from ..backends.reference import lora as reference
    from ..ops import _dispatch

    gen = torch.Generator().manual_seed(0)
    m, k, n, r = 1, 64, 64, 8
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    a, b = torch.randn(r, k, generator=gen), torch.randn(n, r, generator=gen)
    args = (x, w, None, [a], [b], [None], [1.0], [0.0], None)
    op = torch.ops.peft_kernels.lora_linear_fwd
    real = reference.lora_linear_fwd
    ready = real(*args)
    lib, floor_op = _torch_floor(ready)

    def empty_work(*_):
        return ready

    def repeat(fn, work=real):
        def run():
            # dispatch.run looks the backend function up at call time: the empty-work rows swap it per repetition
            reference.lora_linear_fwd = work
            try:
                for _ in range(calls):
                    fn(*args)
            finally:
                reference.lora_linear_fwd = real

        return run

    def through_run(*a):
        return _dispatch.run("lora_linear_fwd", a)

    def inference_op(*_):
        # The inference form a no-grad one-adapter call takes (ops/lora.py); its reference runs the same forward.
        return torch.ops.peft_kernels.lora_linear_inference(x, w, None, a, b, 1.0)

    fns = {
        "reference": repeat(real),
        "dispatch.run": repeat(through_run),
        "op": repeat(op),
        "torch floor": repeat(floor_op),
        "empty work": repeat(empty_work),
        "dispatch.run, empty work": repeat(through_run, empty_work),
        "op, empty work": repeat(op, empty_work),
        "inference op": repeat(inference_op),
    }
    with torch.no_grad():
        times = measure.interleaved_times(fns, torch.device("cpu"), reps, warmup)
    del lib
    per_call = {name: [t / calls * 1e6 for t in samples] for name, samples in times.items()}
    rows = {name: measure.quantiles(samples) for name, samples in per_call.items()}
    differences = {
        # ours: what peft_kernels adds to a call (the claim "at most 5 µs" is about the empty-work row)
        "dispatcher overhead": ("dispatch.run", "reference"),
        "dispatcher overhead, empty work": ("dispatch.run, empty work", "empty work"),
        # torch's: boxing the arguments into and out of a Python kernel; the floor is the same for any such op
        "torch custom-op call": ("op", "dispatch.run"),
        "torch custom-op call, empty work": ("op, empty work", "dispatch.run, empty work"),
        "torch floor, empty work": ("torch floor", "empty work"),
        "op - reference": ("op", "reference"),
        "inference op - reference": ("inference op", "reference"),
    }
    for name, (slow, fast) in differences.items():
        rows[name] = measure.quantiles([s - f for s, f in zip(per_call[slow], per_call[fast])])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="peft-kernels bench dispatch", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per timed repetition")
    parser.add_argument("--reps", type=int, default=31)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: less noise)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure_dispatch(args.calls, args.reps)
    print(f"µs per call, median [p20, p80] over {args.reps} interleaved repetitions of {args.calls} calls")
    for name, (p50, p20, p80) in rows.items():
        print(f"  {name:<34} {p50:8.2f}  [{p20:7.2f}, {p80:7.2f}]")
    ours, torch_cost = rows["dispatcher overhead, empty work"][0], rows["torch custom-op call, empty work"][0]
    verdict = "within" if ours <= OURS_BOUND_US else "OVER"
    print(
        f"peft_kernels adds {ours:.2f} µs per CPU call ({verdict} the {OURS_BOUND_US:g} µs bound of issue #16); "
        f"torch's own custom-op call costs {torch_cost:.2f} µs (scratch op: {rows['torch floor, empty work'][0]:.2f})"
    )
    return 0
