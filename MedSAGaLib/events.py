"""Progress events: the one schema that the trainer and the workflow emit, ``medsaga finetune
--progress json`` prints (one JSON object per line, unchanged), and the Slicer panel reads.

An event is a plain dict with an ``"event"`` key naming its kind, and the fields below. Times are
seconds; ``val_dice`` maps class name -> Dice (``None`` in JSON where a class was in neither the
prediction nor the reference, NaN in Python). Fields marked optional may be absent.

``start``               the fine-tune is set up (workflow, before any model work)
    train_slices: list[int]   slice indices along the axis that train
    val_slices:   list[int]   annotated slices that only validate
    classes:      list[str]   class names, label values 1..k
    method:       str         training method (see ``MedSAGaLib.training.methods``)
    steps:        int         optimizer steps planned
``prepare``             frozen encoder features of the (augmented) training slices computed
    done, total:  int         slices done so far / in all
    elapsed:      float       since the trainer started
``prepare-validation``  the same for the validation slices
    done, total, elapsed
``validate``            validation Dice of the untrained model (step 0)
    step: int (0), steps: int, val_dice: dict, elapsed: float
``step``                one optimizer step done
    step, steps:  int         steps done / planned
    loss:         float       training loss of this step
    lr:           float       head learning rate used by this step
    val_dice:     dict|None   latest validation Dice (this step's if it validated)
    elapsed:      float       since the trainer started
    eta:          float       estimated seconds to the last step
``done``                the fine-tune finished (or was stopped) and the model file is written
    model:        str         model file
    steps:        int         steps done
    stopped:      bool        stopped before the planned steps
    best_step:    int         step whose weights were kept
    val_dice, initial_val_dice: dict   at the kept step / before training
    seconds_per_step, seconds: float
    decisions:    list[str]   what the run decided: crop, planned steps, why it stopped (optional)
    stop_reason:  str         why training ended (optional)
    warnings:     list[str]   classes not learned, each named with what to paint (optional)
    timings:      dict        where the time went, seconds (optional): setup, prepare_training
                              (prepare_slices: how many, augmented copies included), prepare_validation,
                              steps, validation (validation_passes: how many), total
``segment``             slices segmented (``segment`` / ``evaluate``)
    done, total:  int
    elapsed:      float (optional)
``cohort-start``        ``segment`` with many inputs (``MedSAGaLib.cohort``) has checked earlier outputs
    total:        int         inputs in all
    skipped:      int         inputs whose outputs from an earlier run are complete and valid
    pending:      int         inputs to segment now
``volume``              one input of a cohort finished
    done, total:  int         inputs finished (skipped ones included) / in all
    input, output: str        image and its .seg.nrrd (output None when it failed)
    status:       str         done or failed
    seconds:      float|None  segmentation time on the worker
    error:        str|None    why it failed
``cohort-end``          the cohort run finished and its summary is written
    counts:       dict        done / skipped / failed -> number of inputs
    seconds:      float
    summary:      str         the summary.json file

A record without ``"event"`` is a ``step`` (older command lines printed steps that way).
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any, Optional

# kind -> (required fields, optional fields)
SCHEMA: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "start": (("train_slices", "val_slices", "classes", "method", "steps"), ()),
    "prepare": (("done", "total", "elapsed"), ()),
    "prepare-validation": (("done", "total", "elapsed"), ()),
    "validate": (("step", "steps", "val_dice", "elapsed"), ()),
    "step": (("step", "steps", "loss", "lr", "val_dice", "elapsed", "eta"), ()),
    "done": (("model", "steps", "stopped", "best_step", "val_dice", "initial_val_dice", "seconds_per_step",
              "seconds"), ("decisions", "stop_reason", "warnings", "timings")),
    "segment": (("done", "total"), ("elapsed",)),
    "cohort-start": (("total", "skipped", "pending"), ()),
    "volume": (("done", "total", "input", "output", "status", "seconds", "error"), ()),
    "cohort-end": (("counts", "seconds", "summary"), ()),
}


def event(kind: str, **fields: Any) -> dict:
    """A progress event of ``kind`` holding exactly the schema's fields (a ValueError otherwise)."""
    if kind not in SCHEMA:
        raise ValueError(f"Unknown progress event {kind!r}; known: {', '.join(SCHEMA)}.")
    required, optional = SCHEMA[kind]
    missing = [f for f in required if f not in fields]
    extra = [f for f in fields if f not in required and f not in optional]
    if missing or extra:
        raise ValueError(f"Progress event {kind!r}: missing fields {missing}, unknown fields {extra}.")
    return {"event": kind, **fields}


