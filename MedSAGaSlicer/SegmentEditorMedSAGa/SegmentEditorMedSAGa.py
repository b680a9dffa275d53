"""Hidden module that registers the "MedSAGa" Segment Editor effect."""

import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest


class SegmentEditorMedSAGa(ScriptedLoadableModule):

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegmentEditorMedSAGa"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "MedSAGa"]  # MedSAGaBridge, dependency install
        self.parent.contributors = ["MedSAGa developers"]
        self.parent.hidden = True
        self.parent.helpText = "Registers the MedSAGa Segment Editor effect (SAM box prompts and adapted models)."
        self.parent.acknowledgementText = "See the MedSAGa module."
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects
        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__),
                                      self.__class__.__name__ + "Lib/SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()


class SegmentEditorMedSAGaTest(ScriptedLoadableModuleTest):

    def runTest(self):
        self.test_effect_registered()

    def test_effect_registered(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects
        factory = effects.qSlicerSegmentEditorEffectFactory.instance()
        names = [effect.name for effect in factory.registeredEffects()]
        self.assertIn("MedSAGa", names)
