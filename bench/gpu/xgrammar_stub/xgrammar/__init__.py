"""Raise-on-use stand-in for xgrammar in the forkkv GPU wheelhouse (built by bench/gpu/make_room.sh).

SGLang 0.5.17 imports xgrammar names at module level (function-call detectors, the OpenAI protocol models) but
uses them only for grammar-constrained decoding and structural-tag tool calls. Here every name imports
(`from xgrammar import X`, `from xgrammar.structural_tag import Y`), and any real use raises XGrammarStubbed.
Serve with `--grammar-backend none`. Not the real xgrammar.
"""
from . import structural_tag  # before __getattr__ exists, so the submodule is imported, not a placeholder
from ._placeholder import XGrammarStubbed, install

__version__ = "0.2.1+forkkvstub"
install(globals())
