"""Performance models and measurements: the roofline (FLOPs and bytes per node against a
GPU's peak rates and bandwidth), its plot, and the per-node profile of measured steps.

Owns: ``roofline`` (hardware profiles, FLOP counting with torch.utils.flop_counter,
per-node costs, arithmetic intensity), ``nodes`` (roofline points per node), ``plot``
(matplotlib roofline), ``record`` (the per-node roofline record, the ``Roofline``
report and :func:`roofline`), ``profile`` (torch.profiler events attributed to graph
nodes, the ``ProfileReport`` and :func:`profile`), ``communication`` (the data-parallel
gradient all-reduce over a profile's interconnect, and scaling efficiency).

May import: ``core``, ``passes``, ``kernels``, ``data``, ``training`` (a profile times
a recipe's training steps), ``profiles``.
"""
