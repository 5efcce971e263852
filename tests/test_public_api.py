"""The package's lazily exported pipeline classes are the classes their modules define."""

from __future__ import annotations

import importlib

import pytest

import jdiff


@pytest.mark.parametrize("name, module", [("StableDiffusion", "pipelines"), ("StableDiffusionXL", "sdxl"),
                                          ("StableDiffusion3", "sd3_pipeline"), ("DiTPipeline", "dit_pipeline")])
def test_pipeline_classes_are_exported(name, module):
  assert name in jdiff.__all__
  assert getattr(jdiff, name) is getattr(importlib.import_module(f"jdiff.{module}"), name)


def test_unknown_attribute_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'Nope'"):
    jdiff.Nope  # noqa: B018
