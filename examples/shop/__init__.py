"""The example shop, under its short name.

The shop ships inside the package as ``stickyproxy.demo.shop`` (``stickyproxy demo`` runs
it from any directory); this package makes the same modules importable as ``shop`` from
``examples/``, so ``cd examples && python -m shop ...`` and ``import shop.app`` keep
working. Its modules are read from the installed package: edit them there.
"""

from stickyproxy.demo import shop as _shop

__path__ = list(_shop.__path__)
