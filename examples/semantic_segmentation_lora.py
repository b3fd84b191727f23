"""LoRA semantic segmentation with SegFormer, as PEFT's examples/semantic_segmentation, importing peft_kernels.

PEFT's recipe: LoRA on the attention query/value projections, bias="lora_only" (the targeted layers' biases
train too), the decode head trained in full (modules_to_save). Synthetic task: segment the bright square in a
noisy image. Then: save, reload onto a fresh base model, check identical logits, merge for inference.

    python examples/semantic_segmentation_lora.py            # tiny random SegFormer from a config
    python examples/semantic_segmentation_lora.py --smoke    # 3 steps
    python examples/semantic_segmentation_lora.py --model-path /path/to/mit-b0
"""

import argparse
import tempfile

import torch
import torch.nn.functional as F
from transformers import AutoModelForSemanticSegmentation, SegformerConfig, SegformerForSemanticSegmentation

from peft_kernels import LoraConfig, PeftModel, get_peft_model

NUM_LABELS = 2  # background, square


def base_model(model_path):
    if model_path:
        return AutoModelForSemanticSegmentation.from_pretrained(
            model_path, num_labels=NUM_LABELS, ignore_mismatched_sizes=True, local_files_only=True
        )
    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[3, 3],
        strides=[2, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=32,
        num_labels=NUM_LABELS,
    )
    return SegformerForSemanticSegmentation(config)


def attention_targets(model):
    # transformers 5 names SegFormer's query/value projections q_proj/v_proj; older versions "query"/"value".
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]


def square_batch(n, size, gen):
    """Noise images with one bright square of random size and place; the mask marks the square (label 1)."""
    images = 0.5 * torch.randn(n, 3, size, size, generator=gen)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        side = int(torch.randint(size // 4, size // 2, (1,), generator=gen))
        top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=gen))
        images[i, :, top : top + side, left : left + side] += 1.0
        masks[i, top : top + side, left : left + side] = 1
    return images, masks


def square_iou(model, images, masks):
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=images).logits  # (N, labels, H/4, W/4)
        pred = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
    inter = ((pred == 1) & (masks == 1)).sum().item()
    union = ((pred == 1) | (masks == 1)).sum().item()
    return inter / max(union, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="a local SegFormer checkpoint (default: tiny random)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--smoke", action="store_true", help="3 steps, small batches: checks the pipeline runs")
    parser.add_argument("--out", default=None, help="where to save the adapter (default: a temporary folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch_size = 3, 2

    base = base_model(args.model_path)
    config = LoraConfig(
        r=32,
        lora_alpha=32,
        target_modules=attention_targets(base),
        lora_dropout=0.1,
        bias="lora_only",
        modules_to_save=["decode_head"],
    )
    model = get_peft_model(base, config).to(args.device)
    model.print_trainable_parameters()

    gen = torch.Generator().manual_seed(0)
    eval_images, eval_masks = (t.to(args.device) for t in square_batch(16, args.image_size, gen))
    print(f"square IoU before: {square_iou(model, eval_images, eval_masks):.2f}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    for step in range(1, args.steps + 1):
        model.train()
        images, masks = (t.to(args.device) for t in square_batch(args.batch_size, args.image_size, gen))
        loss = model(pixel_values=images, labels=masks).loss  # logits upsampled to the mask size inside
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"square IoU after {args.steps} LoRA steps: {square_iou(model, eval_images, eval_masks):.2f}")

    out = args.out or tempfile.mkdtemp(prefix="lora-segformer-")
    model.save_pretrained(out)
    with torch.no_grad():
        expected = model(pixel_values=eval_images).logits
        reloaded = PeftModel.from_pretrained(base_model(args.model_path), out).to(args.device).eval()
        same = torch.equal(reloaded(pixel_values=eval_images).logits, expected)
        merged = reloaded.merge_and_unload()
        merged_ok = torch.allclose(merged(pixel_values=eval_images).logits, expected, atol=1e-4, rtol=1e-4)
    print(f"adapter saved to {out}; reloaded adapter gives identical predictions: {same}")
    print(f"merged model matches: {merged_ok}")
    if not (same and merged_ok):
        raise SystemExit("reloaded or merged model does not reproduce the trained one")


if __name__ == "__main__":
    main()
