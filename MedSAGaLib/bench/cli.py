"""``medsaga bench memory|quality|speed``: the benchmarks behind the README's Results section."""

from __future__ import annotations


def add_bench_parser(subparsers) -> None:
    from . import cohort, memory, quality, report, speed

    parser = subparsers.add_parser(
        "bench", help="benchmarks: training memory, Dice versus shots, speed",
        description="Benchmarks of MedSAGa against LoRA, full fine-tuning and a decoder-only baseline. "
                    "Results land in --output as NAME.json, NAME.md and PNG plots.")
    sub = parser.add_subparsers(dest="bench", required=True)
    mem = sub.add_parser("memory", help="training memory per method (one fresh process per measurement)",
                         description=memory.__doc__.splitlines()[0])
    memory.add_arguments(mem)
    mem.set_defaults(func=lambda args: memory.run_sweep(args) and 0)
    qual = sub.add_parser("quality", help="Dice/HD95 on unseen slices versus training slices (MNI152 GM/WM, Colin27 AAL structures)",
                          description=quality.__doc__.splitlines()[0])
    quality.add_arguments(qual)
    qual.set_defaults(func=lambda args: quality.run(args) and 0)
    spd = sub.add_parser("speed", help="inference s/slice and training s/step, FLOPs, share of matmul peak",
                         description=speed.__doc__.splitlines()[0])
    speed.add_arguments(spd)
    spd.set_defaults(func=lambda args: speed.run(args) and 0)
    coh = sub.add_parser("cohort", help="volumes per minute on a local Dask cluster (1, 2 workers) against one process",
                         description=cohort.__doc__.splitlines()[0])
    cohort.add_arguments(coh)
    coh.set_defaults(func=lambda args: cohort.run(args) and 0)
    rep = sub.add_parser("report", help="write README.md's Results section from the JSON files",
                         description=report.__doc__.splitlines()[0])
    report.add_arguments(rep)
    rep.set_defaults(func=lambda args: print(report.run(args)) or 0)
    every = sub.add_parser("all", help="memory, quality and speed with their defaults, then report",
                           description="Run every benchmark with its default settings into --output, then "
                                       "rewrite README.md's Results section (hours on a 2-core CPU).")
    every.add_argument("--output", default="docs/results")
    every.add_argument("--readme", default="README.md")
    every.set_defaults(func=run_all)


def _defaults(add_arguments, output: str, **extra):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    args.output = output
    for key, value in extra.items():
        setattr(args, key, value)
    return args


def run_all(args) -> int:
    from . import memory, quality, report, speed

    memory.run_sweep(_defaults(memory.add_arguments, args.output))
    quality.run(_defaults(quality.add_arguments, args.output))
    speed.run(_defaults(speed.add_arguments, args.output))
    print(report.run(_defaults(report.add_arguments, args.output, results=args.output, readme=args.readme)))
    return 0
