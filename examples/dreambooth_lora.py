"""DreamBooth with LoRA on Stable Diffusion's UNet and CLIP text encoder, as PEFT's examples/lora_dreambooth.

Both models get a LoRA adapter (UNet: attention projections to_q/to_k/to_v/to_out.0, and with --lora-convs
its ResNet 3×3 convolutions and 1×1 proj_in/proj_out as well; text encoder: q_proj/v_proj). Training is the
DreamBooth denoising loss on a few generated instance images (a red disc, prompt "a photo of sks disc"):
VAE-encode, add noise at a random timestep, predict the noise from the prompt. Then: save both adapters,
reload them onto fresh models, check identical predictions, merge them and sample one image.

    python examples/dreambooth_lora.py                 # tiny random UNet/VAE/CLIP from configs, CPU seconds
    python examples/dreambooth_lora.py --smoke         # 3 steps
    python examples/dreambooth_lora.py --model-path /path/to/stable-diffusion-v1-5   # a local diffusers folder
"""

import argparse
import importlib.util
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

from peft_kernels import LoraConfig, PeftModel, get_peft_model

PROMPT = "a photo of sks disc"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_CONV_TARGETS = ["conv1", "conv2", "proj_in", "proj_out"]  # 3×3 resnet convs; 1×1 (SD 1.x) projections
TEXT_TARGETS = ["q_proj", "v_proj"]


class Tiny:
    """Tiny random Stable Diffusion parts built from configs (deterministic: the same weights on every call)."""

    resolution = 16

    @staticmethod
    def unet():
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,
            norm_num_groups=8,
        )

    @staticmethod
    def text_encoder():
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(1)
        config = CLIPTextConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        return CLIPTextModel(config)

    @staticmethod
    def vae():
        from diffusers import AutoencoderKL

        torch.manual_seed(2)
        return AutoencoderKL(
            block_out_channels=(8, 16),  # one downsampling: 16×16 images → 8×8 latents
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
        )

    @staticmethod
    def tokenize(prompt, n):
        # No tokenizer files for a random model: a fixed id per word between bos (1) and eos (2), padded with 0.
        words = [3 + sum(map(ord, w)) % 97 for w in prompt.split()]
        ids = ([1] + words + [2] + [0] * 16)[:16]
        return torch.tensor([ids] * n)

    @staticmethod
    def scheduler():
        from diffusers import DDPMScheduler

        return DDPMScheduler(num_train_timesteps=1000)


class Pretrained:
    """The same parts from a local diffusers Stable Diffusion folder (unet/, text_encoder/, vae/, tokenizer/, …)."""

    resolution = 512

    def __init__(self, path):
        self.path = path

    def _load(self, cls, subfolder):
        return cls.from_pretrained(self.path, subfolder=subfolder, local_files_only=True)

    def unet(self):
        from diffusers import UNet2DConditionModel

        return self._load(UNet2DConditionModel, "unet")

    def text_encoder(self):
        from transformers import CLIPTextModel

        return self._load(CLIPTextModel, "text_encoder")

    def vae(self):
        from diffusers import AutoencoderKL

        return self._load(AutoencoderKL, "vae")

    def tokenize(self, prompt, n):
        from transformers import CLIPTokenizer

        tokenizer = self._load(CLIPTokenizer, "tokenizer")
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        return torch.tensor([ids.input_ids] * n)

    def scheduler(self):
        from diffusers import DDPMScheduler

        return self._load(DDPMScheduler, "scheduler")


