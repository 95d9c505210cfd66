"""The graph compiler's base: loading a model file, tracing it, the pass manager and its
float64 verification, the modules passes insert, timing, NVTX ranges, console output,
output files and errors.

Owns: ``loading`` (model files and entry points), ``tracing`` (symbolic_trace in the
mode of use, refusals naming the line), ``pass_manager`` (runs a pass list, checks each
pass, returns a report), ``verification`` (the float64 check against the user's eager
module), ``modules`` (GhostBatchNorm, PatchWhitening, BlurPool2d, StochasticDepth, TTA views),
``timing`` (CUDA events or perf_counter, counted phases), ``nvtx``, ``console`` (tables
that fit the terminal, progress bars), ``outputs`` (checked output paths, the JSON
header), ``figures`` (image paths and files), ``devices``, ``errors``, ``version``.

May import: ``fastgraph.passes`` and ``fastgraph.kernels`` (the pass manager runs the
registered passes; passes and kernels use core's modules and errors: the three are one
level), nothing else of fastgraph. A cost model (the roofline's FLOPs and bytes) comes
in as an argument of ``run_passes``.
"""
