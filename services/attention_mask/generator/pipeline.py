"""FreeMaskTextToImagePipeline: text -> image with classifier-free guidance, diffusers style.

It runs the small pixel-space model shipped in the repo and, given a `vae`,
a latent model such as Stable Diffusion 1.5 (UNet + CLIP + VAE from a local
path), so the attention-mask service drives both through the same code:
`unet(sample, t, encoder_hidden_states=..., cross_attention_kwargs=...)` with
the attention processors the service installs.

`save_pretrained` writes a standard diffusers directory whose model_index.json
names this class as `["pipeline", "FreeMaskTextToImagePipeline"]` next to a
two-line `pipeline.py` shim, which is how diffusers 0.42 resolves a custom
pipeline from a local folder with no network.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

PIPELINE_SHIM = (
    '"""Lets DiffusionPipeline.from_pretrained find the Free-Mask pipeline class (diffusers custom pipeline)."""\n'
    "from freemask.attention_mask.generator.pipeline import FreeMaskTextToImagePipeline  # noqa: F401\n"
)
MAX_PROMPT_CHARS = 1000


@dataclass
class FreeMaskPipelineOutput(BaseOutput):
    images: np.ndarray | list[Image.Image] | torch.Tensor  # np: uint8 (N, H, W, 3); pt: float (N, 3, H, W) in [0, 1]


class FreeMaskTextToImagePipeline(DiffusionPipeline):
    """Text-to-image generation from a cross-attention UNet, a text encoder, a tokenizer and a scheduler.

    Components:
        unet: `UNet2DConditionModel` whose cross_attention_dim equals the encoder's width.
        text_encoder: anything returning `(hidden_states, ...)` from `(input_ids)`: our
            `WordTextEncoder` or SD's `CLIPTextModel`.
        tokenizer: a transformers tokenizer padding to `model_max_length`.
        scheduler: a diffusers sampling scheduler (DDIM, DPM-Solver, ...).
        vae: optional; absent means the UNet works in pixel space.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet: UNet2DConditionModel, text_encoder: torch.nn.Module, tokenizer: Any,
                 scheduler: Any, vae: Any = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              vae=vae)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    # ---- saving and loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(  # type: ignore[override]
            cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a local generator folder; no flag needed when its pipeline.py is exactly our shim.

        diffusers treats any pipeline.py as remote code and asks for
        trust_remote_code=True. Ours only imports this installed module, so
        it is trusted when it matches byte for byte; anything else still
        needs the caller's explicit consent.
        """
        shim = os.path.join(os.fspath(pretrained_model_name_or_path), "pipeline.py")
        if "trust_remote_code" not in kwargs and os.path.isfile(shim):
            with open(shim, encoding="utf-8") as f:
                if f.read() == PIPELINE_SHIM:
                    kwargs["trust_remote_code"] = True
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:  # type: ignore[override]
        """Save as usual, then point model_index.json at the `pipeline.py` shim so loading needs no hub."""
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = ["pipeline", type(self).__name__]
        if index.get("tokenizer") == ["transformers", "TokenizersBackend"]:
            # transformers 5 names its fast tokenizer TokenizersBackend; PreTrainedTokenizerFast is the
            # alias that transformers 4 also knows, so the folder opens with either.
            index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
        with open(os.path.join(save_directory, "pipeline.py"), "w", encoding="utf-8") as f:
            f.write(PIPELINE_SHIM)
        # safetensors files arrive owner-only (0600); images run as a non-root uid that must read them.
        for root, _, files in os.walk(save_directory):
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)

    # ---- steps --------------------------------------------------------------------------------------------
    # A small, briefly trained epsilon model leaves high-frequency residue with deterministic DDIM
    # (eta=0); the ancestral form (eta=1) re-injects noise each step and washes it out (seen on the
    # shipped model). SD users pass eta=0.0 as usual.
    default_eta: float = 1.0

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def check_inputs(self, prompt: str | Sequence[str], height: int, width: int, num_inference_steps: int,
                     guidance_scale: float, negative_prompt: str | Sequence[str] | None,
                     num_images_per_prompt: int) -> list[str]:
        """Every problem is a ValueError naming the argument, raised before any work is done."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if prompts is None:
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if not prompts:
            raise ValueError("prompt list is empty")
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"every prompt must be a string, got {type(p).__name__}")
            if not p.strip():
                raise ValueError("prompt is empty: describe the image, e.g. 'a photo of a dog on the grass'")
            if len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt has {len(p)} characters; at most {MAX_PROMPT_CHARS} are accepted")
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) not in (1, len(prompts)) or not all(isinstance(n, str) for n in negatives):
                raise ValueError("negative_prompt must be a string or one string per prompt")
        # SD's UNet pads odd latent sizes itself, so a VAE model only needs whole latents (multiples of 8 px);
        # the pixel model needs sizes its down-sampling stages divide exactly.
        stages = len(self.unet.config.block_out_channels) - 1
        multiple = self.vae_scale_factor if self.vae is not None else 2**stages
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or not 1 <= num_inference_steps <= self.scheduler.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be an int in [1, {self.scheduler.config.num_train_timesteps}],"
                             f" got {num_inference_steps!r}")
        if not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        return prompts

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids padded to the tokenizer's max length: the key axis of every cross-attention map."""
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], device: torch.device, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = True,
                      negative_prompts: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, negative embeddings or None), each repeated per image.

        The unconditional input is the empty prompt, which is what training
        substituted for 10 % of captions.
        """
        ids = self.tokenize(prompts).to(device)
        embeds = self.text_encoder(ids)[0].repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return embeds, None
        negatives = list(negative_prompts) if negative_prompts is not None else [""]
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        neg = self.text_encoder(self.tokenize(negatives).to(device))[0].repeat_interleave(num_images_per_prompt, 0)
        return embeds, neg

    def prepare_latents(self, batch_size: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
                        generator: torch.Generator | list[torch.Generator] | None,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """Starting noise (pixels, or VAE latents when a VAE is present), scaled for the scheduler."""
        shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size} images")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model output -> float images in [0, 1], (N, 3, H, W)."""
        if self.vae is not None:
            latents = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    @staticmethod
    def _generators(seed: int | Sequence[int] | None, generator: torch.Generator | list[torch.Generator] | None,
                    batch_size: int) -> torch.Generator | list[torch.Generator] | None:
        """`seed` is a convenience for `generator`: one int seeds the batch, a list seeds each image alone."""
        if seed is None:
            return generator
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            return torch.Generator("cpu").manual_seed(int(seed))
        seeds = list(seed)
        if len(seeds) != batch_size or not all(isinstance(s, (int, np.integer)) for s in seeds):
            raise ValueError(f"seed must be an int or {batch_size} ints (one per image)")
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def _safe_eta(self, timestep: Any, eta: float, last: bool) -> float:
        """The largest eta <= `eta` whose DDIM step stays real.

        DDIM's step takes sqrt(1 - a_prev - eta**2 * var). From a timestep whose
        a_t is ~0 (t=999 of the cosine schedule) that is ~(1 - a_prev)(1 - eta**2):
        zero at eta=1, and float32 rounding makes it negative, so the image turns
        to NaN at some step counts (5 steps did; 4 and 6 did not). The last
        step ends deterministically: its noise would be at most ~1 grey level.
        """
        if last or eta <= 0.0:
            return 0.0
        config = self.scheduler.config
        t = int(timestep)
        prev_t = t - config.num_train_timesteps // self.scheduler.num_inference_steps
        alphas = self.scheduler.alphas_cumprod.double()
        a_t = float(alphas[t])
        a_prev = float(alphas[prev_t]) if prev_t >= 0 else float(self.scheduler.final_alpha_cumprod)
        variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        if variance <= 0.0:
            return eta
        return min(eta, 0.999 * ((1.0 - a_prev) / variance) ** 0.5)

    # ---- the call -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 3.0, eta: float | None = None,
                 negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 seed: int | Sequence[int] | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "np", return_dict: bool = True,
                 cross_attention_kwargs: dict[str, Any] | None = None,
                 callback_on_step_end: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]] | None = None,
                 ) -> FreeMaskPipelineOutput | tuple[Any]:
        """Generate images; same prompt, seed and steps give identical pixels.

        `callback_on_step_end(pipe, step, timestep, {"latents": ...})` runs
        after each step (e.g. to collect attention maps per step); returning
        a dict with "latents" replaces them. `output_type` is "np" (uint8
        NHWC), "pil" or "pt" (float NCHW in [0, 1]). `eta` is DDIM's noise
        level (0 deterministic-ODE, 1 ancestral like DDPM); None takes the
        pipeline's default, `default_eta`, ignored by schedulers without eta.
        """
        # 1. Check inputs; default size from the UNet
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        prompts = self.check_inputs(prompt, height, width, num_inference_steps, guidance_scale, negative_prompt,
                                    num_images_per_prompt)
        if output_type not in ("np", "pil", "pt"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'pt', got {output_type!r}")
        batch_size = len(prompts) * num_images_per_prompt
        generator = self._generators(seed, generator, batch_size)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

        # 2. Encode the prompt (and the empty prompt for classifier-free guidance)
        negatives = None if negative_prompt is None else (
            [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt))
        embeds, neg_embeds = self.encode_prompt(prompts, device, num_images_per_prompt, do_cfg, negatives)
        if neg_embeds is not None:
            embeds = torch.cat([neg_embeds, embeds])

        # 3. Timesteps and per-step options
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        step_kwargs: dict[str, Any] = {}
        requested_eta = self.default_eta if eta is None else float(eta)
        if "eta" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["eta"] = requested_eta

        # 4. Starting noise
        latents = self.prepare_latents(batch_size, height, width, embeds.dtype, device, generator, latents)

        # 5. Denoising loop
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            noise = self.unet(model_in, t, encoder_hidden_states=embeds,
                              cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
            if do_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            if "eta" in step_kwargs:
                step_kwargs["eta"] = self._safe_eta(t, requested_eta, last=i == len(timesteps) - 1)
            latents = self.scheduler.step(noise, t, latents, generator=generator, return_dict=False, **step_kwargs)[0]
            if callback_on_step_end is not None:
                out = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                latents = out.get("latents", latents)

        # 6. Decode and convert
        images = self.decode(latents)
        self.maybe_free_model_hooks()
        if output_type == "pt":
            result: Any = images
        else:
            result = (images.permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
            if output_type == "pil":
                result = [Image.fromarray(im) for im in result]
        if not return_dict:
            return (result,)
        return FreeMaskPipelineOutput(images=result)
