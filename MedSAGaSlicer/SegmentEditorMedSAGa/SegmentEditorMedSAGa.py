"""Hidden module that registers the "MedSAGa" Segment Editor effect."""

import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest


class SegmentEditorMedSAGa(ScriptedLoadableModule):

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegmentEditorMedSAGa"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "MedSAGa"]  # MedSAGaBridgeLib, dependency install
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
    """The effect's ctest: registered, and its options reach the effect's parameters."""

    def runTest(self):
        import MedSAGa
        reason = MedSAGa.unsupportedReason()
        if reason:
            self.skipTest(reason)
        slicer.mrmlScene.Clear()
        self.test_effect_registered()
        self.test_model_path_is_kept()

    def test_effect_registered(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects
        factory = effects.qSlicerSegmentEditorEffectFactory.instance()
        names = [effect.name for effect in factory.registeredEffects()]
        self.assertIn("MedSAGa", names)

    def test_model_path_is_kept(self):
        """The model path typed in the effect is stored in the effect's parameters and survives a
        GUI refresh (it was replaced by the module's last model before)."""
        import numpy as np
        volume = slicer.util.addVolumeFromArray(np.zeros((4, 16, 16), np.float32), name="MedSAGaEffectTest")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.GetSegmentation().AddEmptySegment("", "a")
        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.setMRMLSegmentEditorNode(editorNode)
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)
        editor.setActiveEffectByName("MedSAGa")
        effect = editor.activeEffect()
        self.assertIsNotNone(effect)
        path = os.path.join(slicer.app.temporaryPath, "chosen.medsaga")
        effect.self().modelPathEdit.currentPath = path
        self.assertEqual(effect.parameter("ModelPath"), path)
        effect.self().updateGUIFromMRML()
        self.assertEqual(effect.self().modelPathEdit.currentPath, path)
        self.assertIsNone(slicer.mrmlScene.GetSingletonNode("MedSAGa", "vtkMRMLScriptedModuleNode"))
        editor.setActiveEffect(None)
