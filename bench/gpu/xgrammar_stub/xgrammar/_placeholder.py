"""Placeholders of the xgrammar stand-in: importable, usable as annotations, base classes and pydantic field
types, but any real use raises XGrammarStubbed (see __init__.py)."""

MESSAGE = (
    "xgrammar is stubbed in the forkkv GPU wheelhouse (bench/gpu/make_room.sh replaced the real wheel to fit the "
    "64 MiB carry limit), so {what} is not available: start the server with --grammar-backend none and send no "
    "structured-output (json_schema/regex/ebnf/structural_tag) or constrained tool-call requests"
)


class XGrammarStubbed(RuntimeError):
    """Raised on any real use of the xgrammar stand-in."""


class XGrammarStubbedAttribute(XGrammarStubbed, AttributeError):
    """Also an AttributeError, so hasattr() and getattr(obj, name, default) see the name as absent."""


class _StubMeta(type):
    def __call__(cls, *args, **kwargs):  # calling a stubbed function or instantiating a stubbed class
        raise XGrammarStubbed(MESSAGE.format(what=f"{cls.__module__}.{cls.__qualname__}(...)"))

    def __getattr__(cls, name):  # only reached for names the class does not have
        if name.startswith("_"):  # typing/pydantic/inspect probe private and dunder names: plain "absent"
            raise AttributeError(name)
        raise XGrammarStubbedAttribute(MESSAGE.format(what=f"{cls.__module__}.{cls.__qualname__}.{name}"))

    def __repr__(cls):
        return f"<xgrammar stub {cls.__module__}.{cls.__qualname__}>"


class Placeholder(metaclass=_StubMeta):
    """Base of every placeholder. As a pydantic field type (sglang's protocol.py puts xgrammar.StructuralTag in a
    Union of response formats) it builds a schema, and validating any value against it fails with the stub message,
    so the other members of the Union are used as usual."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        def refuse(value):
            raise ValueError(MESSAGE.format(what=f"validating a {cls.__module__}.{cls.__qualname__}"))

        return core_schema.no_info_plain_validator_function(refuse)

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler):
        return {"description": f"{cls.__module__}.{cls.__qualname__} (xgrammar stubbed: not accepted)"}


def install(namespace):
    """Give a module (by its globals()) a __getattr__ that makes every public name a cached placeholder class."""
    modname = namespace["__name__"]

    def __getattr__(name):
        if name.startswith("__"):  # __path__, __all__, __wrapped__...: absent, as import machinery expects
            raise AttributeError(f"module {modname!r} has no attribute {name!r}")
        cls = namespace[name] = _StubMeta(name, (Placeholder,), {"__module__": modname, "__qualname__": name})
        return cls

    namespace["__getattr__"] = __getattr__
