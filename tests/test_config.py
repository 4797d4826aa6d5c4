"""`llavakit train` arguments: the original flags, YAML, legacy spellings, errors before any weight loads."""

import json
import subprocess
import sys

import pytest
import yaml

from llavakit.config import ConfigError, parse_train_args
from llavakit.train.entry import OutputDirError, resolve_resume

from .conftest import stage1_flags, stage2_flags


def test_seed_flags_parse_with_their_meaning(backbones, train_data, tmp_path):
    m, d, t = parse_train_args(stage2_flags(backbones, train_data, tmp_path / "o", "", pretrain_mm_mlp_adapter=None,
                                            lora_enable="True", lora_r=128, lora_alpha=256, mm_projector_lr=2e-5))
    assert m.version == "v1" and m.mm_vision_select_layer == -2 and not m.tune_mm_mlp_adapter
    assert d.image_aspect_ratio == "pad" and d.lazy_preprocess
    assert t.group_by_modality_length and t.lora_enable and t.lora_r == 128 and t.lora_alpha == 256
    assert t.mm_projector_lr == 2e-5 and t.model_max_length == 2048
    assert t.eval_strategy == "no"  # from the old --evaluation_strategy
    assert t.warmup_steps == 0.03  # from --warmup_ratio
    assert t.activation_checkpointing  # from --gradient_checkpointing
    assert t.tf32 is None  # --tf32 True dropped with a warning on a machine without CUDA


def test_yaml_config_with_flag_overrides(backbones, train_data, tmp_path):
    flags = stage1_flags(backbones, train_data, tmp_path / "o")
    cfg = {flags[i][2:]: flags[i + 1] for i in range(0, len(flags), 2)}
    cfg["learning_rate"] = 0.5
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    m, d, t = parse_train_args([str(path), "--learning_rate", "0.002"])
    assert t.learning_rate == 0.002 and m.tune_mm_mlp_adapter and m.version == "plain"


@pytest.mark.parametrize("extra,message", [
    (["--no_such_flag", "1"], "unknown argument(s): --no_such_flag 1"),
    (["--lora_enable", "True"], "contradicts --lora_enable"),
    (["--freeze_mm_mlp_adapter", "True"], "--freeze_mm_mlp_adapter freezes it"),
    (["--mm_projector_type", "linear"], "mlp2x_gelu"),
    (["--image_aspect_ratio", "crop"], "use 'square', 'pad', 'anyres' (LLaVA-NeXT) or 'anyres_max_N'"),
    (["--image_aspect_ratio", "anyres_max_x"], "use anyres or anyres_max_N"),
    (["--image_aspect_ratio", "anyres", "--mm_patch_merge_type", "flat"], "use spatial_unpad"),
    (["--mm_patch_merge_type", "spatial_unpad"], "use flat"),
    (["--image_grid_pinpoints", "[[56, 28]]"], "--image_grid_pinpoints tiles images for --image_aspect_ratio anyres"),
    (["--mm_vision_tower_lr", "2e-6"], "add --unfreeze_mm_vision_tower True"),
    (["--unfreeze_mm_vision_tower", "True"], "not with --tune_mm_mlp_adapter"),
    (["--version", "vicuna_v9"], "unknown template"),
    (["--bits", "4"], "needs a CUDA GPU"),
    (["--bits", "8"], "add --lora_enable True"),
    (["--pretrain_mm_mlp_adapter", "/nope/mm_projector.bin"], "no such file"),
    (["--data_path", "/nope.json"], "no such file or directory"),
    (["--length_group_steps", "0"], "--length_group_steps 0: use 1 or more"),
    (["--length_group_steps", "50"], "add one of them"),
])
def test_bad_flags_are_clear_errors(backbones, train_data, tmp_path, extra, message):
    with pytest.raises(ConfigError) as e:
        parse_train_args(stage1_flags(backbones, train_data, tmp_path / "o") + extra)
    assert message in str(e.value)


def test_cli_error_exit_code_and_no_weights_loaded(backbones, train_data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llavakit.train",
                        *stage1_flags(backbones, train_data, tmp_path / "o"), "--lora_enable", "True"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "contradicts --lora_enable" in r.stderr and "Loading weights" not in r.stderr


def test_existing_checkpoints_need_resume_or_overwrite(backbones, train_data, tmp_path):
    out = tmp_path / "o"
    (out / "checkpoint-5").mkdir(parents=True)
    _, _, t = parse_train_args(stage1_flags(backbones, train_data, out))
    with pytest.raises(OutputDirError, match="--resume_from_checkpoint latest"):
        resolve_resume(t)
    _, _, t = parse_train_args(stage1_flags(backbones, train_data, out) + ["--overwrite_output_dir", "True"])
    assert resolve_resume(t) is None


def test_original_format_checkpoint_names_the_conversion(backbones, train_data, tmp_path):
    orig = tmp_path / "llava-v1.5-7b"
    orig.mkdir()
    (orig / "config.json").write_text(json.dumps({"architectures": ["LlavaLlamaForCausalLM"],
                                                  "model_type": "llava_llama", "mm_vision_tower": "x"}))
    r = subprocess.run([sys.executable, "-m", "llavakit", "train",
                        *stage2_flags(backbones, train_data, tmp_path / "o", "", pretrain_mm_mlp_adapter=None,
                                      model_name_or_path=str(orig))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "original-format LLaVA checkpoint" in r.stderr and "llavakit convert from-original" in r.stderr


def test_the_private_internals_llavakit_relies_on_are_where_it_expects():
    """Every private name of transformers / Python that llavakit uses (llavakit/internals.py) is still
    there and takes the parameters used: an upgrade that moves one fails here, not silently in a run."""
    from llavakit.internals import PRIVATE_NAMES, check_internals

    assert check_internals() == []
    assert len(PRIVATE_NAMES) >= 9


def test_a_moved_internal_is_reported(monkeypatch):
    import llavakit.internals as internals

    monkeypatch.setattr(internals, "PRIVATE_NAMES", (
        ("transformers.Trainer._no_such_method", (), "x"),
        ("transformers.Trainer._save", ("output_dir", "no_such_param"), "y")))
    problems = internals.check_internals()
    assert len(problems) == 2 and "is gone" in problems[0] and "no_such_param" in problems[1]


def test_run_config_from_options_flags_and_yaml_are_one(tmp_path, train_data, backbones):
    """The typed API: keyword options, flags and a YAML file resolve to the same RunConfig."""
    from llavakit.config import RunConfig

    opts = {"model_name_or_path": backbones["llm"], "vision_tower": backbones["clip"], "version": "plain",
            "data_path": train_data["captions"], "image_folder": train_data["images"],
            "output_dir": str(tmp_path / "o"), "tune_mm_mlp_adapter": True, "learning_rate": 1e-3,
            "evaluation_strategy": "no", "report_to": "none"}
    a = RunConfig.from_options(**opts)
    b = RunConfig.from_argv([x for k, v in opts.items() for x in (f"--{k}", str(v))])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(opts))
    c = RunConfig.from_argv([str(tmp_path / "run.yaml")])
    assert a.model == b.model == c.model and a.data == b.data == c.data
    assert a.train.learning_rate == b.train.learning_rate == c.train.learning_rate == 1e-3
    assert a.train.eval_strategy == "no"
    a.train.lora_enable = True  # a contradiction made in Python is caught when the run validates it
    with pytest.raises(ConfigError, match="contradicts --lora_enable"):
        a.validate()
