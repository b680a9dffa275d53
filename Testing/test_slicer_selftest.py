"""Runs the module's in-Slicer self-test (MedSAGaTest, the extension's ctest) against slicer-core.

The application's GUI pieces (Qt, ScriptedLoadableModule base classes, parameterNodeWrapper,
slicer.app) are replaced by minimal stand-ins in a child process; the scene, the nodes and the
module logics are real MRML, and fine-tuning / segmentation run the real CLI in the background."""
import os
import subprocess
import sys
import textwrap

import pytest

import slicer  # noqa: F401  slicer-core is a test dependency: missing, these tests must fail, not skip
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = textwrap.dedent(r"""
    import sys, types, unittest, tempfile
    sys.path.insert(0, %(module_dir)r)
    import slicer, slicer.util
    for name in ("qt", "ctk"):
        sys.modules[name] = types.ModuleType(name)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget"):
        setattr(slm, cls, type(cls, (), {}))
    class Logic:
        def getParameterNode(self):
            node = slicer.mrmlScene.GetFirstNodeByName("MedSAGa")
            return node or slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MedSAGa")
    slm.ScriptedLoadableModuleLogic = Logic
    class Test(unittest.TestCase):
        def delayDisplay(self, message, *args):
            print("DISPLAY", message, flush=True)
    slm.ScriptedLoadableModuleTest = Test
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    class Params:  # stands in for @parameterNodeWrapper: plain attributes
        def __init__(self, node): self.node = node
    pnw.parameterNodeWrapper = lambda cls: type(cls.__name__, (Params,), {
        k: v for k, v in vars(cls).items() if not k.startswith("__")})
    pnw.Choice = lambda c: c
    pnw.WithinRange = lambda a, b: (a, b)
    sys.modules["slicer.parameterNodeWrapper"] = pnw
    slicer.mrmlScene = slicer.vtkMRMLScene()
    from MedSAGaBridgeLib import segments
    segmentations = segments.segmentations_logic(slicer.mrmlScene)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(slicer.mrmlScene)
    slicer.modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: segmentations),
                                           volumes=types.SimpleNamespace(logic=lambda: volumes))
    slicer.app = types.SimpleNamespace(temporaryPath=tempfile.mkdtemp(), applicationVersion="5.10.0",
                                       testingEnabled=lambda: True)
    import os
    slicer.util.startupEnvironment = lambda: dict(os.environ)  # the application's, without launcher settings
    import MedSAGa
    result = unittest.TextTestRunner(verbosity=2).run(unittest.TestSuite(
        [MedSAGa.MedSAGaTest(name) for name in NAMES]))
    sys.exit(0 if result.wasSuccessful() and not result.skipped else 1)
""")


def run_selftest(names, env=None, timeout=900):
    code = "NAMES = %r\n" % names + DRIVER % {"module_dir": os.path.join(ROOT, "MedSAGaSlicer", "MedSAGa")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout + out.stderr


def test_module_selftest_bridge_part():
    out = run_selftest(["test_bridge_roundtrip_and_undo"])
    assert "Bridge test passed" in out


@pytest.mark.slow
def test_module_selftest_finetune_segment_undo(tiny_vit_checkpoint):
    out = run_selftest(["test_finetune_segment_undo"],
                       env={"MEDSAGA_TEST_VIT_B_CHECKPOINT": str(tiny_vit_checkpoint)})
    assert "End-to-end test passed" in out
