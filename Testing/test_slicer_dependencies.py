"""The MedSAGa module file imports without heavy packages and installs them only on request.

Qt, CTK and Slicer's GUI-side Python (ScriptedLoadableModule, parameterNodeWrapper) do not exist
outside the Slicer application; minimal stand-ins replace them here, in a child process. MRML
(slicer-core) is real."""
import os
import subprocess
import sys
import textwrap

import pytest

import slicer  # noqa: F401  slicer-core is a test dependency: missing, these tests must fail, not skip
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "MedSAGaSlicer", "MedSAGa")

PRELUDE = textwrap.dedent(r"""
    import sys, types
    sys.path.insert(0, %(module_dir)r)
    import slicer, slicer.util
    for name in ("qt", "ctk"):
        sys.modules[name] = types.ModuleType(name)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                "ScriptedLoadableModuleWidget"):
        setattr(slm, cls, type(cls, (), {}))
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = lambda choices: ("choice", tuple(choices))
    pnw.WithinRange = lambda lo, hi: ("range", lo, hi)
    sys.modules["slicer.parameterNodeWrapper"] = pnw
    calls = []
    slicer.util.confirmOkCancelDisplay = lambda text, **kw: calls.append(("ask", text)) or ANSWER
    slicer.util.pip_install = lambda *a, **kw: calls.append(("pip_install", a, kw))
    class WaitCursor:
        def __enter__(self): return self
        def __exit__(self, *a): return False
    slicer.util.WaitCursor = WaitCursor
    slicer.app = types.SimpleNamespace(testingEnabled=lambda: TESTING, applicationVersion="5.10.0")
    import MedSAGa
    heavy = [m for m in ("torch", "MedSAGaLib", "monai", "segment_anything", "SimpleITK") if m in sys.modules]
    print("HEAVY", heavy)
""")


def run(body, answer, testing=False):
    code = "ANSWER = %r\nTESTING = %r\n" % (answer, testing) + PRELUDE % {"module_dir": MODULE_DIR} + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_loads_no_heavy_package_and_nothing_missing_here():
    out = run("""
        print("MISSING", MedSAGa.missingDependencies())
        print("INSTALLED", MedSAGa.installDependencies(askUser=True), calls)
        print("PARAMS", MedSAGa.MedSAGaParameterNode.__annotations__["method"].__metadata__)
    """, answer=True)
    assert "HEAVY []" in out
    assert "MISSING []" in out          # everything is installed in the test environment
    assert "INSTALLED True []" in out   # so nobody is asked and nothing is installed
    assert "galore" in out.split("PARAMS")[1]


def test_user_declines_nothing_installed():
    out = run("""
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name in ("galore_torch", "monai") else real(name, *a)
        print("MISSING", MedSAGa.missingDependencies())
        print("RESULT", MedSAGa.installDependencies(askUser=True))
        print("CALLS", [c[0] for c in calls])
    """, answer=False)
    assert "MISSING ['galore-torch>=1.0', 'monai>=1.3']" in out
    assert "RESULT False" in out and "CALLS ['ask']" in out


def test_user_agrees_pip_ensure_skips_slicers_own_packages():
    out = run("""
        import importlib.util
        real = importlib.util.find_spec
        missing = {"galore_torch"}
        importlib.util.find_spec = lambda name, *a: None if name in missing else real(name, *a)
        seen = []
        pkg = types.ModuleType("slicer.packaging")
        def pip_ensure(requirements, skip_packages=(), requester=None):
            seen.append(([str(r) for r in requirements], list(skip_packages), requester))
            missing.clear()
        pkg.pip_ensure = pip_ensure
        sys.modules["slicer.packaging"] = pkg
        print("RESULT", MedSAGa.installDependencies(askUser=True))
        print("SEEN", seen)
        print("CALLS", [c[0] for c in calls])
    """, answer=True)
    assert "RESULT True" in out and "CALLS ['ask']" in out
    seen = out.split("SEEN")[1]
    assert "galore-torch>=1.0" in seen and "'SimpleITK'" in seen and "'numpy'" in seen and "MedSAGa" in seen


def test_without_pip_ensure_pip_install_is_constrained():
    out = run("""
        import importlib.util
        real = importlib.util.find_spec
        missing = {"slicerio"}
        importlib.util.find_spec = lambda name, *a: None if name in missing else real(name, *a)
        def pip_install(args, **kw):
            calls.append(("pip_install", args))
            missing.clear()
        slicer.util.pip_install = pip_install
        for name in ("slicer.packaging", "slicer.pydeps"):
            sys.modules[name] = None  # not available in this Slicer
        print("RESULT", MedSAGa.installDependencies(askUser=False))
        args = [c for c in calls if c[0] == "pip_install"][0][1]
        print("ARGS", args)
        print("CONSTRAINTS", open(args[args.index("-c") + 1], encoding="utf-8").read().split())
    """, answer=True)
    assert "RESULT True" in out and "ARGS ['slicerio>=1.1', '-c'," in out
    constraints = out.split("CONSTRAINTS")[1]
    assert "numpy==" in constraints and "SimpleITK==" in constraints


def test_testing_mode_never_installs():
    """Slicer's ctest runs in testing mode: a missing package makes the test skip, never install."""
    out = run("""
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "monai" else real(name, *a)
        print("RESULT", MedSAGa.installDependencies(askUser=True))
        print("CALLS", [c[0] for c in calls])
    """, answer=True, testing=True)
    assert "RESULT False" in out and "CALLS []" in out


def test_torchvision_missing_goes_to_the_pytorch_extension_with_the_keywords_it_takes():
    """torch present, torchvision missing: the PyTorch extension installs a matching torchvision;
    an extension release without torchvisionVersionRequirement is not passed it."""
    out = run("""
        import importlib.util
        real = importlib.util.find_spec
        missing = {"torchvision"}
        importlib.util.find_spec = lambda name, *a: None if name in missing else real(name, *a)
        seen = []
        utils = types.ModuleType("PyTorchUtils")
        class PyTorchUtilsLogic:
            def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
                seen.append((askConfirmation, torchVersionRequirement))
                missing.clear()
        utils.PyTorchUtilsLogic = PyTorchUtilsLogic
        sys.modules["PyTorchUtils"] = utils
        print("RESULT", MedSAGa.installDependencies(askUser=True))
        print("SEEN", seen)
        print("CALLS", [c[0] for c in calls])
    """, answer=True)
    assert "RESULT True" in out and "SEEN [(False, '>=2.1')]" in out and "CALLS ['ask']" in out
