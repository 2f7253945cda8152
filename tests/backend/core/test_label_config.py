"""backend.core.label_config: what a Label Studio label config asks of this backend."""

from __future__ import annotations

import dataclasses
import json

import pytest

from backend.core import label_config
from backend.core.label_config import (
    TAG_SHORT_NAMES,
    ControlSpec,
    LabelSpec,
    ProjectConfig,
    UnsupportedConfig,
    config_from_labels,
)
from tests.paths import RECORDED_REQUESTS, ROOT

FIXTURE = RECORDED_REQUESTS


@pytest.fixture(scope="module")
def recorded_schema() -> str:
    """The label config a real Label Studio 1.23.2 sent with /setup (request index 1)."""
    request = json.loads(FIXTURE.read_text())["requests"][1]
    assert request["path"] == "/setup"
    return request["body"]["schema"]


def view(*tags: str, image: str = '<Image name="image" value="$image"/>') -> str:
    return "<View>" + image + "".join(tags) + "</View>"


MULTI = view(
    '<RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>',
    '<BrushLabels name="brush" toName="image"><Label value="Person"/><Label value="Road"/></BrushLabels>',
    '<PolygonLabels name="poly" toName="image"><Label value="Tree"/><Label value="Car"/></PolygonLabels>',
)


# --- the config a real Label Studio sent ---------------------------------------------------------

class TestRecordedConfig:
    def test_one_rectangle_control(self, recorded_schema):
        config = ProjectConfig.parse(recorded_schema)
        assert len(config.controls) == 1  # KeyPointLabels is not ours
        control = config.controls[0]
        assert isinstance(control, ControlSpec)
        assert (control.name, control.tag, control.to_name) == ("label", "RectangleLabels", "image")
        assert control.label_values == ("Car", "Person")
        assert control.score_threshold is None
        assert control.model_path == ""

    def test_predicted_values(self, recorded_schema):
        config = ProjectConfig.parse(recorded_schema)
        car, person = config.controls[0].labels
        assert car == LabelSpec("Car", ("car", "truck"), "")
        assert person == LabelSpec("Person", (), "")
        assert config.match_label("truck") == "Car"
        assert config.match_label("car") == "Car"
        assert config.match_label("Person") == "Person"
        assert config.match_label("kp") is None

    def test_image_and_flags(self, recorded_schema):
        config = ProjectConfig.parse(recorded_schema)
        assert config.image_name == "image"
        assert config.image_key == "image"
        assert config.prompt_control == ""
        assert config.wants_masks is False
        assert config.class_names == ["Car", "Person"]
        assert config.score_threshold(0.25) == 0.25


# --- attributes ----------------------------------------------------------------------------------

