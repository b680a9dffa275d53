"""Small helpers shared by the benchmarks: process memory, machine description, JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

from . import JSON_MARK

MB = 1024.0 * 1024.0


def proc_status_kb(field: str) -> Optional[int]:
    """A ``/proc/self/status`` field in kB (VmRSS, VmHWM); None where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    import torch

    info = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def emit_json(payload: dict) -> None:
    """Print a result line the parent process can find among other output."""
    sys.stdout.write(JSON_MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def run_worker(module: str, args: list[str], timeout: Optional[float] = None, env: Optional[dict] = None) -> dict:
    """Run ``python -m module --worker args`` in a fresh process and return its JSON result."""
    cmd = [sys.executable, "-m", module, "--worker", *args]
    full_env = dict(os.environ)
    full_env.update(env or {})
    root = str(Path(__file__).resolve().parents[2])
    full_env["PYTHONPATH"] = root + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["PYTHONIOENCODING"] = "utf-8"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                              timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "command": cmd}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(JSON_MARK):
            return json.loads(line[len(JSON_MARK):])
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"error": f"worker exited with {proc.returncode}", "stderr_tail": tail, "command": cmd}


def write_json(path: str | Path, payload) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def set_threads(threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))
