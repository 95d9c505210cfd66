"""The main job: trace a model, rewrite it with passes, verify each rewrite, hold the
result against the roofline and time it; and the optimize report.

Owns: ``optimize`` (:func:`optimize`: inputs, the measured before/after steps, readable
code), ``report`` (``OptimizeReport``, the pass and roofline tables), ``waterfall`` (the
predicted time per pass beside the measured steps), ``advise`` (which tricks apply to a
model, where, and their predicted gain), ``backend`` (``torch.compile(model,
backend="fastgraph")``: the exact passes on Dynamo's graph, checked, then Inductor).

May import: ``core``, ``passes``, ``kernels``, ``data``, ``training``, ``perf``,
``profiles``.
"""
