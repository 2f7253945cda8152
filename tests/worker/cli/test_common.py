"""worker.cli.common: the label-config helpers the ``lsb`` commands share."""

from __future__ import annotations

import argparse

import pytest

from backend.core.label_config import ProjectConfig
from worker.cli.common import CLIError, add_config_args, config_from_labels, load_config


def test_config_from_labels_errors_are_cli_errors():
    assert ProjectConfig.parse(config_from_labels("car,person", "brush")).controls[0].tag == "BrushLabels"
    with pytest.raises(CLIError, match="--labels is empty"):
        config_from_labels("")
    with pytest.raises(CLIError, match="--tag must be one of"):
        config_from_labels("car", "cuboid")


def test_tag_choices_come_from_the_label_config():
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--labels", "car=a red car", "--tag", "polygon"])
    config, xml = load_config(args)
    assert [c.tag for c in config.controls] == ["PolygonLabels"] and config.labels[0].hint == "a red car"
    assert ProjectConfig.parse(xml) == config
    with pytest.raises(SystemExit):
        parser.parse_args(["--labels", "car", "--tag", "cuboid"])
    with pytest.raises(CLIError, match="give the labels"):
        load_config(parser.parse_args([]))
