"""The registry of quantizer families: the name a :class:`~torchapprox.QuantSpec` gives in
``quantizer=`` and the :class:`ApproxQuantizer` subclass that computes it."""

from __future__ import annotations

from .approx_quantizer import ApproxQuantizer

_FAMILIES: dict[str, type[ApproxQuantizer]] = {}


def register_quantizer(name: str, cls: type[ApproxQuantizer] | None = None):
    """Register a quantizer family under ``name`` (``QuantSpec(quantizer=name)``).

    ``cls`` subclasses :class:`~torchapprox.ApproxQuantizer` and implements
    ``compute_qparams`` (the whole contract: ``torchapprox.quantizers.approx_quantizer``).
    Registering a name again replaces the family (specs built earlier keep their name).
    Usable as a decorator: ``@register_quantizer("fixed_clip")``.

    Raises:
        TypeError: ``name`` is not a non-empty string, or ``cls`` is not an
            ApproxQuantizer subclass.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"`name` must be an identifier string such as 'minmax', got {name!r}")

    def register(family: type[ApproxQuantizer]) -> type[ApproxQuantizer]:
        if not (isinstance(family, type) and issubclass(family, ApproxQuantizer)):
            raise TypeError(f"`cls` must be a subclass of torchapprox.ApproxQuantizer, got {family!r}")
        family.family = name
        _FAMILIES[name] = family
        return family

    return register(cls) if cls is not None else register


def quantizer_class(name: str) -> type[ApproxQuantizer]:
    """The family registered as ``name``.

    Raises:
        ValueError: no family of that name (the message lists the registered ones).
    """
    family = _FAMILIES.get(name)
    if family is None:
        raise ValueError(f"QuantSpec `quantizer` must name a registered quantizer family "
                         f"({', '.join(map(repr, _FAMILIES))}; torchapprox.register_quantizer adds one), got {name!r}")
    return family


def registered_quantizers() -> list[str]:
    """Names of the registered families, in registration order."""
    return list(_FAMILIES)


def build_quantizer(spec, *, role: str | None = None, channel_axis: int | None = None,
                    channel_groups: int = 1, tensor=None) -> ApproxQuantizer:
    """The quantizer of ``spec``'s family for one tensor (see ``ApproxQuantizer.from_spec``)."""
    return quantizer_class(spec.quantizer).from_spec(spec, role=role, channel_axis=channel_axis,
                                                      channel_groups=channel_groups, tensor=tensor)
