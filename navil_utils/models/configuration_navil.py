"""Configuration classes of the native NaViL implementation (transformers 5.x, no remote code).

They read the official ``config.json`` of NaViL-2B / NaViL-9B (and of the golden fixtures) unchanged:

* :class:`NaViLChatConfig` (``model_type = "navil_chat"``) — the composite config; its ``llm_config`` is
  dispatched on ``llm_config["architectures"][0]`` exactly like the reference
  (``InternLM2VEForCausalLM`` → :class:`InternLM2VEConfig`, ``Qwen3VEForCausalLM`` → :class:`Qwen3VEConfig`,
  anything else → :class:`~navil_utils.errors.ConfigError`).
* :class:`NaViLVisionConfig` (``"navil_vit"``) — the any-resolution ViT.
* :class:`InternLM2VEConfig` (``"navil_internlm2_ve"``) and :class:`Qwen3VEConfig` (``"navil_qwen3_ve"``):
  own model types, so that they never clash with transformers' ``"qwen3"`` (or a future ``"internlm2"``).
  The checkpoints' sub-config ``model_type`` (``"internlm2"`` / ``"qwen3"``) is ignored on load.

Deliberate differences from the reference configs (all documented in the class docstrings):

* the reference's own attention switches (``llm_config.attn_implementation = "flash_attention_2"``,
  Qwen3VE's hard-coded ``_attn_implementation``) are dropped when a checkpoint dict is read: the
  attention backend is chosen by transformers (``attn_implementation=`` of ``load_model`` /
  ``from_pretrained`` / ``set_attn_implementation``; default ``"sdpa"``), so no flash-attn is needed;
* ``rope_theta`` / ``rope_scaling`` are stored as transformers-5 ``rope_parameters``;
* ``NaViLChatConfig.special_token_ids`` (optional) persists the special-token id map so that a model
  saved with :meth:`save_pretrained` reloads without a tokenizer.
"""
from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from navil_utils.constants import NAVIL_SCALE_DOWNSAMPLE_RATIO, merge_size_from_ratio
from navil_utils.errors import ConfigError

#: Architectures accepted in ``llm_config["architectures"][0]`` (the reference's dispatch keys).
INTERNLM2_VE_ARCHITECTURE = "InternLM2VEForCausalLM"
QWEN3_VE_ARCHITECTURE = "Qwen3VEForCausalLM"

# Keys of a checkpoint's sub-config dict that select an attention backend in the *reference* code.
# They are dropped on load: here the backend is a transformers choice (sdpa / eager / custom).
_REFERENCE_ATTENTION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal",
                             "_attn_implementation_autoset", "use_flash_attn")


