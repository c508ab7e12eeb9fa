"""Forms built with magicgui from the spec dataclasses of :mod:`napari_wpp.core.config`.

One field, one magicgui widget: ``bool`` a ``CheckBox``, ``int`` a ``SpinBox``, ``float`` a
``FloatSpinBox``, ``str`` a ``LineEdit`` (a ``ComboBox`` when choices are given). The initial
value is the field's default, the range its ``bounds`` and the tooltip its help line, so a
default changed in the spec changes the form with no other edit. An optional count
(``int | None``, e.g. ``tile``) shows ``None`` as 0.

Example
-------
>>> form = spec_form(PredictSpec, ["batch_size", "tile"], tile={"label": "Tiles (0: off)"})
>>> read_spec(form, PredictSpec()).batch_size == form.batch_size.value
True
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, LineEdit, SpinBox
from magicgui.widgets.bases import ValueWidget

from napari_wpp.core.config import bounds, default_of, help_text
from napari_wpp.widgets._layout import shrinkable

__all__ = [
    "device_choices",
    "field_widget",
    "form_value",
    "read_spec",
    "spec_default",
    "spec_form",
    "spec_from_values",
    "spec_value",
]

#: Range of spin boxes whose field has no bound on that side.
_OPEN_INT = 2**31 - 1
_OPEN_FLOAT = 1e12


def _field_type(spec: type, name: str) -> tuple[type, bool]:
    """The field's value type and whether it may be ``None`` (``int | None``: int, True)."""
    hint = typing.get_type_hints(spec)[name]
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if args and len(args) < len(typing.get_args(hint)):
        return args[0], True
    return hint, False


def form_value(spec: type, name: str, value: Any) -> Any:
    """``value`` of the field ``name`` as a form shows it (``None`` of an optional count: 0)."""
    _kind, optional = _field_type(spec, name)
    return 0 if optional and value is None else value


def spec_value(spec: type, name: str, value: Any) -> Any:
    """A form's ``value`` as the spec field ``name`` takes it (0 of an optional count: None)."""
    kind, optional = _field_type(spec, name)
    if optional and not value:
        return None
    return kind(value) if kind in (int, float, bool, str) else value


def spec_default(spec: type, name: str) -> Callable[[], Any]:
    """A ``default_factory`` giving the spec's current default of ``name`` as a form value.

    Widget settings use it so that their defaults follow the spec when it changes.
    """
    return lambda: form_value(spec, name, default_of(spec, name))


def device_choices() -> list[tuple[str, str]]:
    """Choices of a device field: ``auto`` and the devices torch can use here."""
    from napari_wpp.core.devices import available_devices

    return [("auto", "auto"), *((name, name) for name in available_devices())]


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def field_widget(spec: type, name: str, **options: Any) -> ValueWidget:
    """The magicgui widget of the field ``name`` of ``spec``.

    Parameters
    ----------
    spec
        A spec dataclass (e.g. :class:`~napari_wpp.core.config.PredictSpec`).
    name
        Field name; also the widget's ``name`` (so :func:`read_spec` finds it).
    **options
        ``label``, ``tooltip``, ``min``, ``max``, ``step``, ``choices`` (makes a
        ``ComboBox``), ``text`` (of a ``CheckBox``) and ``special_text`` (what a spin box
        shows at its minimum, e.g. ``"device default"`` for 0).

    Returns
    -------
    ValueWidget
        Initial value the field's default, range its bounds, tooltip its help line.
    """
    kind, optional = _field_type(spec, name)
    low, high = bounds(spec, name)
    special_text = options.pop("special_text", None)
    value = form_value(spec, name, default_of(spec, name))
    common: dict[str, Any] = {
        "name": name,
        "label": options.pop("label", _label(name)),
        "tooltip": options.pop("tooltip", help_text(spec, name)),
    }
    widget: ValueWidget
    if "choices" in options:
        widget = shrinkable(
            ComboBox(value=value, choices=options.pop("choices"), **common, **options)
        )
    elif kind is bool:
        text = options.pop("text", common.pop("label"))
        widget = CheckBox(value=bool(value), text=text, **common)
    elif kind is int:
        low = 0 if optional else low
        widget = SpinBox(
            value=int(value),
            min=options.pop("min", -_OPEN_INT if low is None else int(low)),
            max=options.pop("max", _OPEN_INT if high is None else int(high)),
            **common,
            **options,
        )
    elif kind is float:
        widget = FloatSpinBox(
            value=float(value),
            min=options.pop("min", -_OPEN_FLOAT if low is None else float(low)),
            max=options.pop("max", _OPEN_FLOAT if high is None else float(high)),
            step=options.pop("step", 0.1),
            **common,
            **options,
        )
    else:
        widget = LineEdit(value=str(value), **common, **options)
    if special_text is not None and kind in (int, float):
        widget.native.setSpecialValueText(special_text)
    return widget


def spec_form(
    spec: type, names: Sequence[str] | None = None, **options: Mapping[str, Any]
) -> Container:
    """A magicgui ``Container`` with one :func:`field_widget` per field (labels on the left).

    Parameters
    ----------
    spec
        A spec dataclass.
    names
        Fields shown, in this order (default: all of them).
    **options
        Per field, the options of :func:`field_widget` (e.g. ``tile={"label": "Tiles (px)"}``).
    """
    names = [item.name for item in dataclasses.fields(spec)] if names is None else list(names)
    unknown = set(options) - set(names)
    if unknown:
        raise KeyError(f"options for fields not in the form: {sorted(unknown)}")
    widgets = [field_widget(spec, name, **dict(options.get(name, {}))) for name in names]
    form = Container(widgets=widgets, labels=True)
    form.margins = (0, 0, 0, 0)
    return form


def spec_from_values(spec: type, values: Mapping[str, Any], base: Any = None) -> Any:
    """A ``spec`` instance from form ``values`` (``base`` or the defaults for the others)."""
    converted = {name: spec_value(spec, name, value) for name, value in values.items()}
    return dataclasses.replace(base if base is not None else spec(), **converted)


def read_spec(form: Container, base: Any) -> Any:
    """``base`` (a spec instance) with the values of the form's widgets named after fields."""
    names = {item.name for item in dataclasses.fields(base)}
    values = {widget.name: widget.value for widget in form if widget.name in names}
    return spec_from_values(type(base), values, base)
