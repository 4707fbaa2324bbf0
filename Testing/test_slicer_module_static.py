"""Static checks of the Slicer module where its Qt widget cannot run (no Slicer application here).

- every Python file of the extension compiles;
- the .ui parses, and every ``self.ui.<name>`` the widget uses is an objectName in it;
- every ``SlicerParameterName`` in the .ui is a field of the parameter node, with a widget type the
  parameter-node wrapper can bind to that field's type;
- the module declares the title/category/help/acknowledgement the issue asks for;
- the CMakeLists list files that exist (and the globs match something).
"""

from __future__ import annotations

import ast
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "FPDenoise"
SCRIPT = MODULE / "FPDenoise.py"
UI = MODULE / "Resources" / "UI" / "FPDenoise.ui"


def _py_files() -> list[Path]:
    return sorted(MODULE.rglob("*.py")) + [REPO / "examples" / "batch_denoise_slicer.py"]


@pytest.mark.parametrize("path", _py_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


def _ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def test_ui_names_used_by_widget_exist():
    widgets = _ui_widgets()
    used = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", SCRIPT.read_text()))
    assert used, "the widget uses no self.ui names?"
    missing = sorted(used - set(widgets))
    assert not missing, f"self.ui names missing from {UI.name}: {missing}"
    assert ET.parse(UI).getroot().find("widget").get("class") == "qMRMLWidget"


def _parameter_fields() -> dict[str, str]:
    tree = ast.parse(SCRIPT.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "FPDenoiseParameterNode":
            assert any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("FPDenoiseParameterNode not found")


# Widget classes the parameterNodeWrapper connectors bind, by (unannotated) field type.
_BINDABLE = {
    "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"},
    "str": {"QComboBox", "QLineEdit"},
    "bool": {"QCheckBox", "QPushButton"},
    "float": {"ctkSliderWidget", "QDoubleSpinBox"},
    "int": {"QSpinBox", "QSlider"},
}


def test_parameter_names_bind_to_fields():
    fields = _parameter_fields()
    bound = {}
    for name, w in _ui_widgets().items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = (name, w.get("class"))
    assert bound, "no widget is bound to the parameter node"
    for param, (wname, cls) in bound.items():
        assert param in fields, f"{wname}: SlicerParameterName {param!r} is not a parameter node field"
        annotation = fields[param]
        base = re.sub(r"^Annotated\[(\w+),.*\]$", r"\1", annotation)
        assert cls in _BINDABLE[base], f"{wname} ({cls}) cannot bind to {param}: {annotation}"
        if cls == "QComboBox":
            assert "Choice(" in annotation, f"{param}: a QComboBox needs a Choice annotation"
        if cls in ("ctkSliderWidget", "QSlider"):
            assert "WithinRange(" in annotation, f"{param}: a slider needs a WithinRange annotation"


def test_noise_names_match_library():
    from FPDenoiseLib.noise import NOISE_NAMES

    tree = ast.parse(SCRIPT.read_text())
    names = next(
        ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "NOISE_NAMES"
    )
    assert tuple(names) == tuple(NOISE_NAMES)


def test_module_metadata():
    text = SCRIPT.read_text()
    assert 'self.parent.title = "FPDenoise"' in text
    assert 'self.parent.categories = ["Filtering.Denoising"]' in text
    assert "Medical Image Denoising via Explainable AI Feature Preserving Loss" in text
    tree = ast.parse(text)
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["FPDenoise"]
    assert "ScriptedLoadableModuleWidget" in classes["FPDenoiseWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["FPDenoiseLogic"]
    assert "ScriptedLoadableModuleTest" in classes["FPDenoiseTest"]
    # No Qt in the Logic shared with the batch script and the browser viewer.
    logic = (MODULE / "FPDenoiseSlicerLib" / "logic.py").read_text() + (MODULE / "FPDenoiseSlicerLib" / "process.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(qt|ctk|PythonQt)\b", logic, re.M)


def _cmake_listed(path: Path) -> list[str]:
    text = re.sub(r"#.*", "", path.read_text())
    items = []
    for block in re.findall(r"set\(\s*MODULE_PYTHON_(?:SCRIPTS|RESOURCES)\s+(.*?)\)", text, re.S):
        items += block.split()
    return [i.replace("${MODULE_NAME}", "FPDenoise") for i in items]


def test_cmakelists_list_existing_files():
    root = (REPO / "CMakeLists.txt").read_text()
    assert "add_subdirectory(FPDenoise)" in root
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key}\s", root), key
    listed = _cmake_listed(MODULE / "CMakeLists.txt")
    assert "FPDenoise.py" in listed and "Resources/UI/FPDenoise.ui" in listed
    missing = [f for f in listed if not (MODULE / f).is_file()]
    assert not missing, f"listed in FPDenoise/CMakeLists.txt but missing: {missing}"
    # Every module Python file is listed (a forgotten helper would be absent from the built extension).
    actual = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py")}
    assert actual <= set(listed), f"not listed: {sorted(actual - set(listed))}"
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "${FPDENOISE_ROOT}/FPDenoiseLib/*.py" in text and list((REPO / "FPDenoiseLib").glob("*.py"))


def test_icon_is_128_png():
    from PIL import Image

    with Image.open(MODULE / "Resources" / "Icons" / "FPDenoise.png") as im:
        assert im.format == "PNG" and im.size == (128, 128)


def _parameter_defaults() -> dict[str, str]:
    tree = ast.parse(SCRIPT.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FPDenoiseParameterNode")
    return {s.target.id: ast.unparse(s.value) for s in cls.body if isinstance(s, ast.AnnAssign) and s.value is not None}


def _widget_method(name: str) -> ast.FunctionDef:
    tree = ast.parse(SCRIPT.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FPDenoiseWidget")
    return next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == name)


def _calls(func: ast.AST) -> set[str]:
    return {ast.unparse(n.func) for n in ast.walk(func) if isinstance(n, ast.Call)}


def test_background_percentile_slider_is_one_value_everywhere():
    from FPDenoiseLib.display import BACKGROUND_PERCENTILE

    # Parameter node: default is the display rule's constant, range 0-95.
    assert _parameter_fields()["backgroundPercentile"] == "Annotated[float, WithinRange(0.0, 95.0)]"
    assert _parameter_defaults()["backgroundPercentile"] == "BACKGROUND_PERCENTILE"
    assert "from FPDenoiseLib.display import BACKGROUND_PERCENTILE" in SCRIPT.read_text()
    # The .ui slider bound to it shows the same range and default.
    w = _ui_widgets()["backgroundPercentileSlider"]
    props = {p.get("name"): p for p in w.findall("property")}
    assert w.get("class") == "ctkSliderWidget"
    assert props["SlicerParameterName"].findtext("string") == "backgroundPercentile"
    assert float(props["minimum"].findtext("double")) == 0.0
    assert float(props["maximum"].findtext("double")) == 95.0
    assert float(props["value"].findtext("double")) == BACKGROUND_PERCENTILE
    # Moving it re-windows through the Logic (no math in the widget).
    handler = _widget_method("onBackgroundPercentileChanged")
    assert "self.logic.rewindowOverlays" in _calls(handler)
    assert not {c for c in _calls(handler) if "window" in c.lower() and not c.startswith("self.logic.")}
    assert "np." not in ast.unparse(handler)
    # Same default in the browser viewer and the words in the docs and the .ui legend.
    viewer = (REPO / "FPDenoiseWeb" / "viewer.py").read_text()
    assert "self.threshold = BACKGROUND_PERCENTILE" in viewer
    words = f"{BACKGROUND_PERCENTILE:g}th percentile"
    assert words in (REPO / "docs" / "slicer.md").read_text()
    assert words in _ui_widgets()["legendLabel"].find("property").findtext("string")
    assert "Hide background (percentile)" in (REPO / "docs" / "slicer.md").read_text()


def test_side_by_side_also_without_saliency():
    # The button always lays out input | output through the Logic (overlays may be None); it never
    # falls back to showing the output alone.
    calls = _calls(_widget_method("onSideBySideButton"))
    assert "self.logic.showSideBySide" in calls
    assert not any("setSliceViewerLayers" in c for c in calls)


def test_extension_screenshot_shows_the_slicer_module():
    root = (REPO / "CMakeLists.txt").read_text()
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS\s+"([^"]+)"\)', root).group(1).split()
    assert urls
    prefix = "https://raw.githubusercontent.com/fpdenoise/FPDenoise/main/"
    for url in urls:
        assert url.startswith(prefix), url
        rel = url[len(prefix):]
        # A Slicer-module screenshot (slicer_*.png, rendered from a slicer-core MRML scene), not the web viewer.
        assert re.fullmatch(r"docs/screenshots/slicer_[\w-]+\.png", rel), rel
        path = REPO / rel
        assert path.is_file(), f"screenshot {rel} is not in the repository"
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{rel} is not a PNG"
        assert rel in (REPO / "docs" / "slicer.md").read_text(), f"docs/slicer.md does not say how {rel} was made"


