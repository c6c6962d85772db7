"""The model families, each declared once with `register_model` where it is defined.

A declaration says what a model name means: its family (``mlp``, ``resnet`` or ``imagenet
resnet``: which settings a run of it reads, and which of a rule's own preset settings apply),
a line for help texts, the preset recipes it brings (a recipe name, the ``<model>`` part of a
preset ``<rule>_<model>``, with its title in ``docs/presets.md`` and the settings it fixes) and
the function that builds its circuit (it takes the configuration, the rule, the image shape and
the number of classes, and imports PyTorch only when it is called).

``MODELS`` maps every declared name to its `Model`; ``MODEL_NAMES`` and ``RECIPE_NAMES`` are
views of the model and recipe names, read afresh on every use. Nothing here imports PyTorch, so
configurations, help texts and option checks can list the models cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import attrs

from neurosim.common.names import LiveNames

__all__ = ["FAMILIES", "MODELS", "MODEL_NAMES", "RECIPE_NAMES", "Model", "Recipe", "model_family",
           "model_names", "recipe_names", "recipes", "register_model"]

# A family: the keys of a rule's ``presets`` that apply to every model of it, in the order they
# apply (then the recipe's own name). A rule's "resnet" settings apply to every ResNet, CIFAR and
# ImageNet alike (they are about the architecture); its "imagenet" ones to the ImageNet ResNets.
FAMILIES = {"mlp": (), "resnet": ("resnet",), "imagenet resnet": ("resnet", "imagenet")}


@attrs.frozen
class Recipe:
    """A preset recipe: its title in ``docs/presets.md`` and the settings it fixes (command-line
    fields, away from `RunConfig`'s defaults)."""

    title: str
    settings: dict = attrs.field(factory=dict, converter=dict)


@attrs.frozen
class Model:
    """One declared model (see `register_model`)."""

    name: str
    about: str
    family: str
    build: Callable
    recipes: dict = attrs.field(factory=dict, converter=dict)

    @property
    def is_mlp(self) -> bool:
        """Whether its circuit is a multilayer perceptron (it reads --hidden, --activation, --init)."""
        return self.family == "mlp"


class ModelRegistry(MutableMapping):
    """Declared models by name, in declaration order. ``del MODELS[name]`` forgets one."""

    def __init__(self):
        self._models: dict[str, Model] = {}

    def __getitem__(self, name):
        return self._models[name]

    def __contains__(self, name):
        return isinstance(name, str) and name in self._models

    def __iter__(self):
        return iter(self._models)

    def __len__(self):
        return len(self._models)

    def __setitem__(self, name, model):
        if not isinstance(model, Model) or model.name != name:
            raise TypeError(f"MODELS[{name!r}] must be a Model named {name!r}; declare models with @register_model")
        self._models[name] = model

    def __delitem__(self, name):
        del self._models[name]

    def __repr__(self):
        return f"ModelRegistry({', '.join(self._models)})"


MODELS = ModelRegistry()


def model_names() -> tuple[str, ...]:
    """The declared model names, in declaration order."""
    return tuple(MODELS)


def recipes() -> dict[str, tuple[Model, Recipe]]:
    """Every declared recipe by name, in declaration order, with the model that brings it."""
    return {name: (model, recipe) for model in MODELS.values() for name, recipe in model.recipes.items()}


def recipe_names() -> tuple[str, ...]:
    """The declared recipe names (the ``<model>`` of a preset ``<rule>_<model>``), in declaration order."""
    return tuple(recipes())


def model_family(name: str) -> str | None:
    """The family of a declared model (``mlp``, ``resnet``, ``imagenet resnet``); None for another name."""
    model = MODELS.get(name)
    return None if model is None else model.family


MODEL_NAMES = LiveNames(model_names)
RECIPE_NAMES = LiveNames(recipe_names)

_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register_model(name: str, *, family: str, about: str, recipes: Mapping[str, Recipe] | None = None):
    """Function decorator that makes ``name`` a model everywhere a configuration is read
    (``--model`` in a saved configuration, presets, help texts, ``docs/presets.md``,
    `build_circuit`). A model file declares itself once::

        @register_model("mini", family="mlp", about="a two-layer MLP of 16 hidden neurons",
                        recipes={"mini": Recipe("digits, one hidden layer", dict(data="digits", hidden=(16,)))})
        def mini(cfg, rule, image_shape, num_classes):
            from neurosim.models.mlp import build_mlp
            return build_mlp(rule, image_shape, cfg.hidden, num_classes, cfg.activation, cfg.init, cfg.seed)

    ``family`` is one of ``FAMILIES``: which settings a run of it reads (an MLP's --hidden, a
    ResNet's --width) and which of a rule's own preset settings apply. ``about`` is its line in
    help texts. ``recipes`` maps each preset recipe it brings to a `Recipe`: every rule then has
    a preset ``<rule>_<recipe>`` with the recipe's settings, the model ``name``, and the settings
    the rule declares for the family and for the recipe. The decorated function builds the
    circuit from the configuration, the rule, the image shape (C, H, W) and the number of
    classes; it is called only when a run builds its circuit, so it imports PyTorch inside.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a model name is a short lower-case word (letters, digits, '_'), not {name!r}")
    if family not in FAMILIES:
        raise ValueError(f"model {name!r}: family is one of {', '.join(FAMILIES)}, not {family!r}")
    if not isinstance(about, str) or not about.strip() or "\n" in about:
        raise ValueError(f"model {name!r}: about is one line saying what the model is")
    recipes = dict(recipes or {})
    for recipe, declared in recipes.items():
        if not isinstance(recipe, str) or not _NAME.fullmatch(recipe) or not isinstance(declared, Recipe):
            raise ValueError(f"model {name!r}: recipes map a lower-case name to a Recipe, not {recipe!r}")
        if "model" in declared.settings or "rule" in declared.settings:
            raise ValueError(f"model {name!r}: recipe {recipe!r} cannot set the model or rule (the preset's "
                             "name fixes them)")
        taken = next((m for m in MODELS.values() if m.name != name and recipe in m.recipes), None)
        if taken is not None:
            raise ValueError(f"model {name!r}: recipe name {recipe!r} is taken by the model {taken.name!r}")

    def declare(fn: Callable[..., Any]) -> Callable[..., Any]:
        known = MODELS._models.get(name)
        if known is not None and (known.build.__module__, known.build.__qualname__) != (fn.__module__,
                                                                                         fn.__qualname__):
            raise ValueError(f"model name {name!r} is taken by {known.build.__module__}.{known.build.__qualname__}")
        MODELS[name] = Model(name=name, about=about.strip(), family=family, build=fn, recipes=recipes)
        return fn

    return declare
