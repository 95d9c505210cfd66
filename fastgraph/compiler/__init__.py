"""The main job: trace a model, rewrite it with passes, verify each rewrite, hold the
result against the roofline and time it; and the optimize report.

Owns: ``optimize`` (inputs, the measured before/after steps, readable code), ``report``
(the pass and roofline tables).

May import: ``core``, ``passes``, ``kernels``, ``data``, ``training``, ``perf``,
``profiles``.
"""
