"""The ``fastgraph`` command line: one module per subcommand (options, run, printed
report), over the rooms below and the public API.

Owns: ``main`` (the parser and the one-line error policy: exit 2 for bad input, 130/143
for an interrupt), ``common`` (argparse types), ``optimize``, ``train``, ``export``,
``profile``, ``roofline``, ``advise``, ``data``.

May import: every room and the public API. Imported by nothing but ``fastgraph.__main__``.
"""