def test_shipped_model_names_agree_everywhere():
    """The model names (inference.MODEL_NAMES: the shipped models and "auto") are the ones the CLI help, the
    browser viewer's model list and the Slicer Logic's descriptions offer, and the module has a button for the
    CT model and for the automatic choice."""
    from FPDenoiseLib.cli import MODEL_HELP
    from FPDenoiseLib.inference import MODEL_NAMES

    web = ast.parse((REPO / "FPDenoiseWeb" / "app.py").read_text())
    choices = next(ast.literal_eval(n.value) for n in web.body
                   if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "MODEL_CHOICES")
    assert sorted(v for v, _ in choices) == sorted(MODEL_NAMES)
    assert all(f"{name} (" in MODEL_HELP for name in MODEL_NAMES), MODEL_HELP
    logic = (MODULE / "FPDenoiseSlicerLib" / "logic.py").read_text()
    roles = re.search(r"roles = (\{.*?\})\n", logic, re.S)
    assert roles and sorted(ast.literal_eval(roles.group(1))) == sorted(MODEL_NAMES)
    names = {e.get("name") for e in ET.parse(UI).getroot().iter("widget")}
    assert {"defaultModelButton", "ctTextureModelButton", "autoModelButton"} <= names
    assert 'modelPath = "ct_texture"' in SCRIPT.read_text() and 'modelPath = "auto"' in SCRIPT.read_text()


