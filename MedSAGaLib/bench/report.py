"""``medsaga bench report``: the README's Results section, written from the benchmark JSON files.

Reads ``memory*.json``, ``quality*.json`` and ``speed*.json`` from the results folder and replaces
the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md, so the
numbers in the README are always the ones in the files next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

from .memory import MB, bar_chart, markdown_table, row_label

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(folder: Path, pattern: str) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(folder.glob(pattern)):
        try:
            out.append((path, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _find(results: list[dict], model: str, size: int, method: str, ckpt: bool, rank=None, layers: str = "all") -> Optional[dict]:
    for r in results:
        if (r.get("model"), r.get("image_size"), r.get("method"), r.get("checkpointing")) == (model, size, method, ckpt) \
                and "error" not in r and (rank is None or r.get("rank") == rank) and r.get("encoder_layers", "all") == layers:
            return r
    return None


def memory_section(folder: Path, rel: str) -> list[str]:
    lines = []
    files = _load(folder, "memory*.json")
    if not files:
        return ["_No memory benchmark in the results folder yet: run `medsaga bench memory`._", ""]
    for path, data in files:
        results = data.get("results", [])
        ok = [r for r in results if "error" not in r]
        machine = ok[0]["machine"] if ok else {}
        where = machine.get("gpu") or f"CPU ({machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} cores)"
        lines.append(f"#### `{path.name}` — {where}, torch {machine.get('torch', '?')}\n")
        lines.append(markdown_table(results))
        png = path.with_suffix(".png")
        if ok:
            path.with_suffix(".md").write_text(markdown_table(results), encoding="utf-8")
            bar_chart(results, png)
        if png.exists():
            lines.append(f"![training memory per method]({rel}/{png.name})\n")
        for model, size in sorted({(r["model"], r["image_size"]) for r in ok}):
            full = _find(ok, model, size, "full", False)
            if not full:
                continue
            facts = []
            for r in ok:
                if (r["model"], r["image_size"]) == (model, size) and r is not full and r.get("tracker_peak") \
                        and full.get("tracker_peak"):
                    facts.append(f"{row_label(r)} {r['tracker_peak'] / full['tracker_peak']:.2f}x")
            if facts:
                lines.append(f"- {model} {size} px, tracker peak relative to `full` without checkpointing: "
                             + ", ".join(facts) + ".")
        lines.append("")
    return lines


def _quality_files(folder: Path) -> list[tuple[Path, dict, bool]]:
    """(path, data, partial): a run stopped before its summary gets one made from the runs it finished."""
    from .quality import summarize

    out = []
    for path, data in _load(folder, "quality*.json"):
        partial = not data.get("summary") and bool(data.get("runs"))
        data["summary"] = summarize(data) if partial else (data.get("summary") or [])
        out.append((path, data, partial))
    return out


def quality_section(folder: Path, rel: str) -> list[str]:
    from .quality import markdown, plot

    lines = []
    files = _quality_files(folder)
    if not files:
        return ["_No quality benchmark in the results folder yet: run `medsaga bench quality`._", ""]
    for path, data, partial in files:
        if not data.get("summary"):  # no finished run: at most the warm-up loss curves
            curves = data.get("loss_curves") or {}
            if curves:
                plot(data, path.with_suffix(".png"), path.with_name(path.stem + "_loss.png"))
                first = next(iter(curves.values()))
                finals = ", ".join(f"{k}: final loss {c['losses'][-1]:.3f}" for k, c in curves.items() if c["losses"])
                lines.append(f"#### `{path.name}` — loss curves, {first['method']}, {first['shots']} shot(s), "
                             f"lr {first['lr']:g}\n")
                lines.append(f"{finals}.\n")
                lines.append(f"![loss curves with and without warm-up]({rel}/{path.stem}_loss.png)\n")
            else:
                lines.append(f"_`{path.name}` holds no finished run yet._\n")
            continue
        if partial:
            lines.append(f"_`{path.name}` is partial: the run stopped before finishing its plan; these are the "
                         "runs it completed._\n")
        plot(data, path.with_suffix(".png"), path.with_name(path.stem + "_loss.png"))
        path.with_suffix(".md").write_text(markdown(data), encoding="utf-8")
        machine = data.get("machine", {})
        lines.append(f"#### `{path.name}` — CPU ({machine.get('cpu', '?')}), {data.get('seconds', 0) / 60:.0f} min\n")
        lines.append(markdown(data))
        loss_alt = "loss curves with and without warm-up" if data.get("loss_curves") else "training loss of each run"
        for suffix, alt in (("", "Dice versus training slices"), ("_loss", loss_alt)):
            png = path.with_name(path.stem + suffix + ".png")
            if png.exists():
                lines.append(f"![{alt}]({rel}/{png.name})\n")
        summary = data["summary"]
        by = {(r["method"], r["shots"]): r for r in summary}
        for shots in sorted({r["shots"] for r in summary}):
            full = by.get(("full", shots))
            for method in ("galore", "galore-layerwise", "lora"):
                r = by.get((method, shots))
                if full and r and math.isfinite(full["dice_mean"]) and math.isfinite(r["dice_mean"]):
                    lines.append(f"- {shots} shot(s): {method} − full = {100 * (r['dice_mean'] - full['dice_mean']):+.1f} Dice points.")
        lines.append("")
    return lines


def speed_section(folder: Path, rel: str) -> list[str]:
    from .speed import markdown

    files = _load(folder, "speed*.json")
    if not files:
        return ["_No speed benchmark in the results folder yet: run `medsaga bench speed`._", ""]
    lines = []
    for path, data in files:
        lines.append(f"#### `{path.name}`\n")
        lines.append(markdown(data))
    return lines


def _tracked(results: list[dict], model: str, size: int, method: str, layers: str) -> list[dict]:
    """The checkpointed rows of ``method`` on ``layers`` that have a tracker peak (every rank)."""
    return [r for r in results if (r["model"], r["image_size"], r["method"], r["checkpointing"]) == (model, size, method, True)
            and r.get("tracker_peak") and r.get("encoder_layers", "all") == layers]


def _lower(galore: float, lora: float) -> str:
    if abs(galore - lora) <= 0.01 * lora:
        return "equal (within 1%)"
    return "GaLore lower" if galore < lora else "LoRA lower"


def targets_section(folder: Path) -> list[str]:
    """The issue's targets, checked against whatever the result files hold."""
    from .quality import settings_text

    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for path, data in _load(folder, "memory*.json"):
        ok = [r for r in data.get("results", []) if "error" not in r]
        for model, size in sorted({(r["model"], r["image_size"]) for r in ok}):
            full = _find(ok, model, size, "full", False)
            glw = _find(ok, model, size, "galore-layerwise", True, data.get("settings", {}).get("rank"))
            lora = _find(ok, model, size, "lora", True)
            if not (full and full.get("tracker_peak")):
                continue
            where = f"{model} {size} px, {full['device']}, `{path.name}`"
            stages = f"{full.get('train_stages')} of 4 encoder stages trained"
            # "x full" means full fine-tuning of the whole encoder; a file that trains fewer stages checks LoRA only
            whole = full.get("train_stages") in (None, 4)
            for r in (_tracked(ok, model, size, "galore-layerwise", "qkv") if lora and lora.get("tracker_peak") else []):
                to_lora, to_full = r["tracker_peak"] / lora["tracker_peak"], r["tracker_peak"] / full["tracker_peak"]
                target = "<= 1.0x lora+ckpt and <= 0.25x full" if whole else "<= 1.0x lora+ckpt"
                full_text = f"{to_full:.2f}x full" + ("" if whole else " (full trains the same stages here)")
                lines.append(f"| {row_label(r)} (GaLore on the layers LoRA adapts) peak {target} "
                             f"({where}, {stages}) | {to_lora:.2f}x LoRA ({r['tracker_peak'] / MB:,.0f} / "
                             f"{lora['tracker_peak'] / MB:,.0f} MB), {full_text} "
                             f"| {'met' if to_lora <= 1.0 and (to_full <= 0.25 or not whole) else 'missed'} |")
            if glw and glw.get("tracker_peak") and whole:
                for r in _tracked(ok, model, size, "galore-layerwise", "all"):
                    ratio = r["tracker_peak"] / full["tracker_peak"]
                    lines.append(f"| galore-layerwise+ckpt peak <= 0.34x full ({where}, GaLore rank {r.get('rank')}, {stages}) "
                                 f"| {ratio:.2f}x ({r['tracker_peak'] / MB:,.0f} / {full['tracker_peak'] / MB:,.0f} MB) "
                                 f"| {'met' if ratio <= 0.34 else 'missed'} |")
                if lora and lora.get("tracker_peak"):
                    lr = lora["tracker_peak"] / full["tracker_peak"]
                    lines.append(f"| (reference) lora+ckpt peak vs full ({where}) | {lr:.2f}x; galore-layerwise+ckpt is "
                                 f"{glw['tracker_peak'] / lora['tracker_peak']:.2f}x LoRA's | "
                                 f"{_lower(glw['tracker_peak'], lora['tracker_peak'])} |")
    for path, data, _ in _quality_files(folder):
        by = {(r["method"], r["shots"]): r for r in data.get("summary", [])}
        full = by.get(("full", 10))
        for method in ("galore-layerwise", "galore"):
            r = by.get((method, 10))
            if full and r:
                gap = 100 * (full["dice_mean"] - r["dice_mean"])
                rates = (f"lr {r['lr']:g} vs {full['lr']:g}" if r.get("lr") and full.get("lr")
                         else f"lr {data['settings'].get('lr')}")
                if r.get("config"):
                    rates += ", " + settings_text(r["config"])
                spread = (f" (± {100 * r['dice_std']:.1f} / ± {100 * full['dice_std']:.1f} over {r['seeds']} seeds)"
                          if r.get("seeds", 1) > 1 else "")
                lines.append(f"| {method} Dice within 2 points of full at 10 shots (`{path.name}`, "
                             f"{data['settings']['steps']} steps, {rates}) | {100 * r['dice_mean']:.1f} vs "
                             f"{100 * full['dice_mean']:.1f}{spread} | {'met' if gap <= 2 else 'missed'} |")
                break
    if not any("Dice within 2 points" in line for line in lines):
        lines.append("| galore-layerwise Dice within 2 points of full at 10 shots | no 10-shot run finished on this "
                     "shared CPU | missing |")
    for path, data in _load(folder, "speed*.json"):
        two = [r for r in data.get("inference", []) if r["model"] == "litemedsam" and r.get("threads") == 2]
        fast = [r for r in two if r["path"] == "fast"]
        plain = [r for r in two if r["path"] == "plain"]
        if fast:
            best = min(fast, key=lambda r: r["seconds_per_slice_wall"])
            base = min(plain, key=lambda r: r["seconds_per_slice_wall"]) if plain else None
            base_txt = f" (unoptimised {base['seconds_per_slice_wall']:.2f} s)" if base else ""
            lines.append(f"| LiteMedSAM inference <= 1.0 s per 256 px slice on 2 CPU threads (`{path.name}`) "
                         f"| {best['seconds_per_slice_wall']:.2f} s wall, {best['cpu_seconds_per_slice']:.2f} CPU-s, "
                         f"batch {best['batch_size']}, {best['threads']} threads{base_txt} "
                         f"| {'met' if best['seconds_per_slice_wall'] <= 1.0 else 'missed (shared CPU: see CPU-s)'} |")
    gpu_files = [(path.name, r["machine"].get("gpu", r.get("device"))) for path, data in _load(folder, "memory*.json")
                 for r in data.get("results", [])[:1] if "error" not in r and str(r.get("device", "")).startswith("cuda")
                 and r.get("model") == "vit_b" and r.get("image_size") == 1024]
    lines.append("| `bench memory` vit_b 1024 px on a GPU | "
                 + ("; ".join(f"`{name}` ({gpu})" for name, gpu in gpu_files) if gpu_files
                    else "not run: no GPU machine was lent to this task")
                 + f" | {'measured' if gpu_files else 'missing'} |")
    return lines + [""]


