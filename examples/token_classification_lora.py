"""LoRA token classification with LayoutLM (text + layout), as PEFT's LayoutLM/FUNSD example, with peft_kernels.

PEFT's recipe: TaskType.TOKEN_CLS (the classifier head trains in full), r=16, alpha=16, dropout 0.1,
bias="all", and LoRA on the model type's default targets (query/value). Synthetic "documents": random words
on a page, each with its bounding box; a word's label is where it sits (header, body, footer), so the model
must read the layout input. Then: save, reload onto a fresh base model, check identical logits, merge.

    python examples/token_classification_lora.py            # tiny random LayoutLM from a config
    python examples/token_classification_lora.py --smoke    # 3 steps
    python examples/token_classification_lora.py --model-path /path/to/layoutlm-base-uncased
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForTokenClassification, LayoutLMConfig, LayoutLMForTokenClassification

from peft_kernels import LoraConfig, PeftModel, TaskType, get_peft_model

LABELS = ["header", "body", "footer"]  # top 20% of the page, middle, bottom 20%


def base_model(model_path):
    if model_path:
        return AutoModelForTokenClassification.from_pretrained(
            model_path, num_labels=len(LABELS), ignore_mismatched_sizes=True, local_files_only=True
        )
    torch.manual_seed(0)
    config = LayoutLMConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=len(LABELS),
    )
    return LayoutLMForTokenClassification(config)


def documents(n, length, vocab_size, gen):
    """input_ids, bbox (x0, y0, x1, y1) on a 0..1000 page, attention_mask (a padded tail), labels (-100: pad)."""
    ids = torch.randint(5, vocab_size, (n, length), generator=gen)
    lines = torch.randint(0, 20, (n, length), generator=gen)  # 20 text lines, 50 units apart
    x0 = torch.randint(0, 800, (n, length), generator=gen)
    width = torch.randint(20, 200, (n, length), generator=gen)
    y0 = lines * 50
    bbox = torch.stack([x0, y0, x0 + width, y0 + 40], dim=-1)
    labels = torch.where(y0 < 200, 0, torch.where(y0 >= 800, 2, 1))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[n // 2 :, -3:] = 0  # half the documents are shorter
    labels[mask == 0] = -100
    return {"input_ids": ids, "bbox": bbox, "attention_mask": mask}, labels


def token_accuracy(model, inputs, labels):
    model.eval()
    with torch.no_grad():
        pred = model(**inputs).logits.argmax(-1)
    keep = labels != -100
    return (pred[keep] == labels[keep]).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="a local LayoutLM checkpoint (default: tiny random)")
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
    vocab_size = base.config.vocab_size
    config = LoraConfig(task_type=TaskType.TOKEN_CLS, r=16, lora_alpha=16, lora_dropout=0.1, bias="all")
    model = get_peft_model(base, config).to(args.device)
    model.print_trainable_parameters()

    def to_device(batch):
        inputs, labels = batch
        return {k: v.to(args.device) for k, v in inputs.items()}, labels.to(args.device)

    gen = torch.Generator().manual_seed(0)
    eval_inputs, eval_labels = to_device(documents(32, 16, vocab_size, gen))
    print(f"token accuracy before: {token_accuracy(model, eval_inputs, eval_labels):.2f}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    for step in range(1, args.steps + 1):
        model.train()
        inputs, labels = to_device(documents(args.batch_size, 16, vocab_size, gen))
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"token accuracy after {args.steps} LoRA steps: {token_accuracy(model, eval_inputs, eval_labels):.2f}")

    out = args.out or tempfile.mkdtemp(prefix="lora-layoutlm-")
    model.save_pretrained(out)  # bias="all": every bias of the model is part of the adapter checkpoint
    with torch.no_grad():
        expected = model(**eval_inputs).logits
        reloaded = PeftModel.from_pretrained(base_model(args.model_path), out).to(args.device).eval()
        same = torch.equal(reloaded(**eval_inputs).logits, expected)
        merged = reloaded.merge_and_unload()
        merged_ok = torch.allclose(merged(**eval_inputs).logits, expected, atol=1e-4, rtol=1e-4)
    print(f"adapter saved to {out}; reloaded adapter gives identical predictions: {same}")
    print(f"merged model matches: {merged_ok}")
    if not (same and merged_ok):
        raise SystemExit("reloaded or merged model does not reproduce the trained one")


if __name__ == "__main__":
    main()