def test_the_gui_front_ends_start_with_the_automatic_choice():
    """The Slicer module's parameter and `fpdenoise view` start with "auto" (a low-dose CT gets the CT model
    without a choice to make), and so do the command line's denoise and demo; saliency (the default's f) and the
    benchmark (one model per column) name no choice."""
    import argparse

    from FPDenoiseLib.cli import build_parser
    from FPDenoiseWeb.app import add_view_parser

    tree = ast.parse(SCRIPT.read_text())
    defaults = {n.target.id: n.value.value for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
                for n in c.body if isinstance(n, ast.AnnAssign) and isinstance(n.value, ast.Constant)}
    assert defaults["modelPath"] == "auto"
    view = add_view_parser(argparse.ArgumentParser().add_subparsers())
    assert view.parse_args([]).model == "auto"
    parser = build_parser()
    assert parser.parse_args(["denoise", "a.nrrd", "b.nrrd"]).model == "auto"
    assert parser.parse_args(["demo"]).model == "auto"
    assert parser.parse_args(["saliency", "a.nrrd", "b.nrrd"]).model is None
    assert parser.parse_args(["benchmark", "--data", "d", "--out", "o"]).model is None


def test_slots_on_bound_widgets_do_not_read_the_parameter_they_change():
    """A slot the widget connects in setup() runs before the parameter node's own slot on the same signal
    (connectGui() connects later; Qt calls slots in connection order), so it must take the new value from the
    signal or the widget, not from the parameter node, which still holds the previous one. Regression: choosing
    the right view's overlay showed the previously chosen one."""
    tree = ast.parse(SCRIPT.read_text())
    bound = {}  # widget objectName -> parameter name
    for name, w in _ui_widgets().items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.findtext("string")
    methods = {f.name: f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "FPDenoiseWidget"
               for f in c.body if isinstance(f, ast.FunctionDef)}
    checked = 0
    for call in ast.walk(methods["setup"]):
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "connect"):
            continue
        target = call.func.value
        if not (isinstance(target, ast.Attribute) and target.attr in bound):
            continue
        slot = call.args[1]
        assert isinstance(slot, ast.Attribute) and slot.attr in methods, (
            f"{target.attr}: connect a method (its value argument), not {ast.unparse(slot)}")
        reads, todo, seen = set(), [slot.attr], set()
        while todo:  # the slot and the widget methods it calls
            name = todo.pop()
            seen.add(name)
            for n in ast.walk(methods[name]):
                if isinstance(n, ast.Attribute):
                    reads.add(n.attr)
                    if n.attr in methods and n.attr not in seen and ast.unparse(n.value) == "self":
                        todo.append(n.attr)
        assert bound[target.attr] not in reads, f"{slot.attr} reads the stale parameter {bound[target.attr]!r}"
        checked += 1
    assert checked >= 3  # opacity, background percentile, right overlay


def test_int_spin_boxes_are_bounded_below():
    """The parameter node wrapper sets a QSpinBox's range from the field's WithinRange / Minimum, else to
    [-2**31, 2**31 - 1]; every int the module binds (seed, steps) is refused below 0 by the library, so each
    carries a bound. Regression: the noise seed box offered negative seeds, which failed on Add noise."""
    fields = _parameter_fields()
    spin = {w.findtext("property[@name='SlicerParameterName']/string")
            for w in _ui_widgets().values() if w.get("class") == "QSpinBox"}
    assert spin
    for name in spin:
        assert re.match(r"Annotated\[int, .*(WithinRange|Minimum)\(", fields[name]), (name, fields[name])


def test_path_fields_follow_their_text():
    """ctkPathLineEdit emits currentPathChanged only when its validator, built from nameFilters (*.pt here),
    accepts the whole text (CTK ctkPathLineEdit::updateHasValidInput), so "" (the default model), "auto" or
    "ct_texture" typed into the model field never reached the parameter node and Apply ran the previous model.
    The widget follows the inner line edit's textChanged instead."""
    text = SCRIPT.read_text()
    assert "currentPathChanged" not in re.sub(r"#.*", "", text)
    assert 'className="QLineEdit")[0].connect("textChanged(QString)", slot)' in text
    assert 'self.ui.modelPathLineEdit.nameFilters = ["FPDenoise checkpoint (*.pt)"]' in text
