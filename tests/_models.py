"""Tiny transformers models built from configs with random weights (no hub), and matching inputs.

Every model: hidden 32, 2 layers, 4 heads, vocab 100, special token ids inside the vocab. ``make_model`` is
deterministic for a given seed, so two calls give identical weights (used to compare with real PEFT).
"""

from __future__ import annotations

import torch
import transformers as tf

SMALL = dict(vocab_size=100)


def _text_configs():
    return {
        "gpt2": (
            tf.GPT2Config(
                n_layer=2, n_head=4, n_embd=32, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, **SMALL
            ),
            tf.GPT2LMHeadModel,
            "CAUSAL_LM",
        ),
        "opt": (
            tf.OPTConfig(
                num_hidden_layers=2,
                num_attention_heads=4,
                hidden_size=32,
                ffn_dim=64,
                word_embed_proj_dim=32,
                max_position_embeddings=64,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
                **SMALL,
            ),
            tf.OPTForCausalLM,
            "CAUSAL_LM",
        ),
        "bloom": (
            tf.BloomConfig(
                n_layer=2, n_head=4, hidden_size=32, bos_token_id=1, eos_token_id=2, pad_token_id=0, **SMALL
            ),
            tf.BloomForCausalLM,
            "CAUSAL_LM",
        ),
        "gpt_neo": (
            tf.GPTNeoConfig(
                num_layers=2,
                num_heads=4,
                hidden_size=32,
                attention_types=[[["global", "local"], 1]],
                max_position_embeddings=64,
                bos_token_id=1,
                eos_token_id=2,
                **SMALL,
            ),
            tf.GPTNeoForCausalLM,
            "CAUSAL_LM",
        ),
        "gptj": (
            tf.GPTJConfig(
                n_layer=2,
                n_head=4,
                n_embd=32,
                rotary_dim=4,
                n_positions=64,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
                **SMALL,
            ),
            tf.GPTJForCausalLM,
            "CAUSAL_LM",
        ),
        "gpt_neox": (
            tf.GPTNeoXConfig(
                num_hidden_layers=2,
                num_attention_heads=4,
                hidden_size=32,
                intermediate_size=64,
                max_position_embeddings=64,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
                **SMALL,
            ),
            tf.GPTNeoXForCausalLM,
            "CAUSAL_LM",
        ),
        "llama": (
            tf.LlamaConfig(
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                hidden_size=32,
                intermediate_size=64,
                max_position_embeddings=64,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
                **SMALL,
            ),
            tf.LlamaForCausalLM,
            "CAUSAL_LM",
        ),
        "t5": (
            tf.T5Config(
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                d_model=32,
                d_kv=8,
                d_ff=64,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
                **SMALL,
            ),
            tf.T5ForConditionalGeneration,
            "SEQ_2_SEQ_LM",
        ),
        "bart": (
            tf.BartConfig(
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                d_model=32,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=64,
                bos_token_id=0,
                pad_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=2,
                forced_eos_token_id=None,
                **SMALL,
            ),
            tf.BartForConditionalGeneration,
            "SEQ_2_SEQ_LM",
        ),
        "bert": (
            tf.BertConfig(
                num_hidden_layers=2,
                num_attention_heads=4,
                hidden_size=32,
                intermediate_size=64,
                max_position_embeddings=64,
                pad_token_id=0,
                num_labels=3,
                **SMALL,
            ),
            tf.BertForSequenceClassification,
            "SEQ_CLS",
        ),
        "roberta": (
            tf.RobertaConfig(
                num_hidden_layers=2,
                num_attention_heads=4,
                hidden_size=32,
                intermediate_size=64,
                max_position_embeddings=70,
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
                num_labels=3,
                **SMALL,
            ),
            tf.RobertaForSequenceClassification,
            "SEQ_CLS",
        ),
        "deberta-v2": (
            tf.DebertaV2Config(
                num_hidden_layers=2,
                num_attention_heads=4,
                hidden_size=32,
                intermediate_size=64,
                max_position_embeddings=64,
                pad_token_id=0,
                num_labels=3,
                **SMALL,
            ),
            tf.DebertaV2ForSequenceClassification,
            "SEQ_CLS",
        ),
        "vit": (
            tf.ViTConfig(
                num_hidden_layers=2,
                num_attention_heads=4,
                hidden_size=32,
                intermediate_size=64,
                image_size=16,
                patch_size=8,
                num_channels=3,
                num_labels=3,
            ),
            tf.ViTForImageClassification,
            None,
        ),
    }


FAMILIES = list(_text_configs())
# Families whose model_type has no default LoRA target in PEFT's table: tests pass targets explicitly.
EXPLICIT_TARGETS = {"vit": ["q_proj", "v_proj"]}
# Classification heads trained in full (PEFT's examples use modules_to_save for ViT's classifier).
MODULES_TO_SAVE = {"vit": ["classifier"]}


def make_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model in eval mode, task_type) for ``family``; the same seed gives the same weights."""
    config, cls, task = _text_configs()[family]
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    model.eval()
    return model, task


def make_inputs(family: str, batch: int = 2, seq: int = 5, seed: int = 1) -> dict:
    """Model inputs with a padded row (attention_mask has a 0) where the model takes a mask."""
    gen = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}
    input_ids = torch.randint(3, 100, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[-1, 0] = 0  # one left-padded position
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    _, _, task = _text_configs()[family]
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = torch.randint(3, 100, (batch, 3), generator=gen)
    return inputs


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


class MLP(torch.nn.Module):
    """PEFT's ``test_custom_models`` MLP: lin0 (10->20), ReLU, Dropout(0.5), lin1 (20->2), LogSoftmax."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = torch.nn.Linear(10, 20, bias=bias)
        self.relu = torch.nn.ReLU()
        self.drop = torch.nn.Dropout(0.5)
        self.lin1 = torch.nn.Linear(20, 2, bias=bias)
        self.sm = torch.nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


class EmbMLP(torch.nn.Module):
    """An embedding followed by PEFT's MLP head, for LoRA on nn.Embedding."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 10)
        self.lin0 = torch.nn.Linear(10, 20)
        self.lin1 = torch.nn.Linear(20, 2)

    def forward(self, X):
        return self.lin1(torch.relu(self.lin0(self.emb(X)))).mean(1)


def make_mlp(seed: int = 0, **kwargs) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kwargs).eval()
