"""fastgraph's version, kept in core so that every room can name it in its reports."""

__version__ = "0.1.0"  # also in pyproject.toml