class TestAttributes:
    def test_hints(self):
        config = ProjectConfig.parse(view(
            '<RectangleLabels name="l" toName="image">'
            '<Label value="NoHelmet" hint="construction worker not wearing a helmet"/>'
            '<Label value="Helmet" hint="  hard hat  "/><Label value="Other"/></RectangleLabels>'
        ))
        no_helmet, helmet, other = config.labels
        assert no_helmet.hint == "construction worker not wearing a helmet"
        assert no_helmet.description == "construction worker not wearing a helmet"
        assert helmet.hint == "hard hat"  # stripped
        assert other.hint == "" and other.description == "Other"
        assert config.match_label("construction worker not wearing a helmet") == "NoHelmet"
        assert config.match_label("Construction Worker NOT wearing a helmet") == "NoHelmet"
        assert config.match_label("hard hats") == "Helmet"

    def test_model_score_threshold(self):
        config = ProjectConfig.parse(view(
            '<RectangleLabels name="a" toName="image" model_score_threshold="0.4"><Label value="A"/></RectangleLabels>',
            '<PolygonLabels name="b" toName="image" model_score_threshold="0.15"><Label value="B"/></PolygonLabels>',
            '<BrushLabels name="c" toName="image"><Label value="C"/></BrushLabels>',
        ))
        assert [c.score_threshold for c in config.controls] == [0.4, 0.15, None]
        assert config.score_threshold(0.25) == 0.15

    def test_empty_threshold_means_none(self):
        config = ProjectConfig.parse(view(
            '<RectangleLabels name="a" toName="image" model_score_threshold=""><Label value="A"/></RectangleLabels>'
        ))
        assert config.controls[0].score_threshold is None
        assert config.score_threshold(0.3) == 0.3

    @pytest.mark.parametrize("flag", ["true", "True", "TRUE", "1", "yes"])
    def test_model_skip(self, flag):
        config = ProjectConfig.parse(view(
            f'<RectangleLabels name="skipped" toName="image" model_skip="{flag}"><Label value="A"/></RectangleLabels>',
            '<RectangleLabels name="kept" toName="image"><Label value="B"/></RectangleLabels>',
        ))
        assert [c.name for c in config.controls] == ["kept"]
        assert config.class_names == ["B"]
        assert config.match_label("A") is None

    def test_model_skip_false_keeps_the_control(self):
        config = ProjectConfig.parse(view(
            '<RectangleLabels name="a" toName="image" model_skip="false"><Label value="A"/></RectangleLabels>'
        ))
        assert [c.name for c in config.controls] == ["a"]

    def test_all_controls_skipped_is_unsupported(self):
        with pytest.raises(UnsupportedConfig, match="RectangleLabels"):
            ProjectConfig.parse(view(
                '<RectangleLabels name="a" toName="image" model_skip="true"><Label value="A"/></RectangleLabels>'
            ))

    def test_model_path(self):
        config = ProjectConfig.parse(view(
            '<RectangleLabels name="a" toName="image" model_path="models/custom.pt"><Label value="A"/></RectangleLabels>'
        ))
        assert config.controls[0].model_path == "models/custom.pt"

    def test_image_key_strips_dollar(self):
        config = ProjectConfig.parse(view(
            '<RectangleLabels name="a" toName="img"><Label value="A"/></RectangleLabels>',
            image='<Image name="img" value="$image_url"/>',
        ))
        assert (config.image_name, config.image_key) == ("img", "image_url")


# --- several controls ----------------------------------------------------------------------------

class TestSeveralControls:
    def test_rectangle_brush_polygon_on_one_image(self):
        config = ProjectConfig.parse(MULTI)
        assert [(c.name, c.tag) for c in config.controls] == [
            ("box", "RectangleLabels"), ("brush", "BrushLabels"), ("poly", "PolygonLabels"),
        ]
        assert all(c.to_name == "image" for c in config.controls)
        assert config.wants_masks is True

    @pytest.mark.parametrize("tag, wants", [("RectangleLabels", False), ("BrushLabels", True), ("PolygonLabels", True)])
    def test_wants_masks(self, tag, wants):
        config = ProjectConfig.parse(view(f'<{tag} name="c" toName="image"><Label value="A"/></{tag}>'))
        assert config.wants_masks is wants

    def test_class_names_in_config_order_without_duplicates(self):
        config = ProjectConfig.parse(MULTI)
        assert config.class_names == ["Car", "Person", "Road", "Tree"]
        assert [label.value for label in config.labels] == config.class_names

    def test_first_occurrence_of_a_label_wins(self):
        config = ProjectConfig.parse(view(
            '<RectangleLabels name="a" toName="image"><Label value="Car" predicted_values="auto"/></RectangleLabels>',
            '<PolygonLabels name="b" toName="image"><Label value="Car" predicted_values="truck"/></PolygonLabels>',
        ))
        assert config.labels == (LabelSpec("Car", ("auto",), ""),)
        assert config.match_label("auto") == "Car"

    def test_controls_on_a_second_image_are_dropped(self):
        config = ProjectConfig.parse(
            '<View><Image name="one" value="$a"/><Image name="two" value="$b"/>'
            '<RectangleLabels name="r" toName="one"><Label value="A"/></RectangleLabels>'
            '<BrushLabels name="m" toName="two"><Label value="B"/></BrushLabels></View>'
        )
        assert [c.name for c in config.controls] == ["r"]
        assert (config.image_name, config.image_key) == ("one", "a")
        assert config.wants_masks is False

    def test_unsupported_controls_are_ignored(self):
        config = ProjectConfig.parse(view(
            '<Choices name="ch" toName="image"><Choice value="x"/></Choices>',
            '<KeyPointLabels name="kp" toName="image"><Label value="K"/></KeyPointLabels>',
            '<RectangleLabels name="r" toName="image"><Label value="A"/></RectangleLabels>',
        ))
        assert [c.name for c in config.controls] == ["r"]

    def test_text_area_is_the_prompt_control(self):
        config = ProjectConfig.parse(view(
            '<RectangleLabels name="r" toName="image"><Label value="A"/></RectangleLabels>',
            '<TextArea name="prompt" toName="image"/>',
            '<TextArea name="second" toName="image"/>',
        ))
        assert config.prompt_control == "prompt"
        assert [c.name for c in config.controls] == ["r"]

    def test_text_area_on_another_object_is_not_a_prompt(self):
        config = ProjectConfig.parse(view(
            '<Text name="caption" value="$caption"/>',
            '<TextArea name="notes" toName="caption"/>',
            '<RectangleLabels name="r" toName="image"><Label value="A"/></RectangleLabels>',
        ))
        assert config.prompt_control == ""

    def test_parse_is_cached_and_immutable(self):
        first = ProjectConfig.parse(MULTI)
        assert ProjectConfig.parse(MULTI) is first
        with pytest.raises(dataclasses.FrozenInstanceError):
            first.image_name = "other"  # type: ignore[misc]
        assert hash(first) == hash(ProjectConfig.parse(MULTI))


