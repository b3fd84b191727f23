"""File names and per-architecture defaults, as PEFT 0.21.2 defines them (checkpoint-format facts)."""

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.bin"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
# The literal that selects every linear layer but the output head.
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
# Layer names whose full weights are saved when targeted (PEFT's EMBEDDING_LAYER_NAMES).
EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]
# Names of classification heads that SEQ_CLS / TOKEN_CLS models train in full.
SEQ_CLS_HEAD_NAMES = ["classifier", "score"]
QA_HEAD_NAMES = ["qa_outputs"]

# model_type -> default LoRA target modules (PEFT's table; a str is a regex, a list is suffix-matched).
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

# PEFT 0.21 on transformers 5 has no prefix post-processing left; kept because users import the name.
TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING: dict = {}


def bloom_model_postprocess_past_key_value(past_key_values):
    """Kept for import compatibility; transformers 5 Bloom uses the standard cache layout, so this is identity."""
    return past_key_values


# Injection condenses a target_modules list at least this long to its minimal suffix set (PEFT's constant).
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20
DUMMY_MODEL_CONFIG = {"model_type": "custom"}
