"""Stage CLIs: ``python -m kn.stages.<stage> [--in name=path] [--out name=path] key=value ...``.

Each stage reads files, calls the science in ``kn.*`` and writes files atomically.
"""