# --- match_label ---------------------------------------------------------------------------------

class TestMatchLabel:
    @pytest.fixture(scope="class")
    def config(self) -> ProjectConfig:
        return ProjectConfig.parse(view(
            '<RectangleLabels name="r" toName="image">'
            '<Label value="Car" predicted_values="automobile, truck"/>'
            '<Label value="Person" hint="a pedestrian"/>'
            '<Label value="Traffic light"/>'
            '<Label value="bus"/>'
            '</RectangleLabels>'
        ))

    @pytest.mark.parametrize(
        "raw, expected",
        [
            ("Car", "Car"),                     # exact
            (" Car ", "Car"),                   # whitespace
            ("truck", "Car"),                   # predicted_values (spaces after commas stripped)
            ("automobile", "Car"),
            ("TRUCK", "Car"),                   # predicted_values, any case
            ("a pedestrian", "Person"),         # hint
            ("A Pedestrian", "Person"),
            ("car", "Car"),                     # case
            ("PERSON", "Person"),
            ("cars", "Car"),                    # plural
            ("Persons", "Person"),
            ("trucks", "Car"),                  # plural of a predicted value
            ("a pedestrians", "Person"),        # plural of a hint
            ("traffic_light", "Traffic light"),  # separators
            ("Traffic-Lights", "Traffic light"),
            ("bus", "bus"),                     # short words keep their final s
            ("Bus", "bus"),
            ("dog", None),                      # unknown
            ("", None),
            ("carpet", None),
        ],
    )
    def test_match(self, config, raw, expected):
        assert config.match_label(raw) == expected

    def test_exact_match_beats_loose(self):
        config = ProjectConfig.parse(view(
            '<RectangleLabels name="r" toName="image"><Label value="cars"/><Label value="car"/></RectangleLabels>'
        ))
        assert config.match_label("car") == "car"
        assert config.match_label("cars") == "cars"

    def test_non_string_input(self, config):
        assert config.match_label(None) is None  # type: ignore[arg-type]
        assert config.match_label(42) is None  # type: ignore[arg-type]


# --- unsupported configs -------------------------------------------------------------------------

