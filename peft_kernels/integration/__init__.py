"""Optional integrations, imported explicitly (``import peft_kernels`` imports only ``trainer``'s import hook).

``hf_peft``  Hugging Face ``peft`` models: patch their LoRA layers onto the fused path, convert whole models.
``trainer``  transformers ``Trainer``: treat a peft_kernels ``PeftModel`` as a PEFT model (adapter-only
             checkpoints, resume by ``load_adapter``).
"""
