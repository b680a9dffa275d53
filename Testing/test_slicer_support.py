"""Which Slicer versions MedSAGa runs in, and how its packages are installed (pure decisions)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MedSAGaSlicer", "MedSAGa"))
from MedSAGaBridgeLib import support  # noqa: E402


def test_supported_range_is_slicer_5_10_and_later():
    assert support.unsupported_reason("5.10.0", (3, 12, 10)) is None
    assert support.unsupported_reason("5.12.1", (3, 12, 10)) is None
    assert support.unsupported_reason("5.11.0-2025-10-01", (3, 12, 10)) is None  # preview builds
    assert support.unsupported_reason("6.0.0", (3, 13, 0)) is None


def test_older_slicer_is_refused_with_a_clear_message():
    for version, python in (("5.8.1", (3, 9, 10)), ("5.6.2", (3, 9, 10)), ("4.11.20210226", (3, 6, 7))):
        reason = support.unsupported_reason(version, python)
        assert reason and "5.10 or later" in reason and version.rsplit(".", 1)[0] in reason
    # a build that says 5.10 but lacks the editor logic, or runs an older Python
    assert "vtkSlicerSegmentEditorLogic" in support.unsupported_reason("5.10.0", (3, 12), has_editor_logic=False)
    assert "Python 3.12" in support.unsupported_reason("5.10.0", (3, 9, 10))


def test_install_plan():
    torch, vision = support.TORCH_REQUIREMENT, support.TORCHVISION_REQUIREMENT
    others = ["galore-torch>=1.0", "monai>=1.3"]
    assert support.install_plan([torch, vision] + others, True) == [("pytorch-extension", [torch, vision]),
                                                                    ("pip", others)]
    # torch there, torchvision missing: install it rather than fail
    assert support.install_plan([vision], True) == [("pytorch-extension", [vision])]
    assert support.install_plan([vision], False) == [("pip-torchvision", [vision])]
    assert support.install_plan([torch, vision], False) == [("pip-torch", [torch, vision])]
    assert support.install_plan([], True) == []
    installed = {"torch", "monai"}
    missing = support.missing_requirements(lambda name: name in installed)
    assert missing[0] == vision and "monai>=1.3" not in missing and "galore-torch>=1.0" in missing


def test_supported_keywords():
    def old(askConfirmation=False, torchVersionRequirement=None):
        pass

    def new(**kwargs):
        pass

    wanted = {"askConfirmation": False, "torchvisionVersionRequirement": ">=0.16"}
    assert support.supported_keywords(old, wanted) == {"askConfirmation": False}
    assert support.supported_keywords(new, wanted) == wanted
