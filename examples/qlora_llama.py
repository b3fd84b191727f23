"""QLoRA: LoRA on a 4-bit (NF4, double-quantized) Llama, as PEFT's QLoRA recipe, importing peft_kernels.

The recipe: load with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...), prepare_model_for_kbit_training, LoRA r=16 on every
linear projection. Every LoRA layer over a bnb Linear4bit runs peft_kernels' 4-bit op (the NF4 codes decoded in
row chunks on CPU, inside the GEMM with Triton on a GPU; never a dequantized copy of the weight). The task: learn
to continue a fixed token pattern. Then: save the adapter, reload it onto a fresh 4-bit base, check identical
logits; merge into the 4-bit weights (re-quantized, with PEFT's rounding warning) and compare.

    python examples/qlora_llama.py            # tiny random Llama from a config, saved and reloaded in 4-bit
    python examples/qlora_llama.py --smoke    # 3 steps
    python examples/qlora_llama.py --model-path /path/to/llama --device cuda
"""

import argparse
import importlib.util
import sys
import tempfile
import warnings

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from peft_kernels import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training


def tiny_llama_dir() -> str:
    """A tiny random Llama saved to a temporary folder, so that it loads in 4-bit like a real checkpoint."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    path = tempfile.mkdtemp(prefix="tiny_llama_")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_4bit(path: str, device: str):
    compute_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="3 steps")
    parser.add_argument("--out", default=None, help="where the adapter is saved (default: a temporary folder)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("bitsandbytes") is None:
        print("this example needs bitsandbytes (pip install bitsandbytes)")
        return 1
    steps = 3 if args.smoke else args.steps
    path = args.model_path or tiny_llama_dir()

    model = prepare_model_for_kbit_training(load_4bit(path, args.device), use_gradient_checkpointing=False)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    print(f"q_proj is {type(layer).__module__}.{type(layer).__name__} over {type(layer.base_layer).__name__}")

    vocab = model.config.vocab_size
    ids = (torch.arange(4 * 16).reshape(4, 16) * 7 % (vocab - 3) + 3).to(args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"step {step}: loss {loss.item():.4f}")

    out = args.out or tempfile.mkdtemp(prefix="qlora_adapter_")
    model.save_pretrained(out)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_4bit(path, args.device), out)
        same = torch.equal(reloaded(input_ids=ids).logits, expected)
        print(f"identical predictions: {same}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = model.merge_and_unload()
        rounding = any("rounding errors" in str(w.message) for w in caught)
        gap = (merged(input_ids=ids).logits.softmax(-1) - expected.softmax(-1)).abs().max().item()
        # Merging re-quantizes W + ΔW to 4 bits: probabilities move by 4-bit rounding noise, not more.
        print(f"merged into the 4-bit weights (rounding warned: {rounding}); max probability change {gap:.2e}")
        print(f"merged model matches: {gap < 5e-2}")
    return 0 if same and gap < 5e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