def instance_images(n, size, gen):
    """The DreamBooth subject: a red disc at a random place on a dim noisy background, pixels in [-1, 1]."""
    images = 0.2 * torch.randn(n, 3, size, size, generator=gen) - 0.5
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        cy, cx = (int(v) for v in torch.randint(size // 4, 3 * size // 4, (2,), generator=gen))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 4) ** 2
        images[i, 0][disc], images[i, 1][disc], images[i, 2][disc] = 1.0, -1.0, -1.0
    return images.clamp(-1, 1)


def denoising_loss(unet, text_encoder, vae, scheduler, images, input_ids, gen):
    """DreamBooth's objective: predict the noise added to the image latents at a random timestep."""
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(generator=gen) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    steps = steps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, steps)
    prompt_states = text_encoder(input_ids)[0]
    pred = unet(noisy, steps, prompt_states).sample
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, steps)
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def sample(unet, text_encoder, vae, scheduler, input_ids, latent_shape, steps, gen):
    """Plain ancestral sampling (no classifier-free guidance): noise → latents → VAE decode, pixels in [-1, 1]."""
    scheduler.set_timesteps(steps)
    latents = torch.randn(latent_shape, generator=gen).to(input_ids.device) * scheduler.init_noise_sigma
    prompt_states = text_encoder(input_ids)[0]
    for t in scheduler.timesteps:
        noise_pred = unet(scheduler.scale_model_input(latents, t), t, prompt_states).sample
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="a local diffusers SD folder (default: tiny random)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-convs", action="store_true", help="LoRA on the UNet's convolutions too (LoCon)")
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="3 steps, small batches: checks the pipeline runs")
    parser.add_argument("--out", default=None, help="where to save the adapters (default: a temporary folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.sample_steps = 3, 2, 2
    if importlib.util.find_spec("diffusers") is None:
        print("skipped: diffusers is not installed (pip install diffusers)", file=sys.stderr)
        return

    parts = Pretrained(args.model_path) if args.model_path else Tiny()
    vae, scheduler = parts.vae().to(args.device).eval(), parts.scheduler()
    vae.requires_grad_(False)
    # PEFT's DreamBooth example: r=8, alpha=32, no dropout, no bias, for both models.
    unet_targets = UNET_TARGETS + (UNET_CONV_TARGETS if args.lora_convs else [])
    unet = get_peft_model(parts.unet(), LoraConfig(r=8, lora_alpha=32, target_modules=unet_targets))
    text_encoder = get_peft_model(parts.text_encoder(), LoraConfig(r=8, lora_alpha=32, target_modules=TEXT_TARGETS))
    unet.to(args.device).print_trainable_parameters()
    text_encoder.to(args.device).print_trainable_parameters()

    gen = torch.Generator().manual_seed(0)
    images = instance_images(4, parts.resolution, gen).to(args.device)
    input_ids = parts.tokenize(PROMPT, args.batch_size).to(args.device)
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    unet.train(), text_encoder.train()
    for step in range(1, args.steps + 1):
        batch = images[torch.randint(0, len(images), (args.batch_size,), generator=gen)]
        loss = denoising_loss(unet, text_encoder, vae, scheduler, batch, input_ids, gen)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    # PEFT's DreamBooth layout: one adapter folder per model.
    out = args.out or tempfile.mkdtemp(prefix="lora-dreambooth-")
    unet.save_pretrained(os.path.join(out, "unet"))
    text_encoder.save_pretrained(os.path.join(out, "text_encoder"))
    unet.eval(), text_encoder.eval()
    with torch.no_grad():
        latents = torch.randn(2, unet.config.in_channels, *(2 * [unet.config.sample_size]), generator=gen)
        latents, t = latents.to(args.device), torch.tensor([10, 500], device=args.device)
        expected = unet(latents, t, text_encoder(input_ids[:2])[0]).sample
        unet2 = PeftModel.from_pretrained(parts.unet(), os.path.join(out, "unet")).to(args.device).eval()
        text2 = PeftModel.from_pretrained(parts.text_encoder(), os.path.join(out, "text_encoder")).to(args.device)
        same = torch.equal(unet2(latents, t, text2.eval()(input_ids[:2])[0]).sample, expected)
        unet_merged, text_merged = unet2.merge_and_unload(), text2.merge_and_unload()
        merged = unet_merged(latents, t, text_merged(input_ids[:2])[0]).sample
        merged_ok = torch.allclose(merged, expected, atol=1e-4, rtol=1e-4)
    print(f"adapters saved to {out}; reloaded adapters give identical predictions: {same}")
    print(f"merged models match: {merged_ok}")

    latent_shape = (1, unet_merged.config.in_channels, *(2 * [unet_merged.config.sample_size]))
    image = sample(unet_merged, text_merged, vae, scheduler, input_ids[:1], latent_shape, args.sample_steps, gen)
    print(f"sampled one image {tuple(image.shape)} in {args.sample_steps} denoising steps")
    if not (same and merged_ok):
        raise SystemExit("reloaded or merged models do not reproduce the trained ones")


if __name__ == "__main__":
    main()
