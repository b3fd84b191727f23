"""LoRA with peft_kernels under DeepSpeed ZeRO-3, through transformers' Trainer (as in PEFT's README).

Base weights and the adapter are partitioned over the processes; Trainer checkpoints hold only the adapter
(adapter_model.safetensors + adapter_config.json). The model is a tiny Llama built from a config (random weights,
no download) trained on a synthetic "count up" task; swap in ``AutoModelForCausalLM.from_pretrained`` for real use
(create ``TrainingArguments`` first, so that transformers loads the weights already partitioned).

    deepspeed --num_gpus 2 examples/deepspeed_zero3.py
    accelerate launch --use_deepspeed --deepspeed_config_file examples/deepspeed_zero3.json --num_processes 2 \\
        examples/deepspeed_zero3.py
    # CPU only (DeepSpeed's CPU accelerator, gloo): DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_zero3.py --cpu

Under ZeRO-3 DeepSpeed gathers each module's weights in that module's own forward hooks, so the LoRA layers see
hooked base and A/B layers and run PEFT's eager formula instead of the fused op (correct, not faster); ZeRO-1/2
and DDP/FSDP keep the fused path.
"""

import argparse
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from peft_kernels import LoraConfig, PeftModel, TaskType, get_peft_model

HERE = os.path.dirname(os.path.abspath(__file__))


class CountUp(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary: the next token is always previous + 1."""

    def __init__(self, size: int = 64, length: int = 12):
        start = torch.randint(3, 64, (size, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (start + torch.arange(length)) % 61 + 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def base_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
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
    return LlamaForCausalLM(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/peft-kernels-zero3")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="run on CPU (DS_ACCELERATOR=cpu)")
    args = parser.parse_args()

    # TrainingArguments first: with a ZeRO-3 config it makes from_pretrained / model construction partitioned.
    training_args = TrainingArguments(
        output_dir=args.out,
        deepspeed=os.path.join(HERE, "deepspeed_zero3.json"),
        per_device_train_batch_size=4,
        max_steps=args.steps,
        save_steps=args.steps,
        logging_steps=5,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=args.cpu,
    )
    torch.manual_seed(0)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base_model(), lora)
    model.print_trainable_parameters()
    trainer = Trainer(model=model, args=training_args, train_dataset=CountUp())
    trainer.train()
    trainer.save_model(args.out)  # adapter only, gathered from the partitions by Trainer

    if training_args.process_index == 0:
        print("saved:", sorted(os.listdir(args.out)))
        reloaded = PeftModel.from_pretrained(base_model(), args.out)
        print("reloaded adapter:", type(reloaded).__name__, reloaded.active_adapter)


if __name__ == "__main__":
    main()
