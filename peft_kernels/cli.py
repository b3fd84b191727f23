"""``peft-kernels`` command line: ``info`` (versions, device, which backend runs each op and why)."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import torch

    from . import __version__, _availability
    from .layers.lora_conv import CONV_FORWARD_PATH
    from .ops import _dispatch

    print(f"peft_kernels {__version__}")
    print("versions:")
    for name, version in _availability.versions().items():
        print(f"  {name:<20} {version}")
    print(f"device: {_availability.device_summary()}")
    env = _dispatch.requested_backend(None)
    print(f"{_dispatch.ENV_VAR}: {env or '(unset: automatic choice)'}")
    print("backends:")
    for name, status, reason in _availability.backend_report():
        print(f"  {name:<10} {status}{': ' + reason if reason else ''}")
    print(f"CUDA extension (peft_kernels._C): {_availability.cuda_extension_line()}")
    print(f"conv LoRA forward: {CONV_FORWARD_PATH}")
    print(
        "ops: backends in priority order per device type ('->' marks the one that runs here; the others say why not)"
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    for op_name, device_type, entries in _dispatch.backend_table():
        print(f"  {op_name:<20} on {device_type:<4} tensors: {' -> '.join(name for name, _ in entries)}")
        chosen = next((name for name, status in entries if status == "available"), None)
        for name, status in entries:
            mark = "->" if device_type == default_device and name == chosen else "  "
            print(f"      {mark} {name:<10} {status}")
    aliases = ", ".join(f"{alias} = {target}" for alias, (target, _) in _dispatch.ALIASES.items())
    print(f"aliases (same table, weight_scale given): {aliases}")
    print(f"lora_linear_4bit CPU decode: {_cpu_4bit_decoder()}")
    return 0


def _cpu_4bit_decoder() -> str:
    """The decoder the 4-bit CPU path uses: bnb's native kernel registers when bitsandbytes is imported (making a
    4-bit weight imports it), so import it here when installed, to report what a 4-bit model would get."""
    import importlib.util
    import warnings

    from .backends.reference.lora_4bit import cpu_decoder

    try:
        if importlib.util.find_spec("bitsandbytes") is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import bitsandbytes  # noqa: F401 - registers its kernels
    except Exception:  # absent or broken: the torch decode serves, and cpu_decoder says so
        pass
    return cpu_decoder()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="peft-kernels", description="peft_kernels utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backend runs each op").set_defaults(func=_info)
    sub.add_parser("demo", help="LoRA fine-tune MiniLM on CPU end to end (peft-kernels demo --help)")
    sub.add_parser("bench", help="op benchmarks, PEFT vs peft_kernels' backends: table, CSV, PNG (bench --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
