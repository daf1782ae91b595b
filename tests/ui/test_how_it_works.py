"""The How it works tab's sampler families: a paragraph for each, naming its samplers as the
registry lists them, each with the equation a step computes."""

from __future__ import annotations

import re

from sd_parts.schedulers import SAMPLERS
from sd_parts.schedulers.registry import FAMILIES
from ui.tabs import how_it_works


def test_each_family_has_a_paragraph_with_its_samplers_and_an_equation():
    text = how_it_works.text()
    assert not re.search(r"\{(" + "|".join(FAMILIES) + r")\}", text)  # every placeholder filled
    for family in FAMILIES:
        paragraph = re.search(rf"^\*{re.escape(family.capitalize())}\* \((.*?)\): (.*?)(?:\n\n|\Z)",
                              text, re.MULTILINE | re.DOTALL)
        assert paragraph, family
        named = paragraph[1].split(", ")
        assert named == [info.label for info in SAMPLERS.values() if info.family == family]
        assert re.search(r"`[^`]*=[^`]*`", paragraph[2]), f"{family}: no equation"
