"""Benchmarks: training memory per method, Dice versus shots, and speed (``medsaga bench ...``).

Every memory figure comes from a fresh Python process (``python -m MedSAGaLib.bench.memory --worker``)
running a few steps of the real trainer (:func:`MedSAGaLib.training.finetune`), so one measurement
cannot inherit another's allocator caches or lazily loaded libraries.
"""

JSON_MARK = "MEDSAGA_BENCH_JSON "
