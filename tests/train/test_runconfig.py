import re

import pytest

from dyndepth.runconfig import RunConfigError, TrainConfig, load_run_config, save_run_config

TOML = """
model = "tiny-qwen3"
[method]
name = "none"
[train]
steps = 50
lr = 1e-3
betas = [0.8, 0.9]
freeze = ["model.embed_tokens.*"]
[data]
path = "data/corpus"
"""


def test_defaults_recipe_and_cli_precedence(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(TOML)
    rc = load_run_config(recipe, ["train.lr=3e-4", "train.compile=true", "data.seq_shuffle=0",
                                  "train.lr_groups={\"*.gateskip.*\": 10}", "model.num_hidden_layers=3"])
    assert rc.train.steps == 50  # recipe over default
    assert rc.train.lr == pytest.approx(3e-4)  # CLI over recipe
    assert isinstance(rc.train.lr, float)
    assert rc.train.batch_size == TrainConfig().batch_size  # default
    assert rc.train.betas == (0.8, 0.9)
    assert rc.train.compile is True
    assert rc.train.lr_groups == {"*.gateskip.*": 10.0}
    assert rc.model == {"preset": "tiny-qwen3", "num_hidden_layers": 3}
    assert rc.data == {"path": "data/corpus", "seq_shuffle": 0}


def test_yaml_recipe_and_coercion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: tiny-qwen3}\ntrain:\n  steps: 7\n  min_lr: 0\n  resume: true\n")
    rc = load_run_config(recipe, ["train.freeze=a.*,b.*", "train.resume=runs/x/step_0000004",
                                  "train.peak_tflops=none"])
    assert rc.train.steps == 7 and rc.train.min_lr == 0.0 and isinstance(rc.train.min_lr, float)
    assert rc.train.freeze == ["a.*", "b.*"]
    assert rc.train.resume == "runs/x/step_0000004"
    assert rc.train.peak_tflops is None
    assert load_run_config(recipe).train.resume is True


def test_an_override_of_the_models_source_replaces_the_recipes(tmp_path):
    # `--set model.pretrained=X` on a preset recipe kept the preset, and the run failed ("a pretrained model takes
    # only 'pretrained' and 'dtype'") with no override able to drop it
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\npreset = "tiny-qwen3"\nhidden_size = 64\ndtype = "bfloat16"\n')
    assert load_run_config(recipe, ["model.pretrained=runs/x/model"]).model == {"pretrained": "runs/x/model",
                                                                              "dtype": "bfloat16"}
    recipe.write_text('[model]\npretrained = "runs/x/model"\ndtype = "float32"\n')  # (a preset takes no dtype)
    assert load_run_config(recipe, ["model.preset=tiny-qwen3", "model.hidden_size=64"]).model == {
        "preset": "tiny-qwen3", "hidden_size": 64}
    assert load_run_config(None, ["model=tiny-qwen3", "model.pretrained=p"]).model == {"pretrained": "p"}