def render(folder: Path, rel: str, notes: str = "") -> str:
    lines = ["## Results", ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += ["### Targets of the benchmark issue", ""] + targets_section(folder)
    lines += ["### Training memory (`medsaga bench memory`)", ""] + memory_section(folder, rel)
    lines += ["### Dice versus annotated slices (`medsaga bench quality`)", ""] + quality_section(folder, rel)
    lines += ["### Speed (`medsaga bench speed`)", ""] + speed_section(folder, rel)
    return "\n".join(lines).rstrip() + "\n"


def write_readme(readme: Path, section: str) -> Path:
    text = readme.read_text(encoding="utf-8") if readme.exists() else f"{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{section}{END}{tail}", encoding="utf-8")
    return readme


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="docs/results", help="folder with the benchmark JSON files")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--notes", default=None, help="Markdown file put at the top of the section")


def run(args) -> Path:
    folder = Path(args.results)
    readme = Path(args.readme)
    try:
        rel = str(folder.resolve().relative_to(readme.resolve().parent))
    except ValueError:
        rel = str(folder)
    notes = Path(args.notes).read_text(encoding="utf-8") if args.notes else ""
    if not notes and (folder / "NOTES.md").exists():
        notes = (folder / "NOTES.md").read_text(encoding="utf-8")
    return write_readme(readme, render(folder, rel, notes))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSAGaLib.bench.report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
