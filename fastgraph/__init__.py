"""fastgraph: compile a ResNet as a torch.fx graph and make it train and infer fast.

The one object that flows through fastgraph is a ``torch.fx.GraphModule``: passes
(``fastgraph.passes``), training, export, profiling and the roofline all take one.
"""

from fastgraph.core.version import __version__

__all__ = ["__version__"]
