#!/usr/bin/env bash
# A user's run on a sample task (docs/results/NOTES.md, "Realistic tasks"): labels kept on 5 evenly spread
# annotated slices only (what a user paints), `medsaga finetune` with no flags but the ones given (every painted
# slice trains unless --val-fraction is given), then `medsaga evaluate` on every other annotated slice
# of the reference, without and with `--painted` (as the Slicer panel segments), and the baselines of docs/tools/painted_baselines.py on the same slices (once per task).
# Usage: docs/tools/painted_slices_run.sh TASK NAME [finetune flags...]   (OUT=folder, default /tmp/medsaga-painted;
#        SHOTS=n paints n slices instead of 5: give each shot count its own OUT; BASELINE_FLAGS are passed to
#        painted_baselines.py, e.g. "--skip oracle-box")
# e.g.   docs/tools/painted_slices_run.sh colin27_aal galore
#        docs/tools/painted_slices_run.sh colin27_aal decoder --method decoder
set -euo pipefail
task=$1; name=$2; shift 2; root=$(cd "$(dirname "$0")/../.." && pwd); out=${OUT:-/tmp/medsaga-painted}/$task; mkdir -p $out; cd "$root"
PY="${PY:-.venv/bin/python}"; export PYTHONPATH="$root"
if [ ! -f $out/plan.json ]; then
$PY - "$task" "$out" "${SHOTS:-5}" <<'PYEOF'
import sys, json, numpy as np, SimpleITK as sitk
from MedSAGaLib.samples.tasks import load_sample_task
from MedSAGaLib.segio import write_seg_nrrd
from MedSAGaLib.slices import annotated_slices, evenly_spread
from MedSAGaLib.volume import slice_axis
task, out, shots = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = load_sample_task(task)
sitk.WriteImage(t.image, f"{out}/image.nii.gz")
labels = sitk.GetArrayFromImage(t.labels).astype(np.uint8)
axis = slice_axis(t.image, t.axis)
ann = annotated_slices(labels, axis)
painted = evenly_spread(ann, shots)
write_seg_nrrd(f"{out}/reference.seg.nrrd", labels, t.image, t.class_names, t.class_colors)
sparse = np.zeros_like(labels)
sl = [slice(None)] * 3
for i in painted:
    sl[axis] = i; sparse[tuple(sl)] = labels[tuple(sl)]
write_seg_nrrd(f"{out}/painted.seg.nrrd", sparse, t.image, t.class_names, t.class_colors)
rest = [i for i in ann if i not in painted]
json.dump({"axis": t.axis, "painted": painted, "test": rest}, open(f"{out}/plan.json", "w"))
PYEOF
fi
axis=$($PY -c "import json;print(json.load(open('$out/plan.json'))['axis'])")
test=$($PY -c "import json;print(','.join(map(str,json.load(open('$out/plan.json'))['test'])))")
/usr/bin/time -f "finetune wall %e s" $PY -m MedSAGaLib.cli finetune --image $out/image.nii.gz --labels $out/painted.seg.nrrd --axis $axis -o $out/$name.medsaga --feature-cache none "$@" 2>&1 | grep -v "^step\|^\s*$" | tail -25
$PY -m MedSAGaLib.cli evaluate --model $out/$name.medsaga --image $out/image.nii.gz --labels $out/reference.seg.nrrd --axis $axis --slices $test --backend torch --json > $out/$name.eval.json
$PY -c "import json;r=json.load(open('$out/$name.eval.json'));print('EVAL', '$task', '$name', round(r['mean_dice'],3), {c['name']: round(c['dice'],3) for c in r['classes']})"
# as the Slicer panel segments: the painted slices kept and leaned on between them (--painted)
$PY -m MedSAGaLib.cli evaluate --model $out/$name.medsaga --image $out/image.nii.gz --labels $out/reference.seg.nrrd --axis $axis --slices $test --backend torch --painted $out/painted.seg.nrrd --json > $out/$name.painted.eval.json
$PY -c "import json;r=json.load(open('$out/$name.painted.eval.json'));print('EVAL', '$task', '$name+painted', round(r['mean_dice'],3), {c['name']: round(c['dice'],3) for c in r['classes']}, 'removed', r['inference'].get('removed'))"
# the baselines on the same slices: nearest painted slice, U-Net from scratch (same budget), oracle boxes
[ -f $out/baselines.json ] || $PY docs/tools/painted_baselines.py $out ${BASELINE_FLAGS:-}
$PY -c "import json;r=json.load(open('$out/baselines.json'))['results'];[print('BASELINE', k, round(v['dice'],3)) for k, v in r.items()]"
