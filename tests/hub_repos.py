"""Small copies of the repositories users download, file by file in the layout those repositories have —
not in the layout today's ``save_pretrained`` writes. Weights are tiny and random; everything else (file
names, sharding, key names, config fields, tokenizer files, generation config) follows the real repository.

* ``lmsys/vicuna-7b-v1.5`` — :func:`vicuna`: ``config.json`` (``LlamaForCausalLM``, transformers 4.31 fields,
  no ``rope_theta``), Vicuna's ``generation_config.json`` (temperature 0.9 / top_p 0.6 without
  ``do_sample``: LLaVA #1144), two fp16 ``pytorch_model-0000N-of-00002.bin`` shards with
  ``pytorch_model.bin.index.json`` (the rotary ``inv_freq`` buffers saved too, as 4.31 did),
  ``special_tokens_map.json``, ``tokenizer_config.json`` (``LlamaTokenizer``, ``legacy: false``, no pad token)
  and a sentencepiece ``tokenizer.model`` (BPE, byte fallback, split digits, ``<unk> <s> </s>`` = 0 1 2) —
  no ``tokenizer.json``.
* ``openai/clip-vit-large-patch14-336`` — :func:`clip`: a full ``CLIPModel`` (text and vision towers,
  projections, ``logit_scale``) with ``text_model.`` / ``vision_model.`` key names and the
  ``position_ids`` buffers, in one ``pytorch_model.bin``; ``config.json`` with ``text_config`` and
  ``vision_config``; ``preprocessor_config.json`` in the old ``CLIPFeatureExtractor`` form (sizes as ints).
* ``liuhaotian/llava-v1.5-7b`` — :func:`llava_original`: ``LlavaLlamaForCausalLM``, ``model_type: llava``,
  the ``mm_*`` fields, fp16 ``.bin`` shards with an index holding the language model and
  ``model.mm_projector.{0,2}.*`` (no vision tower: ``mm_vision_tower`` names it), Vicuna's tokenizer files.
* a model trained with the original ``train.py`` — :func:`llava_original` with ``with_tower=True``: the same
  plus the tower under ``model.vision_tower.vision_tower.vision_model.*``, in fp32 or bf16, saved as
  safetensors shards (transformers 4.37's default), ``mm_vision_tower`` the path used in training.
* ``liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin`` — :func:`projector`: the
  four ``model.mm_projector.*`` tensors in 16 bits.
* ``llava-hf/llava-1.5-7b-hf`` — :func:`llava_hf`: ``LlavaForConditionalGeneration`` with the key names of
  its conversion (``language_model.model.*``, ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``,
  ``multi_modal_projector.linear_{1,2}.*``) in safetensors shards with an index; ``<image>`` and ``<pad>``
  added to the tokenizer (``tokenizer.json`` and ``tokenizer.model``), ``processor_config.json``,
  ``preprocessor_config.json``, ``chat_template.json`` (``USER: <image>\\n... ASSISTANT:``, no system text),
  ``generation_config.json``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

SP_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "What colour is the circle? ASSISTANT: The circle is red.",
    "How many shapes are there? There are 3 shapes. Is there a square? Yes. No.",
    "Describe the image briefly. A small red circle next to a large yellow star.",
    "Where is the star? The star is at the top of the image. Tell me a story about a cat.",
    "Once upon a time a cat lived in a house with a dog and they were friends.",
    "You are a helpful language and vision assistant. system user assistant [INST] [/INST] <<SYS>>",
    # as in Llama's vocabulary: "USER" is one piece after "</s>" but "▁USER" is two ("▁US", "ER"), and every
    # digit is a piece
    "Red.</s>USER: Yes.</s>USER: No.</s>USER: 0 1 2 3 4 5 6 7 8 9 US USA US ERA ER",
]
IMAGE_SIZE, PATCH = 28, 14
HIDDEN, VISION_HIDDEN, TEXT_TOWER_HIDDEN = 64, 32, 32


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2))


def _token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def sentencepiece_model(vocab_size: int = 700) -> bytes:
    """A Llama-style sentencepiece model trained on a small corpus (BPE, byte fallback, split digits)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 20), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=1.0,
        allow_whitespace_only_pieces=True, minloglevel=2)
    return out.getvalue()


