"""LoRA on an 8-bit Whisper (bitsandbytes int8 base), as PEFT's int8 Whisper notebook, importing peft_kernels.

PEFT's recipe: load the model with BitsAndBytesConfig(load_in_8bit=True), prepare_model_for_kbit_training,
LoRA r=32, alpha=64, dropout 0.05 on q_proj/v_proj. The LoRA layers over the int8 projections run
peft_kernels' W8A16 op. Synthetic speech: log-mel features with one loud frequency band; the "transcript" is
that band's token. Then: save the adapter, reload it onto a fresh int8 base, check identical logits.

    python examples/whisper_int8_lora.py            # tiny random Whisper from a config, saved and reloaded in int8
    python examples/whisper_int8_lora.py --smoke    # 3 steps
    python examples/whisper_int8_lora.py --model-path /path/to/whisper-small
"""

import argparse
import importlib.util
import logging
import sys
import tempfile

import torch
from transformers import BitsAndBytesConfig, WhisperConfig, WhisperForConditionalGeneration

from peft_kernels import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training


def tiny_whisper_dir():
    """A tiny random Whisper saved to a temporary folder, so that it loads in 8-bit like a real checkpoint."""
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=100,
        num_mel_bins=8,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        d_model=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=16,  # the encoder takes exactly 2·16 feature frames
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        # Whisper's pretraining init (std 0.02) leaves a frozen random model too flat for an adapter to steer
        # its tied output head within a few steps; std 0.2 gives it features LoRA can use.
        init_std=0.2,
    )
    model = WhisperForConditionalGeneration(config)
    path = tempfile.mkdtemp(prefix="tiny-whisper-")
    model.save_pretrained(path)
    return path


def load_int8(path, device):
    model = WhisperForConditionalGeneration.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        device_map={"": device},
        local_files_only=True,
    )
    return model.eval()


def utterances(n, config, gen):
    """Features (N, mels, frames) with one loud band k; labels (N, 2) = [token of k, eos]."""
    mels, frames = config.num_mel_bins, 2 * config.max_source_positions
    bands = torch.randint(0, mels, (n,), generator=gen)
    features = 0.1 * torch.randn(n, mels, frames, generator=gen)
    features[torch.arange(n), bands] += 10.0
    labels = torch.stack([bands + 3, torch.full_like(bands, config.eos_token_id)], dim=1)
    return features, labels


def first_token_accuracy(model, features, labels):
    """Teacher-forced: does the decoder's first prediction name the loud band?"""
    model.eval()
    with torch.no_grad():
        logits = model(input_features=features, labels=labels).logits
    return (logits[:, 0].argmax(-1) == labels[:, 0]).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="a local Whisper checkpoint (default: tiny random)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--smoke", action="store_true", help="3 steps, small batches: checks the pipeline runs")
    parser.add_argument("--out", default=None, help="where to save the adapter (default: a temporary folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch_size = 3, 4
    if importlib.util.find_spec("bitsandbytes") is None:
        print("skipped: bitsandbytes is not installed (pip install bitsandbytes)", file=sys.stderr)
        return

    # bitsandbytes logs a warning on every int8 matmul of the layers without LoRA (fp32 inputs go through fp16).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    path = args.model_path or tiny_whisper_dir()
    base = load_int8(path, args.device)
    assert base.is_loaded_in_8bit
    # Casts the non-int8 parameters to fp32 and freezes the base; gradient checkpointing is not needed here.
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    config = LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, bias="none")
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    gen = torch.Generator().manual_seed(0)
    eval_features, eval_labels = (t.to(args.device) for t in utterances(32, base.config, gen))
    print(f"first-token accuracy before: {first_token_accuracy(model, eval_features, eval_labels):.2f}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    for step in range(1, args.steps + 1):
        model.train()
        features, labels = (t.to(args.device) for t in utterances(args.batch_size, base.config, gen))
        loss = model(input_features=features, labels=labels).loss  # decoder inputs: labels shifted right
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    acc = first_token_accuracy(model, eval_features, eval_labels)
    print(f"first-token accuracy after {args.steps} LoRA steps: {acc:.2f}")

    out = args.out or tempfile.mkdtemp(prefix="lora-whisper-int8-")
    model.save_pretrained(out)
    with torch.no_grad():
        expected = model(input_features=eval_features, labels=eval_labels).logits
        reloaded = PeftModel.from_pretrained(load_int8(path, args.device), out).eval()
        same = torch.equal(reloaded(input_features=eval_features, labels=eval_labels).logits, expected)
    print(f"adapter saved to {out}; reloaded adapter gives identical predictions: {same}")
    # merge_and_unload() also works on int8 bases, but re-quantizes W + ΔW: outputs then move by int8 rounding.
    if not same:
        raise SystemExit("reloaded model does not reproduce the trained one")


if __name__ == "__main__":
    main()