class NaViLVisionConfig(PreTrainedConfig):
    """Any-resolution NaViL ViT (patch conv, 2-D RoPE, RMSNorm, layer scale, window attention).

    Fields mirror the reference ``NaViLVisionConfig``; ``num_channels``, ``image_size``,
    ``use_flash_attn``, ``attention_dropout`` and ``initializer_range`` are stored but unused.
    ``downsample_ratio`` is overwritten by the chat config (merge size ``m = int(1/ratio)``).

    ``qk_normalization=True`` (the reference default) crashes the reference ViT; here it is implemented
    with the intended InternViT semantics: ``q_norm``/``k_norm`` are RMSNorms over the full width ``D``
    applied to q and k *before* the split into heads.  No released checkpoint is known to use it, so it
    has no parity test against the reference.

    ``stem_channels`` (default ``None``: the reference's single patch convolution) is an extension of this
    workbook for small encoders trained from scratch; a checkpoint that uses it does not load in the reference.
    """

    model_type = "navil_vit"

    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    qkv_bias: bool = False
    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    num_hidden_layers: int = 48
    use_flash_attn: bool = True
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 0.1
    downsample_ratio: float = 1.0
    fullatt_block_indexes: list[int] | None = None
    window_size: int = 8
    # ``stem_channels`` is read with getattr (set only when given): configs without it serialise as before

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.validate_vision()

    def validate_vision(self) -> None:
        """Raise :class:`ConfigError` if the ViT hyper-parameters cannot build a model."""
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ConfigError(f"vision head dim {self.hidden_size // self.num_attention_heads} must be divisible "
                              "by 4 (2-D rotary embedding: half the rotated dims per axis)")
        if self.norm_type not in ("rms_norm", "layer_norm"):
            raise ConfigError(f"vision norm_type must be 'rms_norm' or 'layer_norm', got {self.norm_type!r}")
        try:
            merge_size_from_ratio(self.downsample_ratio)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.window_size < self.merge_size:
            raise ConfigError(f"window_size {self.window_size} is smaller than the merge size {self.merge_size}")
        stem = getattr(self, "stem_channels", None)
        if stem:
            if any(int(c) < 1 for c in stem) or self.patch_size % 2 ** len(stem):
                raise ConfigError(f"stem_channels {stem} need positive widths and a patch size "
                                  f"divisible by 2^{len(stem)} (patch_size {self.patch_size})")
        for idx in self.fullatt_block_indexes or []:
            if not 0 <= int(idx) < self.num_hidden_layers:
                raise ConfigError(f"fullatt_block_indexes entry {idx} is not a layer index "
                                  f"(num_hidden_layers={self.num_hidden_layers})")

    @property
    def merge_size(self) -> int:
        """``m``: side of the square of patches merged into one visual token (2 for ratio 0.5)."""
        return merge_size_from_ratio(self.downsample_ratio)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class _VELanguageConfig(PreTrainedConfig):
    """Fields and checks shared by the two modality-expert LLM configs."""

    def default_layer_types(self) -> list[str]:
        return ["full_attention"] * self.num_hidden_layers

    def to_dict(self) -> dict[str, Any]:
        """Serialise; ``layer_types`` is omitted when it is the one derived from the other fields, so that an
        edited copy (e.g. another ``num_hidden_layers``) stays consistent, and ``visual_experts`` when True."""
        output = super().to_dict()
        if output.get("layer_types") == self.default_layer_types():
            output.pop("layer_types")
        if output.get("visual_experts", True):  # the official format has no such field: experts always on
            output.pop("visual_experts", None)
        return output

    def _finish(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.layer_types is None:
            self.layer_types = self.default_layer_types()
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")


class InternLM2VEConfig(_VELanguageConfig):
    """InternLM2 decoder with modality experts (LLM of NaViL-2B).

    Reads the reference ``InternLM2Config`` fields.  ``rope_theta``/``rope_scaling``
    (``{"type": "linear"|"dynamic", "factor": f}``) become ``rope_parameters``.  The head dim is
    ``hidden_size // num_attention_heads``.  ``skip_final_norm_weight`` is stored and unused (as in the
    reference).
    """

    model_type = "navil_internlm2_ve"

    vocab_size: int = 103168
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    bias: bool = True
    rope_parameters: dict | None = None
    skip_final_norm_weight: bool = False
    layer_types: list[str] | None = None
    visual_experts: bool = True        # False: a dense LLM (ablation; no ``*_ve`` weights, every token on one path)

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._finish()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "dynamic"):
            raise ConfigError(f"InternLM2 supports rope_scaling types 'linear' and 'dynamic', got {rope_type!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Qwen3VEConfig(_VELanguageConfig):
    """Qwen3 decoder with modality experts (LLM of NaViL-9B).

    Reads the reference ``Qwen3VEConfig`` fields (``head_dim`` independent of ``hidden_size/heads``).
    Sliding-window attention follows the flash-attention semantics of the reference (the path the
    released model runs): layer ``i`` slides iff ``use_sliding_window`` and ``sliding_window`` is set and
    ``i >= max_window_layers``.  The reference's eager/SDPA fallback would apply ``sliding_window``
    whenever it is not None (quirk 15) — not replicated; the golden fixture and Qwen3-8B configs have
    ``sliding_window = null`` or ``use_sliding_window = false``.
    """

    model_type = "navil_qwen3_ve"

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    attention_dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    visual_experts: bool = True        # False: a dense LLM (ablation; no ``*_ve`` weights, every token on one path)

    def default_layer_types(self) -> list[str]:
        slides = self.use_sliding_window and self.sliding_window is not None
        return ["sliding_attention" if slides and i >= self.max_window_layers else "full_attention"
                for i in range(self.num_hidden_layers)]

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._finish()


#: ``llm_config["architectures"][0]`` → config class (the reference's dispatch table).
LLM_CONFIG_CLASSES: dict[str, type[_VELanguageConfig]] = {
    INTERNLM2_VE_ARCHITECTURE: InternLM2VEConfig,
    QWEN3_VE_ARCHITECTURE: Qwen3VEConfig,
}


def _llm_architecture_of(config: PreTrainedConfig) -> str:
    for arch, cls in LLM_CONFIG_CLASSES.items():
        if isinstance(config, cls):
            return arch
    raise ConfigError(f"llm_config of type {type(config).__name__} is not a NaViL LLM config "
                      f"(expected one of {sorted(c.__name__ for c in LLM_CONFIG_CLASSES.values())})")


def build_llm_config(llm_config: dict | PreTrainedConfig | None) -> _VELanguageConfig:
    """Turn a checkpoint's ``llm_config`` dict into :class:`InternLM2VEConfig` / :class:`Qwen3VEConfig`.

    Dispatch is on ``architectures[0]`` (like the reference); the dict's ``model_type`` is ignored and
    the reference's attention-backend keys are dropped.  Unknown architectures raise ConfigError.
    """
    if isinstance(llm_config, PreTrainedConfig):
        arch = _llm_architecture_of(llm_config)
        if not llm_config.architectures:
            llm_config.architectures = [arch]
        return llm_config
    if llm_config is None:
        llm_config = {"architectures": [INTERNLM2_VE_ARCHITECTURE]}
    if not isinstance(llm_config, dict):
        raise ConfigError(f"llm_config must be a dict or a config object, got {type(llm_config).__name__}")
    architectures = llm_config.get("architectures") or []
    if not architectures:
        raise ConfigError("llm_config has no 'architectures' entry; expected one of "
                          f"{sorted(LLM_CONFIG_CLASSES)}")
    arch = architectures[0]
    if arch not in LLM_CONFIG_CLASSES:
        raise ConfigError(f"unknown LLM architecture {arch!r} in llm_config['architectures']; "
                          f"supported: {sorted(LLM_CONFIG_CLASSES)}")
    kwargs = {k: v for k, v in llm_config.items() if k not in _REFERENCE_ATTENTION_KEYS and k != "model_type"}
    return LLM_CONFIG_CLASSES[arch](**kwargs)


def build_vision_config(vision_config: dict | PreTrainedConfig | None) -> NaViLVisionConfig:
    """Turn a checkpoint's ``vision_config`` dict into :class:`NaViLVisionConfig` (attention keys dropped)."""
    if isinstance(vision_config, NaViLVisionConfig):
        return vision_config
    if isinstance(vision_config, PreTrainedConfig):
        raise ConfigError(f"vision_config must be a NaViLVisionConfig, got {type(vision_config).__name__}")
    if vision_config is None:
        vision_config = {}
    if not isinstance(vision_config, dict):
        raise ConfigError(f"vision_config must be a dict, got {type(vision_config).__name__}")
    model_type = vision_config.get("model_type", NaViLVisionConfig.model_type)
    if model_type != NaViLVisionConfig.model_type:
        raise ConfigError(f"vision_config model_type {model_type!r} is not {NaViLVisionConfig.model_type!r}")
    kwargs = {k: v for k, v in vision_config.items()
              if k not in _REFERENCE_ATTENTION_KEYS and k != "model_type"}
    return NaViLVisionConfig(**kwargs)


class NaViLChatConfig(PreTrainedConfig):
    """Composite NaViL config (``model_type = "navil_chat"``): ``vision_config`` + ``llm_config`` + connector.

    Mirrors the reference ``NaViLChatConfig``: after construction ``vision_config.downsample_ratio`` is
    overwritten with the chat config's ``downsample_ratio``.  Dead reference fields (LoRA flags,
    ``pad2square``, ``select_layer``, ``ps_version``, ``force_image_size``) are stored only;
    ``template``, ``scale_downsample_ratio`` and ``min/max_dynamic_patch`` are consumed by the chat and
    preprocessing helpers.  ``special_token_ids`` (optional, not in the reference) maps the special-token
    strings to ids.
    """

    model_type = "navil_chat"
    sub_configs_defaults = {"vision_config": NaViLVisionConfig, "llm_config": InternLM2VEConfig}

    vision_config: dict | NaViLVisionConfig | None = None
    llm_config: dict | PreTrainedConfig | None = None
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    pad2square: bool = False
    select_layer: int = -1
    force_image_size: int | None = None
    downsample_ratio: float = 0.5
    template: str | None = None
    anyres_image_size: bool = True
    scale_downsample_ratio: float = NAVIL_SCALE_DOWNSAMPLE_RATIO
    ps_version: str = "v1"
    min_dynamic_patch: int = 256
    max_dynamic_patch: int = 24576
    special_token_ids: dict[str, int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.vision_config = build_vision_config(self.vision_config)
        self.llm_config = build_llm_config(self.llm_config)
        self.vision_config.downsample_ratio = self.downsample_ratio
        self.vision_config.validate_vision()
        if self.special_token_ids is not None:
            self.special_token_ids = {str(k): int(v) for k, v in self.special_token_ids.items()}
        super().__post_init__(**kwargs)

    @property
    def llm_architecture(self) -> str:
        """``"InternLM2VEForCausalLM"`` or ``"Qwen3VEForCausalLM"``."""
        return _llm_architecture_of(self.llm_config)

    @property
    def merge_size(self) -> int:
        return self.vision_config.merge_size

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """The LLM config (used by transformers for caches and generation defaults)."""
        return self.llm_config