def test_a_section_or_recipe_that_is_not_a_mapping_is_named(tmp_path):
    """`train = 5` stopped with "TypeError: 'int' object is not iterable", a YAML list under train: with
    "TypeError: unhashable type: 'dict'", `train: steps=2` with "unknown key train.s" (its letters iterated),
    and a recipe that is a YAML list with "unknown section(s) ['a', 'b']"."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "demo-tiny"\ntrain = 5\n')
    for overrides in ((), ["train.steps=2"]):
        with pytest.raises(RunConfigError, match=r"section 'train' must be a table/mapping, got 5"):
            load_run_config(recipe, overrides)
    recipe = tmp_path / "r.yaml"
    for body, got in (("train: steps=2\n", "'steps=2'"), ("train:\n  - steps: 2\n", r"\[\{'steps': 2\}\]")):
        recipe.write_text(body)
        with pytest.raises(RunConfigError, match=rf"section 'train' must be a table/mapping, got {got}"):
            load_run_config(recipe)
    recipe.write_text("- a\n- b\n")
    with pytest.raises(RunConfigError, match=r"r\.yaml must be a mapping of sections .*got a list"):
        load_run_config(recipe)
    recipe.write_text("model:\n")
    with pytest.raises(RunConfigError, match=r"section 'model' must be a table/mapping, got None"):
        load_run_config(recipe)
    recipe.write_text("model: demo-tiny\nmethod:\ntrain:\n  steps: 2\n")  # empty sections stay allowed
    assert load_run_config(recipe).train.steps == 2
    # ... and take overrides ("section 'method' must be a table/mapping, got None"; before: a TypeError)
    assert load_run_config(recipe, ["method.name=gateskip"]).method == {"name": "gateskip"}


def test_unknown_keys_and_bad_values_name_the_key(tmp_path):
    with pytest.raises(RunConfigError, match=r"train\.lrr.*valid train keys.*'lr'"):
        load_run_config(None, ["train.lrr=1"])
    with pytest.raises(RunConfigError, match="unknown section"):
        load_run_config(None, ["trian.lr=1"])
    # [eval] keys were not checked: a typo ("enable = false") left evaluation on
    with pytest.raises(RunConfigError, match=r"unknown key eval\.enable; valid eval keys: \['enabled'\]"):
        load_run_config(None, ["eval.enable=false"])
    with pytest.raises(RunConfigError, match=r"eval\.enabled: expected bool"):
        load_run_config(None, ["eval.enabled=maybe"])
    assert load_run_config(None, ["eval.enabled=0"]).eval == {"enabled": False}
    with pytest.raises(RunConfigError, match=r"train\.steps: expected int"):
        load_run_config(None, ["train.steps=ten"])
    with pytest.raises(RunConfigError, match="schedule"):
        load_run_config(None, ["train.schedule=linear"])
    with pytest.raises(RunConfigError, match="section.key=value"):
        load_run_config(None, ["train.lr"])
    for key, value in (("clip", "-1"), ("save_every", "-1"), ("keep_last", "-2")):  # were accepted
        with pytest.raises(RunConfigError, match=rf"train\.{key} must be >= 0"):
            load_run_config(None, [f"train.{key}={value}"])
    for seed in (2**32, 2**64):  # numpy's "Seed must be between 0 and 2**32 - 1" after the data were built
        with pytest.raises(RunConfigError, match=rf"train\.seed must be below 2\*\*31 \(2147483648\), got {seed}"):
            load_run_config(None, [f"train.seed={seed}"])
    with pytest.raises(RunConfigError, match="train.out_dir is empty"):  # wrote the run into the working directory
        load_run_config(None, ["train.out_dir="])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nwarmpu = 3\n")
    with pytest.raises(RunConfigError, match="warmpu"):
        load_run_config(bad)


def test_saved_config_round_trips(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(TOML)
    rc = load_run_config(recipe, ["train.seed=3"])
    saved = save_run_config(rc, tmp_path / "out" / "config.yaml")
    assert load_run_config(saved) == rc


def test_shipped_recipes_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[2] / "recipes").glob("*.toml"))
    assert {p.name for p in recipes} >= {"tiny_cpu.toml", "gpt_125m.toml", "qwen3_posttrain.toml"}
    for path in recipes:
        rc = load_run_config(path)
        assert rc.train.steps > 0 and rc.data, path.name


def test_recipe_header_commands_use_valid_keys():
    """Every `--set key=value` in a recipe's header comments loads, and its data keys are known."""
    import re
    from pathlib import Path

    from dyndepth.data.build import resolve_data_config

    recipes = sorted((Path(__file__).parents[2] / "recipes").glob("*.toml"))
    seen = 0
    for path in recipes:
        overrides = re.findall(r"--set ((?:model|method|train|data|eval)\.[^\s=]+=[^\s\]]+)", path.read_text())
        seen += len(overrides)
        rc = load_run_config(path, overrides)
        resolve_data_config(rc.data)  # raises on an unknown data key such as data.path
    assert seen >= 3


def test_an_override_reads_a_toml_inline_table_or_array_as_the_recipe_writes_it():
    # the recipes' comments write lr_groups = { "model.layers.*.gateskip.*" = 100.0 }; the same text after --set read
    # as the list ['{ "model.layers.*.gateskip.*" = 100.0 }'] and was refused ("expected dict")
    cfg = load_run_config(None, ['train.lr_groups={ "model.layers.*.gateskip.*" = 100.0 }',
                                 "train.freeze=['model.embed_tokens.*', 'lm_head.*']",
                                 'data.source=["a.txt", "b.txt"]', "data.note=2024-01-01", "method.name=gateskip"])
    assert cfg.train.lr_groups == {"model.layers.*.gateskip.*": 100.0}
    assert cfg.train.freeze == ["model.embed_tokens.*", "lm_head.*"]
    assert cfg.data["source"] == ["a.txt", "b.txt"]
    assert cfg.data["note"] == "2024-01-01"  # bare text stays text: TOML reads it as a date
    with pytest.raises(RunConfigError, match="train.lr_groups"):
        load_run_config(None, ["train.lr_groups={ unquoted.glob* = 2 }"])