def write_vicuna_tokenizer(d: Path, sp_model: bytes) -> None:
    (d / "tokenizer.model").write_bytes(sp_model)
    _write_json(d / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": _token("<s>"),
        "clean_up_tokenization_spaces": False, "eos_token": _token("</s>"), "legacy": False,
        "model_max_length": 4096, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": _token("<unk>")})
    _write_json(d / "special_tokens_map.json", {k: {kk: vv for kk, vv in _token(v).items() if kk != "__type"}
                                                for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"),
                                                             ("unk_token", "<unk>"))})


def llama_config(vocab: int) -> dict:
    return {"_name_or_path": "vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
            "eos_token_id": 2, "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02,
            "intermediate_size": 128, "max_position_embeddings": 4096, "model_type": "llama",
            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4, "pad_token_id": 0,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
            "torch_dtype": "float16", "transformers_version": "4.31.0", "use_cache": True, "vocab_size": vocab}


def llama_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Llama's weights under 4.31's names, with the rotary ``inv_freq`` buffers it saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}))
    state = {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()}
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(cfg["num_hidden_layers"]):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return state


def _write_shards(d: Path, state: dict[str, torch.Tensor], n: int, name: str, index: str, save) -> None:
    keys = list(state)
    per = -(-len(keys) // n)
    weight_map, total = {}, 0
    for k in range(n):
        part = {key: state[key].contiguous() for key in keys[k * per:(k + 1) * per]}
        save(part, d / name.format(k + 1, n))
        weight_map.update({key: name.format(k + 1, n) for key in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    _write_json(d / index, {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_bin_shards(d: Path, state: dict[str, torch.Tensor], n: int = 2) -> None:
    """``pytorch_model-0000K-of-0000N.bin`` + ``pytorch_model.bin.index.json``, as 4.x sharded them."""
    _write_shards(d, state, n, "pytorch_model-{:05d}-of-{:05d}.bin", "pytorch_model.bin.index.json", torch.save)


def write_safetensors_shards(d: Path, state: dict[str, torch.Tensor], n: int = 2) -> None:
    """``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    _write_shards(d, state, n, "model-{:05d}-of-{:05d}.safetensors", "model.safetensors.index.json",
                  lambda part, path: save_file(part, str(path), metadata={"format": "pt"}))


def vicuna_generation_config() -> dict:
    return {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0, "temperature": 0.9,
            "top_p": 0.6, "transformers_version": "4.31.0"}


def vicuna(d: Path, sp_model: bytes) -> dict:
    """``lmsys/vicuna-7b-v1.5`` in small: returns the directory and its (fp16) weights."""
    import sentencepiece as spm

    d.mkdir(parents=True, exist_ok=True)
    vocab = spm.SentencePieceProcessor(model_proto=sp_model).get_piece_size()
    cfg = llama_config(vocab)
    state = llama_weights(cfg)
    write_bin_shards(d, state)
    _write_json(d / "config.json", cfg)
    _write_json(d / "generation_config.json", vicuna_generation_config())
    write_vicuna_tokenizer(d, sp_model)
    return {"dir": str(d), "state": state, "config": cfg, "vocab": vocab}


def clip_configs() -> tuple[dict, dict]:
    vision = {"hidden_size": VISION_HIDDEN, "image_size": IMAGE_SIZE, "intermediate_size": 64,
              "model_type": "clip_vision_model", "num_attention_heads": 4, "num_hidden_layers": 3,
              "patch_size": PATCH, "projection_dim": 16, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}
    text = {"hidden_size": TEXT_TOWER_HIDDEN, "intermediate_size": 64, "model_type": "clip_text_model",
            "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": 16, "vocab_size": 99,
            "max_position_embeddings": 16, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
            "bos_token_id": 97, "eos_token_id": 98, "pad_token_id": 1}
    return vision, text


def clip(d: Path, seed: int = 0) -> dict:
    """``openai/clip-vit-large-patch14-336`` in small: the full CLIPModel with its text tower."""
    from transformers import CLIPConfig, CLIPModel

    d.mkdir(parents=True, exist_ok=True)
    vision, text = clip_configs()
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    state = {}
    for k, v in model.state_dict().items():  # 4.x names: the towers under text_model. / vision_model.
        state[k] = v.detach().clone()
    n_pos = (IMAGE_SIZE // PATCH) ** 2 + 1
    state.setdefault("vision_model.embeddings.position_ids", torch.arange(n_pos).unsqueeze(0))
    state.setdefault("text_model.embeddings.position_ids", torch.arange(text["max_position_embeddings"]).unsqueeze(0))
    torch.save(state, d / "pytorch_model.bin")
    _write_json(d / "config.json", {
        "_name_or_path": "openai/clip-vit-large-patch14-336", "architectures": ["CLIPModel"],
        "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 16,
        "text_config": text, "vision_config": vision, "torch_dtype": "float32", "transformers_version": "4.21.3"})
    _write_json(d / "preprocessor_config.json", {
        "crop_size": IMAGE_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": IMAGE_SIZE})
    vision_state = {k[len("vision_model."):]: v for k, v in state.items()
                    if k.startswith("vision_model.") and not k.endswith("position_ids")}
    return {"dir": str(d), "state": state, "vision_state": vision_state}


MM_FIELDS = {"mm_hidden_size": VISION_HIDDEN, "mm_patch_merge_type": "flat", "mm_projector_lr": None,
             "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
             "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
             "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad",
             "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": False,
             "use_mm_proj": True, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right"}


def projector_state(dtype=torch.bfloat16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.mm_projector.0.weight": (torch.randn(HIDDEN, VISION_HIDDEN, generator=g) * 0.1).to(dtype),
            "model.mm_projector.0.bias": (torch.randn(HIDDEN, generator=g) * 0.1).to(dtype),
            "model.mm_projector.2.weight": (torch.randn(HIDDEN, HIDDEN, generator=g) * 0.1).to(dtype),
            "model.mm_projector.2.bias": (torch.randn(HIDDEN, generator=g) * 0.1).to(dtype)}


def projector(path: Path, dtype=torch.bfloat16) -> dict:
    """The published stage-1 projector file: ``mm_projector.bin`` with the original's four keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = projector_state(dtype)
    torch.save(state, path)
    return {"path": str(path), "state": state}


def llava_original(d: Path, vic: dict, clip_repo: dict | None = None, *, with_tower: bool = False,
                   dtype: torch.dtype = torch.float16) -> dict:
    """``liuhaotian/llava-v1.5-7b`` in small (``with_tower=False``), or a model trained with the original
    ``train.py`` (``with_tower=True``: the tower's weights inside, ``dtype`` fp32 or bf16)."""
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).clone() for k, v in vic["state"].items() if "rotary_emb" not in k}
    state.update({k: v.to(dtype) for k, v in projector_state(dtype).items()})
    if with_tower:
        g = torch.Generator().manual_seed(5)  # a trained tower differs from the public one
        for k, v in clip_repo["vision_state"].items():
            state[f"model.vision_tower.vision_tower.vision_model.{k}"] = (
                v + 0.01 * torch.randn(v.shape, generator=g)).to(dtype)
    cfg = dict(vic["config"], architectures=["LlavaLlamaForCausalLM"], model_type="llava",
               _name_or_path="./checkpoints/llava-v1.5-7b", **MM_FIELDS)
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    if with_tower:
        cfg["mm_vision_tower"] = clip_repo["dir"]
        cfg["transformers_version"] = "4.37.2"
        write_safetensors_shards(d, state)
    else:
        write_bin_shards(d, state)
    _write_json(d / "config.json", cfg)
    gen = vicuna_generation_config()
    _write_json(d / "generation_config.json", gen)
    write_vicuna_tokenizer(d, (Path(vic["dir"]) / "tokenizer.model").read_bytes())
    return {"dir": str(d), "state": state, "config": cfg}


#: what ``liuhaotian/llava-v1.6-vicuna-7b``'s config adds (its grid scaled to the small tower: 336 → 28)
NEXT_FIELDS = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
               "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]],
               "unfreeze_mm_vision_tower": True, "mm_vision_tower_lr": 2e-06, "image_crop_resolution": None,
               "image_split_resolution": None, "tokenizer_model_max_length": 4096}


def llava_next_original(d: Path, vic: dict, clip_repo: dict, dtype: torch.dtype = torch.float16) -> dict:
    """``liuhaotian/llava-v1.6-vicuna-7b`` in small: LLaVA-1.5's layout with its trained tower inside, the
    ``model.image_newline`` weight and the AnyRes config fields."""
    out = llava_original(d, vic, clip_repo, with_tower=True, dtype=dtype)
    g = torch.Generator().manual_seed(6)
    state = dict(out["state"], **{"model.image_newline": (torch.randn(HIDDEN, generator=g) / HIDDEN ** 0.5).to(dtype)})
    cfg = dict(out["config"], _name_or_path="./checkpoints/llava-v1.6-vicuna-7b", **NEXT_FIELDS)
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    write_safetensors_shards(d, state)
    _write_json(d / "config.json", cfg)
    return {"dir": str(d), "state": state, "config": cfg}


#: the chat template of a llava-hf LLaVA-1.5 repository: USER/ASSISTANT turns, images first, no system text
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def llava_hf(d: Path, vic: dict, clip_repo: dict) -> dict:
    """``llava-hf/llava-1.5-7b-hf`` in small."""
    from transformers import AutoTokenizer

    d.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(vic["dir"])
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    image_id, pad_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<pad>")
    vocab = -(-len(tok) // 64) * 64
    state: dict[str, torch.Tensor] = {}
    for k, v in vic["state"].items():
        if "rotary_emb" in k:
            continue
        v = v.to(torch.float16)
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = torch.cat([v, v.float().mean(0, keepdim=True).to(v.dtype).expand(vocab - v.shape[0], -1)])
        state[f"language_model.{k}"] = v
    for k, v in projector_state(torch.float16).items():
        layer = {"0": "linear_1", "2": "linear_2"}[k.split(".")[2]]
        state[f"multi_modal_projector.{layer}.{k.split('.')[-1]}"] = v
    for k, v in clip_repo["vision_state"].items():
        state[f"vision_tower.vision_model.{k}"] = v.to(torch.float16)
    write_safetensors_shards(d, state, n=3)
    vision, _ = clip_configs()
    text = {k: v for k, v in vic["config"].items() if k not in ("architectures", "_name_or_path",
                                                                   "transformers_version", "torch_dtype")}
    text.update(vocab_size=vocab, pad_token_id=pad_id)
    _write_json(d / "config.json", {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": image_id,
        "model_type": "llava", "pad_token_id": pad_id, "projector_hidden_act": "gelu", "text_config": text,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": vision, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vocab_size": vocab})
    _write_json(d / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": pad_id,
                                               "transformers_version": "4.36.0.dev0"})
    tok.save_pretrained(str(d))
    added = {str(i): {k: v for k, v in _token(t).items() if k != "__type"} | {"special": True}
             for i, t in ((0, "<unk>"), (1, "<s>"), (2, "</s>"), (image_id, "<image>"), (pad_id, "<pad>"))}
    _write_json(d / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added, "bos_token": "<s>",
        "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
        "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>", "padding_side": "left",
        "processor_class": "LlavaProcessor", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False, "unk_token": "<unk>", "use_default_system_prompt": False})
    (d / "tokenizer.model").write_bytes((Path(vic["dir"]) / "tokenizer.model").read_bytes())
    _write_json(d / "added_tokens.json", {"<image>": image_id, "<pad>": pad_id})
    _write_json(d / "chat_template.json", {"chat_template": LLAVA_HF_CHAT_TEMPLATE})
    _write_json(d / "processor_config.json", {"image_token": "<image>", "num_additional_image_tokens": 1,
                                              "patch_size": PATCH, "processor_class": "LlavaProcessor",
                                              "vision_feature_select_strategy": "default"})
    _write_json(d / "preprocessor_config.json", {
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": IMAGE_SIZE}})
    return {"dir": str(d), "state": state, "image_token_index": image_id}
