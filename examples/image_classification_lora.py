"""LoRA image classification with ViT, as PEFT's examples/image_classification, importing peft_kernels.

LoRA on the attention query/value projections, the classifier head trained in full (modules_to_save), on a
synthetic task (which colour channel of a noisy image is brightest). Then: save the adapter, reload it onto a fresh base
model, check the predictions are identical, and merge it into the weights for inference.

    python examples/image_classification_lora.py            # tiny random ViT from a config, seconds on CPU
    python examples/image_classification_lora.py --smoke    # 3 steps
    python examples/image_classification_lora.py --model-path /path/to/vit-base-patch16-224-in21k
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from peft_kernels import LoraConfig, PeftModel, get_peft_model

NUM_LABELS = 3  # red, green, blue


def base_model(model_path):
    if model_path:
        # A new 3-way head replaces the checkpoint's (randomly initialized; trained in full below).
        return AutoModelForImageClassification.from_pretrained(
            model_path, num_labels=NUM_LABELS, ignore_mismatched_sizes=True, local_files_only=True
        )
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=NUM_LABELS,
    )
    return ViTForImageClassification(config)


def attention_targets(model):
    # transformers 5 names ViT's query/value projections q_proj/v_proj; older versions "query"/"value".
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]


def colour_batch(n, config, gen):
    """Noise images with one colour channel brighter than the others; the label is that channel (0..2)."""
    size = config.image_size
    labels = torch.randint(0, NUM_LABELS, (n,), generator=gen)
    images = torch.randn(n, 3, size, size, generator=gen)
    images[torch.arange(n), labels] += 0.5
    return images, labels


def accuracy(model, images, labels):
    model.eval()
    with torch.no_grad():
        return (model(pixel_values=images).logits.argmax(-1) == labels).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="a local ViT checkpoint (default: tiny random model)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--smoke", action="store_true", help="3 steps, small batches: checks the pipeline runs")
    parser.add_argument("--out", default=None, help="where to save the adapter (default: a temporary folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch_size = 3, 4

    base = base_model(args.model_path)
    # PEFT's image-classification recipe: r=16, alpha=16, dropout 0.1, the new head trained in full.
    config = LoraConfig(
        r=16,
        lora_alpha=16,
        target_modules=attention_targets(base),
        lora_dropout=0.1,
        bias="none",
        modules_to_save=["classifier"],
    )
    model = get_peft_model(base, config).to(args.device)
    model.print_trainable_parameters()

    gen = torch.Generator().manual_seed(0)
    eval_images, eval_labels = (t.to(args.device) for t in colour_batch(4 * args.batch_size, base.config, gen))
    print(f"accuracy before: {accuracy(model, eval_images, eval_labels):.2f}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    for step in range(1, args.steps + 1):
        model.train()
        images, labels = (t.to(args.device) for t in colour_batch(args.batch_size, base.config, gen))
        loss = model(pixel_values=images, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"accuracy after {args.steps} LoRA steps: {accuracy(model, eval_images, eval_labels):.2f}")

    out = args.out or tempfile.mkdtemp(prefix="lora-vit-")
    model.save_pretrained(out)
    with torch.no_grad():
        expected = model(pixel_values=eval_images).logits
        reloaded = PeftModel.from_pretrained(base_model(args.model_path), out).to(args.device).eval()
        same = torch.equal(reloaded(pixel_values=eval_images).logits, expected)
        merged = reloaded.merge_and_unload()  # a plain ViT again, LoRA folded into W
        merged_ok = torch.allclose(merged(pixel_values=eval_images).logits, expected, atol=1e-4, rtol=1e-4)
    print(f"adapter saved to {out}; reloaded adapter gives identical predictions: {same}")
    print(f"merged model matches: {merged_ok}")
    if not (same and merged_ok):
        raise SystemExit("reloaded or merged model does not reproduce the trained one")


if __name__ == "__main__":
    main()