def kind_of(ev: dict) -> str:
    return ev.get("event", "step")


def jsonable(value: Any) -> Any:
    """``value`` with NaN/inf as None and numpy scalars as Python numbers, for JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:  # numpy scalar
        return jsonable(value.item())
    return value


def to_json_line(ev: dict) -> str:
    """One line of JSON (no newline) for an event."""
    return json.dumps(jsonable(ev))


def parse_json_line(line: str) -> Optional[dict]:
    """The event on a line of ``--progress json`` output; None for any other line (log text)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def format_seconds(seconds: Optional[float]) -> str:
    """``3725`` -> ``"1:02:05"``, ``75`` -> ``"1:15"``."""
    if seconds is None:
        return ""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_timings(timings: Optional[dict], steps: Optional[int] = None) -> str:
    """Where a fine-tune's time went (the ``timings`` of a ``done`` event) as one line; "" without timings."""
    t = timings or {}
    if not t:
        return ""
    parts = [f"setting up {t.get('setup', 0):.0f} s"]
    if t.get("prepare_slices"):
        parts.append(f"preparing {t['prepare_slices']} training slices (augmented copies included) "
                     f"{t.get('prepare_training', 0):.0f} s")
    if t.get("prepare_validation", 0) >= 0.5:
        parts.append(f"preparing validation slices {t['prepare_validation']:.0f} s")
    step_text = f"{steps} steps " if steps is not None else "steps "
    per_step = f" ({t['steps'] / steps:.2f} s/step)" if steps else ""
    parts.append(f"{step_text}{t.get('steps', 0):.0f} s{per_step}")
    if t.get("validation_passes"):
        parts.append(f"{t['validation_passes']} validation passes {t.get('validation', 0):.0f} s")
    total = f"; {t['total']:.0f} s in all" if "total" in t else ""
    return "time: " + ", ".join(parts) + total


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def mean_dice(dice: Optional[dict]) -> Optional[float]:
    """Mean over the classes with a finite Dice; None when there is none."""
    values = [float(v) for v in (dice or {}).values() if _finite(v)]
    return sum(values) / len(values) if values else None


def format_dice(dice: Optional[dict]) -> str:
    """``{"a": 0.5, "b": None}`` -> ``"a 0.500, b n/a"``."""
    return ", ".join(f"{k} {float(v):.3f}" if _finite(v) else f"{k} n/a" for k, v in (dice or {}).items())


def _dice_text(dice: Optional[dict]) -> str:
    mean = mean_dice(dice)
    if mean is None:
        return ""
    return f"val Dice {mean:.3f}" + (f" ({format_dice(dice)})" if len(dice) > 1 else "")