def test_a_recipe_that_is_a_folder_or_not_text_is_named(tmp_path):
    """A folder passed as the recipe (a run's out_dir, to resume it) stopped with an IsADirectoryError traceback;
    a binary file with a UnicodeDecodeError naming no file."""
    run = tmp_path / "runs" / "tiny"
    (run / "step_0000003").mkdir(parents=True)
    (run / "step_0000003" / "config.yaml").write_text("model: demo-tiny\n")
    with pytest.raises(RunConfigError, match=r"tiny is a folder; pass a recipe file .*"
                                             r"dyndepth train .*step_0000003/config\.yaml --resume"):
        load_run_config(run)
    with pytest.raises(RunConfigError, match=r"is a folder; pass a recipe file \(\.toml or \.yaml, e\.g\. "
                                             r"recipes/tiny_cpu\.toml\)\.$"):
        load_run_config(tmp_path)  # (its only config.yaml sits two levels down: no hint)
    binary = tmp_path / "r.toml"
    binary.write_bytes(b"model = \xff\xfe\n")
    with pytest.raises(RunConfigError, match=r"r\.toml is not UTF-8 text"):
        load_run_config(binary)


def test_invalid_yaml_is_one_line_naming_where(tmp_path):
    """PyYAML's message spans several lines (the text quoted under a caret): the one-line error was seven."""
    recipe = tmp_path / "r.yaml"
    for body, where, what in (("model: demo-tiny\ntrain:\n\tsteps: 3\n", "line 3, column 1",
                               r"found character '\\t' that cannot start any token"),
                              ("train:\n  steps: [3\n", "line 3, column 1",
                               r"while parsing a flow sequence; expected ',' or '\]', but got '<stream end>'")):
        recipe.write_text(body)
        with pytest.raises(RunConfigError) as err:
            load_run_config(recipe)
        assert "\n" not in str(err.value)
        message = str(err.value)
        assert re.search(rf"r\.yaml: invalid YAML/JSON at {where} \(.*{what}\); fix the recipe there\.$", message)


def test_a_yaml_recipe_giving_a_key_twice_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` section dropped the whole first one (its steps,
    batch size and out_dir: the run trained 1000 steps into runs/default); TOML refuses it, and now YAML does too."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n  out_dir: runs/mine\ndata:\n  source: embedded\ntrain:\n  lr: 1.0e-3\n")
    with pytest.raises(RunConfigError, match=r"r\.yaml: invalid YAML/JSON at line 6, column 1 \(the key 'train' is "
                                             r"given twice \(the later would replace the first\); give it once\)"):
        load_run_config(recipe)
    recipe.write_text("train:\n  steps: 3\n  lr: 1.0e-3\n  steps: 5\n")
    with pytest.raises(RunConfigError, match=r"at line 4, column 3 \(the key 'steps' is given twice"):
        load_run_config(recipe)
    recipe.write_text("train:\n  <<: {steps: 3, lr: 1.0e-3}\n  steps: 5\n")  # a merge, then overridden: YAML's rule
    assert load_run_config(recipe).train.steps == 5


def test_an_override_naming_a_folder_that_reads_as_a_number_keeps_the_path():
    """--set data.source=2024 (a folder named for its year) became the int 2024, refused as "data.source=2024 is not a
    source: write a path"; paths and names stay text, and an override's lists and none keep their meaning."""
    cfg = load_run_config(None, ["data.source=2024", "data.tokenizer=1e3", "data.val_source=true",
                                 "model.pretrained=7", "data.cache_dir=0"])
    assert cfg.data == {"source": "2024", "tokenizer": "1e3", "val_source": "true", "cache_dir": "0"}
    assert cfg.model == {"pretrained": "7"}
    cfg = load_run_config(None, ['data.source=["2024", "2025"]', "data.val_source=none", "data.synthetic_examples=0"])
    assert cfg.data == {"source": ["2024", "2025"], "val_source": None, "synthetic_examples": 0}
