"""Stand-in for xgrammar.structural_tag: every name imports, none works (see xgrammar/__init__.py)."""
from ._placeholder import install

install(globals())