def describe(ev: dict) -> str:
    """The one-line human text for an event, as the CLI prints it and the Slicer panel shows it."""
    if not ev:
        return ""
    kind = kind_of(ev)
    if kind in ("prepare", "prepare-validation"):
        what = "validation slices" if kind == "prepare-validation" else "training slices"
        return f"preparing {what} {ev.get('done', 0)}/{ev.get('total', '?')}"
    if kind == "start":
        from .slices import format_ranges

        train, val = list(ev.get("train_slices") or []), list(ev.get("val_slices") or [])
        return (f"starting: {len(train)} training slice(s) ({format_ranges(train)}), {len(val)} validation slice(s)"
                f"{f' ({format_ranges(val)})' if val else ''}, classes {', '.join(ev.get('classes') or [])}, "
                f"method {ev.get('method', '?')}, {ev.get('steps', '?')} steps")
    if kind == "validate":
        return "before training: " + (_dice_text(ev.get("val_dice")) or "no validation slice")
    if kind == "segment":
        return f"segmenting slice {ev.get('done', 0)}/{ev.get('total', '?')}"
    if kind == "cohort-start":
        return f"{ev.get('pending', 0)} of {ev.get('total', '?')} volumes to segment ({ev.get('skipped', 0)} already done)"
    if kind == "volume":
        text = f"volume {ev.get('done', 0)}/{ev.get('total', '?')} {ev.get('status', '')}: {ev.get('input', '')}"
        return text + (f" ({ev['error']})" if ev.get("error") else "")
    if kind == "cohort-end":
        counts = ev.get("counts") or {}
        return ", ".join(f"{counts.get(k, 0)} {k}" for k in ("done", "skipped", "failed"))
    parts = []
    if kind == "done":
        parts.append(f"done: {ev.get('steps', '?')} steps" + (" (stopped early)" if ev.get("stopped") else ""))
        if ev.get("best_step") is not None and ev.get("val_dice"):
            parts.append(f"kept step {ev['best_step']}")
    elif "step" in ev and "steps" in ev:
        parts.append(f"step {ev['step']}/{ev['steps']}")
    if _finite(ev.get("loss")):
        parts.append(f"loss {float(ev['loss']):.4f}")
    if _finite(ev.get("lr")):
        parts.append(f"lr {float(ev['lr']):.2e}")
    dice = _dice_text(ev.get("val_dice"))
    if dice:
        parts.append(dice)
    if kind == "done" and _finite(ev.get("seconds")):
        parts.append(f"{format_seconds(ev['seconds'])} in all")
    if kind != "done" and ev.get("eta") is not None:
        parts.append(f"ETA {format_seconds(ev['eta'])}")
    if kind == "done" and ev.get("stop_reason"):
        parts.append(f"stopped: {ev['stop_reason']}")
    text = ", ".join(parts)
    if kind == "done" and ev.get("timings"):
        text += "\n" + format_timings(ev["timings"], ev.get("steps"))
    if kind == "done" and ev.get("warnings"):  # classes not learned: named, never silent
        text += "\n" + "\n".join(f"warning: {w}" for w in ev["warnings"])
    return text


class ConsoleProgress:
    """Shows events on a terminal: ``json`` lines on stdout (unchanged events, for programs), a
    ``tqdm`` bar, throttled text ``lines`` on stderr, or ``none``; ``auto``: a bar on a terminal, else lines."""

    def __init__(self, mode: str = "auto", every_seconds: float = 10.0) -> None:
        import sys

        self.stderr = sys.stderr
        if mode == "auto":
            mode = "tqdm" if self.stderr.isatty() else "lines"
        self.mode = mode
        self.every_seconds = every_seconds
        self.bars: dict = {}
        self.last_line = 0.0

    def _print(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def _bar(self, name: str, total: int, unit: str):
        if name not in self.bars:
            from tqdm.auto import tqdm

            self.bars[name] = tqdm(total=total, desc=name, unit=unit)
        return self.bars[name]

    def __call__(self, ev: dict) -> None:
        import time

        kind = kind_of(ev)
        if self.mode == "json":
            print(to_json_line(ev), flush=True)
            return
        if self.mode == "none" or kind == "done":
            return  # the front end words its own summary
        if kind in ("prepare", "prepare-validation"):
            if self.mode == "lines" and ev["done"] == ev["total"]:
                self._print(f"{describe(ev)} ({ev['elapsed']:.0f} s)")
            return
        if kind == "segment" and self.mode == "tqdm":
            bar = self._bar("Segmenting", ev["total"], "slice")
            bar.update(ev["done"] - bar.n)
            return
        if kind not in ("step", "segment"):
            self._print(describe(ev))
            return
        if self.mode == "tqdm":
            bar = self._bar("Fine-tuning", ev["steps"], "step")
            bar.update(1)
            post = {"loss": f"{ev['loss']:.4f}", "lr": f"{ev['lr']:.2e}"}
            if ev.get("val_dice"):
                post["val"] = format_dice(ev["val_dice"])
            bar.set_postfix(post)
            return
        now = time.monotonic()
        last = ev.get("step", ev.get("done")) == ev.get("steps", ev.get("total"))
        if now - self.last_line > self.every_seconds or last or (kind == "step" and ev.get("val_dice") and ev["step"] % 10 == 0):
            self.last_line = now
            self._print(describe(ev))

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
