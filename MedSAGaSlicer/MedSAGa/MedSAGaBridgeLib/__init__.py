"""Qt-free bridge between MRML nodes and MedSAGaLib, one module per concept.

- ``support``: which Slicer/Python versions are supported, which packages to install and how.
- ``geometry``: volume arrays, IJK/RAS geometry, slice axes and slice-view positions.
- ``segments``: segments <-> class labels, predicted-slice bookkeeping, masking-aware writes
  through the Segment Editor logic, undo.
- ``jobs``: background ``medsaga`` processes (command lines from ``MedSAGaLib.commands``,
  process-tree cancel, progress text), job results bound to the nodes they were started with.
- ``prompts``: box prompts, propagation and single-slice segmentation for the effect;
  ``propagation`` is its numpy-only half, also run as a background process.

Nothing here imports ``qt``, ``ctk``, ``slicer.app`` or ``slicer.util`` widgets, so the module,
the Segment Editor effect and the tests (MRML from the ``slicer-core`` wheel) share one
implementation. This file imports nothing, so ``python -m MedSAGaBridgeLib.propagation`` runs in
a plain Python (PythonSlicer) without MRML.
"""


class BridgeError(ValueError):
    """A user-facing problem with the inputs (the message is meant for the user)."""


class ClassMismatchError(BridgeError):
    """The model's classes do not match the segmentation's segments."""
