#!/usr/bin/env python3
"""The port expander, with the original's module and command-line interface.

As a module: ``get_ports('54543-54546')`` -> ``[54543, 54544, 54545, 54546]``
(also ``'54543'`` and ``'54543,54545'``). As a script:
``port_expander.py HOST PORTS`` prints ``HOST:PORT`` per line. A thin wrapper
around :mod:`taskit.ports` (``taskit ports HOST PORTS`` does the same).
"""

from __future__ import annotations

import os
import sys

try:
    from taskit.ports import expand, get_ports
except ImportError:  # run from a checkout: the package sits next to this folder
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from taskit.ports import expand, get_ports

__all__ = ["get_ports", "expand"]

if __name__ == "__main__":
    from taskit.cli import main

    if len(sys.argv) != 3:
        print("usage: port_expander.py HOST PORTS", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["ports", *sys.argv[1:]]))
