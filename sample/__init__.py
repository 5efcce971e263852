"""Sampling programs: ``python -m sample.txt2img`` (and more), thin shells over :mod:`jdiff.pipelines`."""
