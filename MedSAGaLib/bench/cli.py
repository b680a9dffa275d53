"""``medsaga bench memory|quality|speed``: the benchmarks behind the README's Results section."""

from __future__ import annotations


def add_bench_parser(subparsers) -> None:
    from . import memory, quality, speed

    parser = subparsers.add_parser(
        "bench", help="benchmarks: training memory, Dice versus shots, speed",
        description="Benchmarks of MedSAGa against LoRA, full fine-tuning and a decoder-only baseline. "
                    "Results land in --output as NAME.json, NAME.md and PNG plots.")
    sub = parser.add_subparsers(dest="bench", required=True)
    mem = sub.add_parser("memory", help="training memory per method (one fresh process per measurement)",
                         description=memory.__doc__.splitlines()[0])
    memory.add_arguments(mem)
    mem.set_defaults(func=lambda args: memory.run_sweep(args) and 0)
    qual = sub.add_parser("quality", help="Dice/HD95 on unseen MNI152 slices versus training slices",
                          description=quality.__doc__.splitlines()[0])
    quality.add_arguments(qual)
    qual.set_defaults(func=lambda args: quality.run(args) and 0)
    spd = sub.add_parser("speed", help="inference s/slice and training s/step, FLOPs, share of matmul peak",
                         description=speed.__doc__.splitlines()[0])
    speed.add_arguments(spd)
    spd.set_defaults(func=lambda args: speed.run(args) and 0)
