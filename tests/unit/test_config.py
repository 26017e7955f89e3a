"""Experiment files and config validation: every mistake is one clear sentence."""

from pathlib import Path

import pytest

from tinytale.config import Config, ConfigError, load_config

EXPERIMENTS = sorted(p for p in (Path(__file__).parents[2] / "experiments").glob("*.yaml")
                     if not p.name.startswith("sweep"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_experiment_loads(path):
    cfg = load_config(path)
    assert cfg.tracking.run_name


def test_lesson_yaml_is_the_builtin_default():
    lesson = load_config(Path(__file__).parents[2] / "experiments" / "lesson.yaml")
    default = Config().validate()
    default.tracking.run_name = "lesson"
    assert lesson == default


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=3e-4", "model.dropout=0.1", "train.compile=false",
                             "data.stride=null", "train.epochs=5"])
    assert cfg.train.lr == 3e-4 and cfg.model.dropout == 0.1 and cfg.train.compile is False
    assert cfg.data.stride is None and cfg.train.epochs == 5


def test_flat_and_hash():
    cfg = load_config(None)
    assert cfg.flat()["model.n_layer"] == 2
    assert cfg.hash() == load_config(None).hash() != load_config(None, ["train.lr=1e-3"]).hash()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], r"unknown key 'train.lrr'.*did you mean 'lr'"),
        (["trian.lr=1"], r"unknown section 'trian'.*did you mean 'train'"),
        (["train.epochs=ten"], r"train.epochs='ten' is not an integer"),
        (["train.epochs=2.5"], r"train.epochs=2.5 is not an integer"),
        (["train.epochs=0"], r"train.epochs=0 must be positive"),
        (["model.dropout=1.5"], r"model.dropout=1.5 is out of range"),
        (["model.attn_dropout=1"], r"model.attn_dropout=1.0 is out of range"),
        (["model.attn_dropout=-0.1"], r"model.attn_dropout=-0.1 is out of range"),
        (["model.n_head=5"], r"model.n_embd=64 is not divisible by model.n_head=5"),
        (["data.tokenizer=words"], r"data.tokenizer='words' is not one of"),
        (["train.device=tpu"], r"train.device='tpu' is not one of"),
        (["train.min_lr=1"], r"train.min_lr=1.0 is out of range"),
        (["train.lr"], r"not of the form section.key=value"),
        (["train.compile=maybe"], r"train.compile='maybe' is not valid"),
        (["tracking.registered_model=it's mine"],
         r"tracking.registered_model=\"it's mine\" is not a usable model name"),
    ],
)
def test_bad_values_name_field_and_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: [1,\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(scalar)
    section = tmp_path / "section.yaml"
    section.write_text("model: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="section 'model'"):
        load_config(section)


def test_train_device_takes_the_devices_device_py_resolves():
    import typing

    from tinytale.config import TrainConfig
    from tinytale.device import LOCAL_DEVICES

    assert typing.get_args(typing.get_type_hints(TrainConfig)["device"]) == LOCAL_DEVICES


def test_an_unknown_key_says_which_part_is_wrong_for_callers_that_word_it_themselves():
    from tinytale.config import UnknownKeyError, check_key, known_keys

    assert "n_layer" in known_keys()["model"] and list(known_keys()) == [
        "model", "data", "train", "tracking"]
    check_key("model", "n_layer")
    with pytest.raises(UnknownKeyError) as section:
        check_key("modle", "n_layer")
    assert (section.value.section_known, section.value.close) == (False, "model")
    with pytest.raises(UnknownKeyError) as key:
        check_key("model", "nlayer", where=" in x.yaml")
    assert (key.value.section_known, key.value.close) == (True, "n_layer")
    assert str(key.value).startswith("unknown key 'model.nlayer' in x.yaml (did you mean")


@pytest.mark.parametrize(("text", "split"), [
    ("train.lr=3e-4", ("train.lr", "3e-4")), ("c.d=x=y", ("c.d", "x=y")), ("k=", ("k", "")),
    ("train.lr", None), ("=3", None), (" =3", None), ("", None),
])
def test_a_set_item_is_split_once_into_key_and_value(text, split):
    from tinytale.config import split_override

    assert split_override(text) == split


def test_a_yaml_syntax_error_names_the_place_and_the_problem():
    import yaml

    from tinytale.config import describe_yaml_error

    with pytest.raises(yaml.YAMLError) as caught:
        yaml.safe_load("a: [1,\n")
    assert describe_yaml_error("sweep file 's.yaml'", caught.value) == (
        "sweep file 's.yaml' is not valid YAML at line 2, column 1 (expected the node content, "
        "but found '<stream end>'); fix the syntax there.")


def test_a_checkpoint_from_before_attn_dropout_resumes_with_attention_dropout(tmp_path):
    # Such checkpoints applied model.dropout to the attention weights as well; a resumed run
    # must go on doing so, while a user's config without the key gets the default 0.
    from tinytale.checkpoint import save_checkpoint
    from tinytale.run import starting_point
    from tinytale.tokenizer import train_tokenizer

    user = load_config(None, ["model.dropout=0.2"])
    assert user.model.attn_dropout == 0.0
    old = user.to_dict()
    del old["model"]["attn_dropout"]
    tokenizer = train_tokenizer("word", ["once upon a time"])
    last = save_checkpoint({"model": {}, "optimizer": {}, "config": old,
                            "tokenizer": tokenizer.to_dict()}, tmp_path / "last.pt")
    start = starting_point(user, tmp_path, str(last))
    assert (start.config.model.dropout, start.config.model.attn_dropout) == (0.2, 0.2)
    assert start.ignored == {"model.attn_dropout": "0.2 (not 0.0)"}
    # A checkpoint that has the key keeps its value.
    new = save_checkpoint({"model": {}, "optimizer": {}, "config": user.to_dict(),
                           "tokenizer": tokenizer.to_dict()}, tmp_path / "new" / "last.pt")
    assert starting_point(user, tmp_path, str(new)).config.model.attn_dropout == 0.0
