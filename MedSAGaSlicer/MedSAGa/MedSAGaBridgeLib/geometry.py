"""Volume nodes as arrays, their IJK/RAS geometry, slice axes and slice-view positions.

Array convention: arrays are (k, j, i) like ``slicer.util.arrayFromVolume`` and like
``MedSAGaLib.volume.array_from_image`` on the files the jobs write. A *slice axis* is a numpy
axis of that array (0 = K, 1 = J, 2 = I); anatomical names are resolved through the volume's
IJK-to-RAS directions (``MedSAGaLib.slices.plane_axes``), never from the array index alone.
"""

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from MedSAGaLib.slices import plane_axes

from . import BridgeError

AXIS_NAMES = ("sagittal", "coronal", "axial")


def matrix_to_numpy(m):
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def numpy_to_matrix(a):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def ijk_to_ras(volume_node):
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return matrix_to_numpy(m)


def image_to_world(image):
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return matrix_to_numpy(m)


def volume_shape(volume_node):
    """(k, j, i) shape of the volume's voxel array."""
    image = volume_node.GetImageData()
    if image is None:
        raise BridgeError(f"Volume '{volume_node.GetName()}' has no image data.")
    i, j, k = image.GetDimensions()
    return (k, j, i)


def volume_array(volume_node):
    """Copy of the volume voxels as a (k, j, i) array (first component only)."""
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise BridgeError(f"Volume '{volume_node.GetName()}' has no image data.")
    shape = volume_shape(volume_node)
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    components = image.GetNumberOfScalarComponents()
    array = scalars.reshape(shape + (components,))[..., 0] if components > 1 else scalars.reshape(shape)
    return np.array(array, copy=True)


def oriented_image(array_kji, ijk2ras, vtk_type=vtk.VTK_UNSIGNED_CHAR, origin_index=(0, 0, 0)):
    """vtkOrientedImageData holding ``array_kji`` with the given IJK-to-RAS geometry.

    ``origin_index`` is the (i, j, k) index of the array's first voxel (the image extent start)."""
    k, j, i = array_kji.shape
    img = slicer.vtkOrientedImageData()
    i0, j0, k0 = origin_index
    img.SetExtent(i0, i0 + i - 1, j0, j0 + j - 1, k0, k0 + k - 1)
    img.AllocateScalars(vtk_type, 1)
    img.SetImageToWorldMatrix(numpy_to_matrix(ijk2ras))
    numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = np.ascontiguousarray(array_kji).ravel()
    return img


def oriented_array(img):
    """(k, j, i) copy of a vtkOrientedImageData's scalars and its extent (None when empty)."""
    ext = img.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4] or img.GetPointData().GetScalars() is None:
        return None, ext
    shape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    return np.array(numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(shape)), ext


def extent_shape(extent):
    return (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)


def volume_reference_image(volume_node):
    """Empty-geometry oriented image matching the volume's grid (extent from 0)."""
    k, j, i = volume_shape(volume_node)
    ref = slicer.vtkOrientedImageData()
    ref.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    ref.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras(volume_node)))
    return ref


def resample(input_img, reference_img):
    """``input_img`` (binary/label, nearest neighbour) on the reference geometry, as (k, j, i)."""
    out = slicer.vtkOrientedImageData()
    ok = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        input_img, reference_img, out, False, False, None, 0)
    if not ok:
        raise BridgeError("Could not resample a labelmap into the reference geometry.")
    arr, ext = oriented_array(out)
    ref_ext = reference_img.GetExtent()
    full = np.zeros(extent_shape(ref_ext), dtype=np.uint8)
    if arr is None:
        return full
    # the output may be clipped to the overlapping extent: place it
    window = tuple(slice(ext[2 * a] - ref_ext[2 * a], ext[2 * a + 1] - ref_ext[2 * a] + 1) for a in (2, 1, 0))
    full[window] = arr
    return full


# -------------------------------------------------------------------------------------- axes

def anatomical_axes(volume_node):
    """Map anatomical plane name -> numpy axis of the (k, j, i) array (oblique volumes get three
    distinct axes: ``MedSAGaLib.slices.plane_axes``)."""
    voxel_axes = plane_axes(ijk_to_ras(volume_node)[:3, :3].ravel())  # plane -> voxel axis i=0, j=1, k=2
    return {name: 2 - voxel_axes[name] for name in AXIS_NAMES}


