"""``medsaga bench memory|quality|speed``: the benchmarks behind the README's Results section."""

from __future__ import annotations


def add_bench_parser(subparsers) -> None:
    from . import cohort, memory, quality, report, speed

    parser = subparsers.add_parser(
        "bench", help="benchmarks: training memory, Dice versus shots, speed",
        description="Benchmarks of MedSAGa against LoRA, full fine-tuning and a decoder-only baseline. "
                    "Results land in --output as NAME.json, NAME.md and PNG plots.")
    sub = parser.add_subparsers(dest="bench", required=True)
    # one sub-command per benchmark module: each has add_arguments and a runner returning something truthy
    commands = [
        ("memory", memory, memory.run_sweep, "training memory per method (one fresh process per measurement)"),
        ("quality", quality, quality.run,
         "Dice/HD95 on unseen slices versus training slices (MNI152 GM/WM, Colin27 AAL structures)"),
        ("speed", speed, speed.run, "inference s/slice and training s/step, FLOPs, share of matmul peak"),
        ("cohort", cohort, cohort.run, "volumes per minute on a local Dask cluster (1, 2 workers) against one process"),
        ("report", report, lambda args: print(report.run(args)) or True, "write README.md's Results section from the JSON files"),
    ]
    for name, module, runner, help_text in commands:
        command = sub.add_parser(name, help=help_text, description=module.__doc__.splitlines()[0])
        module.add_arguments(command)
        command.set_defaults(func=lambda args, runner=runner: runner(args) and 0)
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
