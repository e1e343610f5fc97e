"""`align.registry.Registry`: the one registry helper behind objectives, divergences, references, rollout backends
and aggregations."""

import pytest

from align.errors import ConfigError
from align.registry import Registry


def test_register_lookup_aliases_and_errors():
    things = Registry("thing", normalise=lambda name: name.lower())

    @things.register("alpha", "a")
    class Alpha:
        pass

    assert things.lookup("ALPHA") is Alpha and things.lookup("a") is Alpha
    assert things.register("alpha")(Alpha) is Alpha  # the same entry again: idempotent
    with pytest.raises(ValueError, match=r"thing name 'a' is already registered to 'Alpha'"):
        things.register("a")(type("Other", (), {}))
    with pytest.raises(ConfigError) as info:
        things.lookup("beta", "section.name", also_known=["auto"])
    assert str(info.value) == "section.name: unknown thing 'beta'; known: auto, a, alpha"
    with pytest.raises(ConfigError, match=r"^unknown thing 3; known: a, alpha$"):
        things.lookup(3)


def test_every_registry_is_one():
    from align.divergences import DIVERGENCES
    from align.objectives import OBJECTIVES
    from align.references import REFERENCES
    from align.rollout import ROLLOUT_BACKENDS
    from reward_models.aggregate import AGGREGATIONS

    for registry in (DIVERGENCES, OBJECTIVES, REFERENCES, ROLLOUT_BACKENDS, AGGREGATIONS):
        assert isinstance(registry, Registry) and len(registry) >= 2