class TestUnsupported:
    def test_is_a_value_error(self):
        assert issubclass(UnsupportedConfig, ValueError)

    @pytest.mark.parametrize("xml", ["", "   \n  "])
    def test_empty(self, xml):
        with pytest.raises(UnsupportedConfig, match="empty label config"):
            ProjectConfig.parse(xml)

    @pytest.mark.parametrize("xml", ["not xml at all", "<View>", "<View><Image name='i' value='$i'></View>"])
    def test_not_xml(self, xml):
        with pytest.raises(UnsupportedConfig, match="not valid XML"):
            ProjectConfig.parse(xml)

    def test_only_choices_on_text(self):
        xml = '<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>'
        with pytest.raises(UnsupportedConfig) as info:
            ProjectConfig.parse(xml)
        message = str(info.value)
        assert "RectangleLabels, BrushLabels or PolygonLabels" in message
        assert "<Image>" in message
        assert "Choices" in message           # says what the config has instead
        assert "no <Image> object" in message

    def test_rectangles_without_image(self):
        xml = '<View><RectangleLabels name="l" toName="img"><Label value="A"/></RectangleLabels></View>'
        with pytest.raises(UnsupportedConfig) as info:
            ProjectConfig.parse(xml)
        message = str(info.value)
        assert "has RectangleLabels" in message
        assert "no <Image> object" in message

    def test_rectangles_pointing_at_a_text(self):
        xml = view('<Text name="t" value="$t"/><RectangleLabels name="l" toName="t"><Label value="A"/></RectangleLabels>')
        with pytest.raises(UnsupportedConfig) as info:
            ProjectConfig.parse(xml)
        assert "no <Image> object" not in str(info.value)  # there is an Image, just not targeted

    def test_no_controls(self):
        with pytest.raises(UnsupportedConfig, match="no control tags"):
            ProjectConfig.parse(view())

    def test_only_a_text_area(self):
        with pytest.raises(UnsupportedConfig, match="TextArea"):
            ProjectConfig.parse(view('<TextArea name="p" toName="image"/>'))

    @pytest.mark.parametrize("value", ["high", "0,4", "abc"])
    def test_bad_model_score_threshold(self, value):
        xml = view(f'<RectangleLabels name="boxes" toName="image" model_score_threshold="{value}">'
                   '<Label value="A"/></RectangleLabels>')
        with pytest.raises(UnsupportedConfig) as info:
            ProjectConfig.parse(xml)
        message = str(info.value)
        assert "model_score_threshold" in message
        assert "boxes" in message
        assert repr(value) in message


# --- a config from a label list -----------------------------------------------------------------

def test_config_from_a_label_string_with_hints():
    xml = config_from_labels("helmet, person without helmet=construction worker without a helmet,helmet")
    config = ProjectConfig.parse(xml)
    assert [c.tag for c in config.controls] == ["RectangleLabels"]
    assert config.class_names == ["helmet", "person without helmet"]  # duplicates once
    assert config.labels[1].hint == "construction worker without a helmet"
    assert (config.image_name, config.image_key, config.controls[0].name) == ("image", "image", "label")


def test_config_from_exact_values_and_every_tag():
    odd = ["a, b", "x=y", 'quote"d', " "]
    for short, tag in TAG_SHORT_NAMES.items():
        config = ProjectConfig.parse(config_from_labels(odd, short))
        assert [c.tag for c in config.controls] == [tag]
        assert config.class_names == ["a, b", "x=y", 'quote"d']
    assert set(TAG_SHORT_NAMES) == {"rectangle", "polygon", "brush"}


def test_config_from_labels_rejects_empty_and_unknown_tag():
    with pytest.raises(UnsupportedConfig, match="empty"):
        config_from_labels(" , ")
    with pytest.raises(UnsupportedConfig, match="rectangle"):
        config_from_labels("car", "keypoint")


# --- the repository's own label config -----------------------------------------------------------

def test_repository_label_config_if_present():
    path = ROOT / "label_config.xml"
    if not path.is_file():
        pytest.skip("label_config.xml not written yet")
    config = ProjectConfig.parse(path.read_text())
    assert config.controls
    assert config.image_name and config.image_key
    assert all(c.to_name == config.image_name for c in config.controls)
    assert config.class_names
    assert len(config.class_names) == len(set(config.class_names))
    for name in config.class_names:
        assert config.match_label(name) == name
    for label in config.labels:
        for predicted in label.predicted_values:
            assert config.match_label(predicted) is not None


def test_parsed_configs_are_bounded_by_count_and_size():
    """Every /predict carries a config: 10,000 distinct ones keep at most CONFIG_CACHE_SIZE, none over the size cap."""
    cache = label_config._parse_cached
    cache.cache_clear()
    for i in range(10_000):
        parsed = ProjectConfig.parse(config_from_labels(["Car", f"label-{i}"]))
        assert parsed.class_names == ["Car", f"label-{i}"]
        assert cache.cache_info().currsize <= label_config.CONFIG_CACHE_SIZE
    before = cache.cache_info()
    huge = config_from_labels("Car=" + "a very long hint " * 5000)
    assert len(huge) > label_config.MAX_CACHED_CONFIG_CHARS
    assert ProjectConfig.parse(huge).labels[0].hint.startswith("a very long hint")
    assert ProjectConfig.parse(huge) == ProjectConfig.parse(huge)
    assert cache.cache_info() == before, "a config over MAX_CACHED_CONFIG_CHARS is parsed but never kept"