def axis_name(volume_node, axis):
    for name, ax in anatomical_axes(volume_node).items():
        if ax == axis:
            return name
    raise ValueError(axis)


def acquisition_axis(volume_node):
    """The numpy axis with the largest voxel spacing (K on ties): how the volume was sliced."""
    spacing = np.linalg.norm(ijk_to_ras(volume_node)[:3, :3], axis=0)  # i, j, k
    ijk = max((2, 1, 0), key=lambda c: (spacing[c] > spacing.max() * 0.999, c))
    return 2 - ijk


def resolve_axis(volume_node, axis="auto", labels=None):
    """Numpy axis from 'auto' / 'axial' / 'coronal' / 'sagittal' / 0-2.

    'auto': the axis along which the annotations are sparsest (the user painted slices in that
    view); without annotations the acquisition axis."""
    if isinstance(axis, (int, np.integer)):
        if axis not in (0, 1, 2):
            raise BridgeError(f"Slice axis must be 0, 1 or 2, not {axis}.")
        return int(axis)
    axis = str(axis).lower()
    if axis in AXIS_NAMES:
        return anatomical_axes(volume_node)[axis]
    if axis != "auto":
        raise BridgeError(f"Unknown slice axis '{axis}'.")
    if labels is not None and np.any(labels):
        counts = []
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            used = int(np.count_nonzero(np.any(labels, axis=other)))
            counts.append((used / labels.shape[ax], ax != acquisition_axis(volume_node), ax))
        return min(counts)[2]
    return acquisition_axis(volume_node)


# ------------------------------------------------------ slice views: RAS -> slice axis, index, pixels

def ras_to_ijk(volume_node, ras):
    """Continuous (i, j, k) of a RAS point in the volume."""
    m = np.linalg.inv(ijk_to_ras(volume_node))
    return (m @ np.array([ras[0], ras[1], ras[2], 1.0]))[:3]


def axis_from_normal(volume_node, normal_ras):
    """Numpy axis of the (k, j, i) array whose voxel axis is closest to a view's normal."""
    dirs = ijk_to_ras(volume_node)[:3, :3]
    dirs = dirs / np.maximum(np.linalg.norm(dirs, axis=0, keepdims=True), 1e-12)
    n = np.asarray(normal_ras, float)
    n = n / max(np.linalg.norm(n), 1e-12)
    return 2 - int(np.argmax(np.abs(dirs.T @ n)))


def slice_index(volume_node, axis, ras):
    """Index along ``axis`` of the slice through a RAS point (None when outside the volume)."""
    index = int(round(ras_to_ijk(volume_node, ras)[2 - axis]))
    return index if 0 <= index < volume_shape(volume_node)[axis] else None


def slice_pixel(volume_node, axis, ras):
    """(column, row) of a RAS point in the 2-D slice ``np.take(array, index, axis)``."""
    ijk = ras_to_ijk(volume_node, ras)
    row, col = (ijk[2 - a] for a in range(3) if a != axis)  # remaining numpy axes (row, column)
    return col, row


def box_from_ras(volume_node, axis, ras_a, ras_b):
    """Pixel box (x0, y0, x1, y1; end exclusive) of two RAS corners on a slice, clipped."""
    (c0, r0), (c1, r1) = slice_pixel(volume_node, axis, ras_a), slice_pixel(volume_node, axis, ras_b)
    shape = [n for a, n in enumerate(volume_shape(volume_node)) if a != axis]  # (rows, columns)
    x0, x1 = sorted((c0, c1))
    y0, y1 = sorted((r0, r1))
    x0, y0 = max(int(np.floor(x0 + 0.5)), 0), max(int(np.floor(y0 + 0.5)), 0)
    x1, y1 = min(int(np.floor(x1 + 0.5)) + 1, shape[1]), min(int(np.floor(y1 + 0.5)) + 1, shape[0])
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def view_slice(volume_node, slice_to_ras):
    """(axis, index) of the volume slice a slice view shows, from its SliceToRAS matrix
    (4x4 nested lists or array); index None when the view is outside the volume."""
    m = np.asarray(slice_to_ras, float)
    axis = axis_from_normal(volume_node, m[:3, 2])
    return axis, slice_index(volume_node, axis, m[:3, 3])
