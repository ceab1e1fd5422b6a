"""Config validation of the SFT trainer: every problem is named, with the allowed values, before a model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qlora_kernels.train.config import ConfigError, SFTConfig, apply_overrides, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    return {"model": str(model), "data": str(data), "out": str(tmp_path / "out")}


def raw(paths: dict[str, str], **kw) -> dict:
    base = {"base_model": paths["model"], "datasets": [{"path": paths["data"], "type": "alpaca"}],
            "output_dir": paths["out"]}
    base.update(kw)
    return base


def errors_of(cfg: dict) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(raw=cfg)
    return str(e.value)


def test_minimal_config_gets_defaults(paths):
    cfg = load_config(raw=raw(paths))
    assert isinstance(cfg, SFTConfig)
    assert cfg.lora_r == 16 and cfg.optimizer == "paged_adamw" and cfg.quantization.blocksize == 64
    assert cfg.datasets[0].split == "train" and cfg.train_datasets == cfg.datasets and cfg.eval_datasets == []
    assert cfg.trust_remote_code is False


def test_unknown_key_is_named_with_suggestion_and_allowed_keys(paths):
    msg = errors_of(raw(paths, lr_schedular="cosine"))
    assert "lr_schedular: unknown key" in msg and "did you mean 'lr_scheduler'" in msg
    assert "allowed keys:" in msg and "learning_rate" in msg


def test_unknown_nested_keys(paths):
    msg = errors_of(raw(paths, quantization={"block_size": 64}, datasets=[{"path": paths["data"], "kind": "x"}]))
    assert "quantization.block_size: unknown key" in msg and "blocksize" in msg
    assert "datasets[0].kind: unknown key" in msg


def test_wrong_types_are_named(paths):
    msg = errors_of(raw(paths, lora_r="16", micro_batch_size=2.5, gradient_checkpointing="yes", datasets="x.jsonl"))
    assert "lora_r: expected int, got str '16'" in msg
    assert "micro_batch_size: expected int" in msg
    assert "gradient_checkpointing: expected bool" in msg
    assert "datasets: expected list of mapping" in msg


def test_bool_is_not_an_int(paths):
    assert "lora_r: expected int, got bool" in errors_of(raw(paths, lora_r=True))


def test_choices_list_allowed_values(paths):
    msg = errors_of(raw(paths, optimizer="sgd", lr_scheduler="step", quantization={"blocksize": 100},
                        datasets=[{"path": paths["data"], "type": "sharegpt"}]))
    assert "optimizer: 'sgd' is not allowed; allowed values: 'paged_adamw', 'paged_adamw_8bit', 'adamw_torch'" in msg
    assert "lr_scheduler: 'step' is not allowed; allowed values: 'cosine', 'linear', 'constant'" in msg
    assert "quantization.blocksize: 100 is not allowed" in msg and "4096" in msg
    assert "datasets[0].type: 'sharegpt' is not allowed; allowed values: 'alpaca', 'completion', 'chat', 'text'" in msg


def test_missing_paths(paths, tmp_path):
    msg = errors_of(raw(paths, base_model=str(tmp_path / "nope"), datasets=[{"path": str(tmp_path / "x.jsonl")}],
                        resume_from_checkpoint=str(tmp_path)))
    assert "base_model:" in msg and "not a Hugging Face model directory" in msg
    assert "datasets[0].path: path" in msg and "does not exist" in msg
    assert "resume_from_checkpoint:" in msg and "trainer_state.json" in msg


def test_base_model_needs_safetensors(paths):
    model = Path(paths["model"])
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"")
    msg = errors_of(raw(paths))
    assert "no *.safetensors weights" in msg and "pytorch_model.bin" in msg


def test_required_keys(paths):
    msg = errors_of({"output_dir": paths["out"]})
    assert "base_model: required key is missing" in msg and "datasets: required key is missing" in msg


def test_all_errors_reported_at_once(paths):
    msg = errors_of(raw(paths, lora_r="x", optimizer="sgd", bogus=1))
    assert msg.count("\n") >= 3


def test_cross_field_rules(paths):
    msg = errors_of(raw(paths, warmup_steps=5, warmup_ratio=0.1, early_stopping_patience=2, lora_dropout=1.5,
                        bf16=True, fp16=True, lora_target_modules="everything"))
    assert "warmup_steps, warmup_ratio: set one of them" in msg
    assert "early_stopping_patience: needs an eval set" in msg
    assert "early_stopping_patience: needs eval_steps" in msg
    assert "lora_dropout: must be in [0, 1)" in msg
    assert "bf16, fp16" in msg
    assert "lora_target_modules: 'everything' is not allowed" in msg


def test_chat_rows_need_a_chat_template(paths):
    msg = errors_of(raw(paths, prompt_template="alpaca", datasets=[{"path": paths["data"], "type": "chat"}]))
    assert "prompt_template: 'alpaca' cannot format chat rows" in msg


def test_eval_split_and_val_set_size_are_exclusive(paths):
    ds = [{"path": paths["data"]}, {"path": paths["data"], "split": "eval"}]
    assert "val_set_size: set it to 0" in errors_of(raw(paths, datasets=ds, val_set_size=0.1))
    cfg = load_config(raw=raw(paths, datasets=ds))
    assert len(cfg.train_datasets) == 1 and len(cfg.eval_datasets) == 1


def test_float_strings_and_ints_are_floats(paths):
    cfg = load_config(raw=raw(paths, learning_rate="2e-4", lora_alpha=32))
    assert cfg.learning_rate == 2e-4 and isinstance(cfg.lora_alpha, float)
    assert "learning_rate: expected float" in errors_of(raw(paths, learning_rate="fast"))


def test_target_modules_list(paths):
    assert load_config(raw=raw(paths, lora_target_modules=["q_proj", "v_proj"])).lora_target_modules == [
        "q_proj", "v_proj"]


def test_overrides(paths):
    cfg = load_config(raw=raw(paths), overrides=["learning_rate=1e-3", "quantization.blocksize=128",
                                                 "lora_target_modules=[q_proj, v_proj]", "max_steps=7",
                                                 "datasets.0.type=completion", "bf16=false", "eval_steps=null"])
    assert cfg.learning_rate == 1e-3 and cfg.quantization.blocksize == 128 and cfg.max_steps == 7
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.datasets[0].type == "completion"
    assert cfg.bf16 is False and cfg.eval_steps is None


def test_override_errors(paths):
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["learning_rate"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(raw(paths), ["datasets.3.path=x"])
    assert "lr: unknown key" in errors_of(apply_overrides(raw(paths), ["lr=1"]))


def test_yaml_file_round_trip(paths, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw(paths, num_epochs=2)))
    cfg = load_config(p, ["seed=3"])
    assert cfg.num_epochs == 2.0 and cfg.seed == 3
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict()))["quantization"]["quant_type"] == "nf4"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_example_config_is_valid_and_matches_the_demo(monkeypatch, tmp_path):
    from qlora_kernels.demo.run import demo_raw_config

    monkeypatch.chdir(REPO)
    assert yaml.safe_load((REPO / "examples" / "sft_tiny.yaml").read_text())["output_dir"] == "outputs/sft_tiny"
    # (in a fresh directory: a run of the example in this checkout must not fail the test)
    cfg = load_config(REPO / "examples" / "sft_tiny.yaml", [f"output_dir={tmp_path / 'sft_tiny'}"])
    demo = load_config(raw=demo_raw_config(output_dir=cfg.output_dir))
    assert cfg.to_dict() == {**demo.to_dict(), "base_model": cfg.base_model, "datasets": cfg.to_dict()["datasets"],
                             "test_datasets": cfg.to_dict()["test_datasets"]}
    assert Path(cfg.base_model).resolve() == Path(demo.base_model).resolve()
    assert Path(cfg.datasets[0].path).resolve() == Path(demo.datasets[0].path).resolve()
    assert Path(cfg.test_datasets[0].path).resolve() == Path(demo.test_datasets[0].path).resolve()


# --------------------------------------------------------------------------- ranges of numeric keys (issue 11: 8, 13)


@pytest.mark.parametrize("key, value, needle", [
    ("max_grad_norm", -1, "max_grad_norm: must be >= 0 or null (0 or null: no clipping); got -1"),
    ("max_grad_norm", float("inf"), "max_grad_norm: must be a finite number >= 0"),
    ("learning_rate", float("nan"), "learning_rate: must be a finite number > 0; got nan"),
    ("learning_rate", "nan", "learning_rate: must be a finite number > 0; got nan"),
    ("lora_alpha", float("nan"), "lora_alpha: must be a finite number > 0; got nan"),
    ("lora_alpha", 0, "lora_alpha: must be > 0; got 0"),
    pytest.param("lora_alpha", 10**400, "lora_alpha: expected float", id="lora_alpha-int-beyond-float"),
    ("adam_beta1", 1.5, "adam_beta1: must be in [0, 1); got 1.5"),
    ("adam_beta2", -0.1, "adam_beta2: must be in [0, 1); got -0.1"),
    ("adam_epsilon", -1, "adam_epsilon: must be > 0; got -1"),
    ("adam_epsilon", 0, "adam_epsilon: must be > 0; got 0"),
    ("weight_decay", -1, "weight_decay: must be >= 0; got -1"),
    ("seed", 2**64, "seed: must be in [0, 4294967295]; got 18446744073709551616"),
    ("seed", -1, "seed: must be in [0, 4294967295]; got -1"),
    ("num_epochs", float("inf"), "num_epochs: must be a finite number >= 0"),
    ("val_set_size", float("nan"), "val_set_size: must be a finite number >= 0"),
    ("val_set_size", 2.5, "val_set_size: must be a fraction < 1 or a whole number of rows"),
    ("dpo_beta", float("inf"), "dpo_beta: must be a finite number > 0"),
    ("warmup_ratio", float("nan"), "warmup_ratio: must be a finite number in [0, 1) or null"),
    ("warmup_steps", -1, "warmup_steps: must be >= 0 or null; got -1"),
    ("lora_r", 0, "lora_r: must be >= 1; got 0"),
    ("save_total_limit", 0, "save_total_limit: must be >= 1 or null; got 0"),
])
def test_every_numeric_key_has_a_range(paths, key, value, needle):
    assert needle in errors_of(raw(paths, **{key: value}))


def test_max_grad_norm_zero_and_null_mean_no_clipping(paths):
    assert load_config(raw=raw(paths, max_grad_norm=0)).max_grad_norm == 0.0
    assert load_config(raw=raw(paths, max_grad_norm=None)).max_grad_norm is None
    cfg = load_config(raw=raw(paths, seed=2**32 - 1, adam_beta1=0.0, weight_decay=0, num_epochs=0, max_steps=3))
    assert cfg.seed == 2**32 - 1 and cfg.num_epochs == 0.0


def test_range_errors_are_reported_with_other_errors(paths):
    msg = errors_of(raw(paths, learning_rate=float("nan"), optimizer="sgd", lora_r="x"))
    assert "learning_rate: must be a finite number > 0" in msg and "optimizer: 'sgd'" in msg and "lora_r:" in msg


def test_non_utf8_yaml_is_a_config_error_naming_the_file(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("base_model: mod\u00e8le\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "not UTF-8" in str(e.value) and "line 1" in str(e.value)


def test_cli_non_utf8_yaml_exits_2(tmp_path, capsys):
    from qlora_kernels import cli

    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"seed: 1\nbase_model: mod\xe8le\n")
    assert cli.main(["train", str(p)]) == 2
    assert "not UTF-8 (byte 0xe8 at line 2" in capsys.readouterr().err


# --------------------------------------------------------------------------- names TRL / Axolotl users bring


def test_trl_and_axolotl_names_are_read_as_aliases(paths):
    cfg = load_config(raw=raw(paths, per_device_train_batch_size=4, per_device_eval_batch_size=8, max_length=256,
                              num_train_epochs=2, lr_scheduler_type="constant_with_warmup", optim="paged_adamw_32bit",
                              completion_only_loss=False, use_rslora=True, bnb_4bit_use_double_quant=False,
                              logging_steps=5))
    assert (cfg.micro_batch_size, cfg.eval_batch_size, cfg.sequence_len, cfg.num_epochs) == (4, 8, 256, 2.0)
    assert cfg.lr_scheduler == "constant" and cfg.optimizer == "paged_adamw" and cfg.train_on_inputs is True
    assert cfg.peft_use_rslora is True and cfg.quantization.double_quant is False and cfg.logging_steps == 5
    assert cfg.aliases["per_device_train_batch_size"] == "micro_batch_size"
    dpo = load_config(raw=raw(paths, rl="dpo", beta=0.3, loss_type="ipo", max_seq_length=64, completion_only_loss=None,
                              datasets=[{"path": paths["data"], "type": "preference"}]))
    assert (dpo.dpo_beta, dpo.dpo_loss, dpo.sequence_len, dpo.train_on_inputs) == (0.3, "ipo", 64, False)
    assert load_config(raw=raw(paths, optimizer="paged_adamw_32bit")).optimizer == "paged_adamw"


def test_config_yaml_notes_the_aliases_read(paths, tmp_path):
    from qlora_kernels.train.config import dump_config

    cfg = load_config(raw=raw(paths, beta=0.2, rl="dpo", datasets=[{"path": paths["data"], "type": "preference"}],
                              optimizer="paged_adamw_32bit"))
    dump_config(cfg, tmp_path / "c.yaml")
    text = (tmp_path / "c.yaml").read_text()
    assert text.startswith("# aliases read: beta -> dpo_beta, optimizer: paged_adamw_32bit -> optimizer: paged_adamw")
    assert yaml.safe_load(text)["dpo_beta"] == 0.2


def test_alias_together_with_our_key_is_an_error(paths):
    msg = errors_of(raw(paths, per_device_train_batch_size=4, micro_batch_size=2, max_length=8, max_seq_length=9))
    assert "per_device_train_batch_size: is read as micro_batch_size, which is also given; set only one" in msg
    assert "is read as sequence_len, which is also given (as max_length)" in msg


def test_alias_errors_name_the_alias(paths):
    msg = errors_of(raw(paths, per_device_train_batch_size=0, optim="adamw_hf", loss_type="hinge"))
    assert "per_device_train_batch_size (read as micro_batch_size): must be >= 1; got 0" in msg
    assert "optim (read as optimizer): 'adamw_hf' is not allowed" in msg
    assert "loss_type (read as dpo_loss): 'hinge' is not allowed" in msg
    assert "lr_scheduler_type: 'constant' in transformers has no warmup" in errors_of(
        raw(paths, lr_scheduler_type="constant", warmup_steps=3))


def test_foreign_keys_name_our_key_and_suggestions_keep_train_and_eval_apart(paths):
    msg = errors_of(raw(paths, eval_strategy="steps", batch_size=8, train_batch_size=8, per_device_train_batchsize=8,
                        eval_batchsize=2))
    assert "eval_strategy: unknown key; evaluation runs every eval_steps steps and at the end: set eval_steps" in msg
    assert "batch_size: unknown key; set micro_batch_size" in msg
    assert "train_batch_size: unknown key; did you mean 'micro_batch_size'?" in msg
    assert ("per_device_train_batchsize: unknown key; did you mean 'per_device_train_batch_size' (read as "
            "micro_batch_size)?") in msg
    assert "eval_batchsize: unknown key; did you mean 'eval_batch_size'?" in msg


def test_an_override_replaces_the_key_under_any_name_and_warmup_steps_and_ratio_replace_each_other(paths, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw(paths, warmup_steps=10, per_device_train_batch_size=4)))
    cfg = load_config(p, ["warmup_ratio=0.1", "micro_batch_size=2"])
    assert cfg.warmup_ratio == 0.1 and cfg.warmup_steps is None and cfg.micro_batch_size == 2
    cfg = load_config(p, ["warmup_steps=null"])  # a null does not remove the other one
    assert cfg.warmup_steps is None and cfg.warmup_ratio is None
    p.write_text(yaml.safe_dump(raw(paths, warmup_ratio=0.1)))
    assert load_config(p, ["warmup_steps=3"]).warmup_steps == 3
    with pytest.raises(ConfigError, match="warmup_steps, warmup_ratio: set one of them"):
        load_config(p, ["warmup_steps=3", "warmup_ratio=0.2"])
