"""The attention-mask core: prompts in, images with soft maps and refined masks out.

One diffusion pass per batch of prompts, with the capture processors installed
(`capture.py`): cross-attention of each prompt's class word at every attention
resolution, and self-attention at one grid when it is the affinity. After the
pass the maps are fused (eq. 1/2, `aggregate.py`), the affinity is taken (the
learned head on the generated images, `affinity.py`, or the self-attention),
and each sample's mask is refined (random walk + eq. 23, `refine.py`).

Works with any diffusers text-to-image pipeline whose UNet is a
`UNet2DConditionModel`: the shipped small generator (pixel space, word
tokenizer) or Stable Diffusion 1.5 from a path (VAE, CLIP tokenizer). Plain
Python and torch; no network, no store, no bus.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from freemask.attention_mask.affinity import (
    DEFAULT_WEIGHTS_DIR as DEFAULT_AFFINITY_DIR,
    AffinityHead,
    affinity_head_version,
    learned_affinities,
    load_affinity_head,
)
from freemask.attention_mask.aggregate import Resolution, soft_maps
from freemask.attention_mask.capture import AttentionStore, capture_attention
from freemask.attention_mask.cuda_graphs import graphed_unet
from freemask.attention_mask.generator import WEIGHTS_DIR, FreeMaskTextToImagePipeline, token_words
from freemask.attention_mask.refine import RefineConfig, refine_batch
from freemask.shared.config import AttentionMaskConfig
from freemask.shared.devices import resolve_device
from freemask.shared.errors import InvalidInput, Unusable

SHIPPED_PIPELINE = ("pipeline", FreeMaskTextToImagePipeline.__name__)  # model_index.json's _class_name


@dataclass(frozen=True)
class ObjectPrompt:
    """One object to draw; every field already validated and defaulted."""

    prompt: str
    class_name: str
    seed: int
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int

    @property
    def pass_key(self) -> tuple[int, float, int, int]:
        """Prompts that share this key can run in one diffusion pass."""
        return (self.num_inference_steps, self.guidance_scale, self.height, self.width)


@dataclass(frozen=True)
class GeneratedObject:
    """What one prompt produced: the store writes these arrays, the metadata records the rest."""

    image: np.ndarray  # (H, W, 3) uint8
    soft_map: np.ndarray  # (H, W) float32 in [0, 1]: the fused class-word map (eq. 2)
    mask: np.ndarray  # (H, W) bool: the refined mask
    threshold: float  # τ chosen by eq. 23
    threshold_iou: float  # IoU of that τ's mask with the propagated map
    token_positions: tuple[int, ...]  # the class word's tokens in the encoded prompt
    cross_attention_resolutions: tuple[Resolution, ...]
    affinity_resolution: Resolution

    def require_mask(self, what: str, max_fraction: float | None = None) -> GeneratedObject:
        """Self, if the mask has a pixel and covers at most `max_fraction` of the image (None: any share).

        Both are results nobody can use: an empty mask, and one larger than any single object
        can be, which is what the refinement makes of a picture in which the generator drew no
        object (the walk spreads over the background, which is then labelled as the class).
        """
        if not self.mask.any():
            raise Unusable(f"the refined mask of {what} is empty: the class word attended nowhere")
        fraction = float(self.mask.mean())
        if max_fraction is not None and fraction > max_fraction:
            raise Unusable(f"the refined mask of {what} covers {fraction:.0%} of the image, more than "
                           f"attention_mask.max_mask_fraction={max_fraction:g}: most likely no object was drawn")
        return self

    @property
    def mask_box(self) -> tuple[int, int, int, int]:
        """(x, y, width, height) of the mask's tight box."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = np.flatnonzero(self.mask.any(axis=0))
        return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def class_token_positions(tokenizer: Any, prompt: str, class_name: str) -> tuple[int, ...]:
    """Positions of every token of every mention of `class_name` (or its plural) in `prompt`.

    A BPE tokenizer may split a word into several tokens; all of them are kept and
    merged later (eq. 1). A mention truncated away by the tokenizer's length limit
    does not count, so a prompt whose only mention is cut off is rejected.
    """
    pattern = re.compile(rf"{re.escape(class_name.lower())}(e?s)?")
    positions = tuple(pos for pos, word in token_words(tokenizer, prompt) if pattern.fullmatch(word))
    if not positions:
        raise InvalidInput(
            f"the prompt's encoding has no token for the class {class_name!r}: it is missing, or beyond the "
            f"{tokenizer.model_max_length}-token limit of the text encoder"
        )
    return positions


def weights_digest(weights: Path) -> str:
    """A short content digest of a diffusers folder's weights: the generator's version when none is configured."""
    digest = hashlib.sha256()
    files = sorted(p for p in weights.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))
    if not files:
        raise InvalidInput(f"{weights} holds no diffusers weights (no .safetensors or .json files)")
    for path in files:
        digest.update(str(path.relative_to(weights)).encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256-" + digest.hexdigest()[:16]


def load_pipeline(weights: Path, device: torch.device) -> Any:
    """Open a diffusers folder from disk only (never a hub); fp16 on GPU, fp32 on CPU."""
    from diffusers import DiffusionPipeline  # heavy import, kept off module import
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Both libraries print through a plain-text handler of their own and draw tqdm bars while
    # loading, which would break the service's one-JSON-object-per-line logs: their records go
    # through the process's own handler instead, and loading draws no bar.
    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()

    index_path = weights / "model_index.json"
    if not index_path.is_file():
        raise InvalidInput(f"{weights} is not a diffusers folder: model_index.json is missing")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    options: dict[str, Any] = {"local_files_only": True}
    if device.type == "cuda":
        options["torch_dtype"] = torch.float16
    if "safety_checker" in index:
        # Generated training data is not shown to anyone; the checker would blank images at random.
        options.update(safety_checker=None, requires_safety_checker=False)
    # Our own generator folder goes through its class, which trusts exactly its own pipeline.py
    # shim; any other custom code in an operator's folder is refused by diffusers.
    loader = FreeMaskTextToImagePipeline if index.get("_class_name") == list(SHIPPED_PIPELINE) else DiffusionPipeline
    pipe = loader.from_pretrained(weights, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class MaskGenerator:
    """Draws objects from prompts and extracts their masks; one per process, reused across calls."""

    def __init__(self, pipe: Any, config: AttentionMaskConfig, version: str,
                 affinity_head: AffinityHead | None = None, affinity_version: str | None = None) -> None:
        if (config.affinity == "learned") != (affinity_head is not None):
            raise InvalidInput(f"attention_mask.affinity={config.affinity!r} needs "
                               + ("an affinity head" if affinity_head is None else "no affinity head"))
        self.pipe = pipe
        self.config = config
        self.version = version
        self.affinity_head = affinity_head.to(pipe.unet.device) if affinity_head is not None else None
        self.affinity_version = affinity_version
        # Capture installs its processors on the one shared UNet for the length of a pass, so
        # two passes at once (gRPC worker threads and the stage worker share this generator)
        # would write into each other's stores: passes run one at a time.
        self._unet_lock = threading.Lock()
        # Compiled lazily, at the first pass that records its steps (see step_graphs).
        self._compiled_unet_forward: Any = None
        self.refine_config = RefineConfig(beta=config.refine_beta, iterations=config.refine_iterations,
                                          cut=config.refine_cut,
                                          reference_threshold=config.refine_reference_threshold,
                                          min_component_fraction=config.min_component_fraction)

    @classmethod
    def from_config(cls, config: AttentionMaskConfig) -> MaskGenerator:
        weights = config.weights or WEIGHTS_DIR
        version = config.weights_version or weights_digest(weights)
        pipe = load_pipeline(weights, resolve_device(config.device, "attention_mask.device"))
        if config.affinity == "self_attention":
            return cls(pipe, config, version)
        head_dir = config.affinity_weights or DEFAULT_AFFINITY_DIR
        return cls(pipe, config, version, load_affinity_head(head_dir), affinity_head_version(head_dir))

    @property
    def affinity_source(self) -> str:
        """meta.json's record of where each mask's affinity came from."""
        if self.affinity_head is None:
            return "self-attention"
        return f"learned head {self.affinity_version or 'unversioned'}"

    def reconfigured(self, **updates: Any) -> MaskGenerator:
        """The same loaded models under a changed config (refinement knobs, batch size, ...)."""
        return MaskGenerator(self.pipe, self.config.model_copy(update=updates), self.version,
                             self.affinity_head, self.affinity_version)

    @property
    def native_size(self) -> int:
        """The side the UNet was trained at, in pixels (512 for SD 1.5, 32 for the small generator)."""
        vae = getattr(self.pipe, "vae", None)
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        return int(self.pipe.unet.config.sample_size) * scale

    @property
    def latent_scale(self) -> int:
        return self.native_size // int(self.pipe.unet.config.sample_size)

    def attention_resolutions(self, height: int, width: int) -> list[Resolution]:
        """The grids on which the UNet attends (down, mid and up blocks alike), largest first."""
        config = self.pipe.unet.config
        latent = (height // self.latent_scale, width // self.latent_scale)

        def grid(level: int) -> Resolution:  # diffusers downsamples with padding: sides round up
            return (-(-latent[0] // 2**level), -(-latent[1] // 2**level))

        sides = {grid(level) for level, block in enumerate(config.down_block_types) if "CrossAttn" in block}
        if "CrossAttn" in (config.mid_block_type or ""):
            sides.add(grid(len(config.down_block_types) - 1))  # SD 1.5's 8x8 grid exists only in its mid block
        return sorted(sides, reverse=True)

    def affinity_resolution(self, height: int, width: int) -> Resolution:
        """The grid the random walk runs on, no side above `affinity_max_side`.

        The learned head sees the image halved until it fits; self-attention is taken on the
        largest attention grid that fits.
        """
        limit = self.config.affinity_max_side
        if self.affinity_head is not None:
            factor = 1
            while max(height, width) > limit * factor:
                factor *= 2
            return (-(-height // factor), -(-width // factor))
        grids = self.attention_resolutions(height, width)
        fitting = [grid for grid in grids if max(grid) <= limit]
        if not fitting:
            raise InvalidInput(f"no attention grid of a {height}x{width} image has a side <= "
                               f"affinity_max_side={limit}; grids: {grids}")
        return fitting[0]

    def self_attention_grids(self, grid: Resolution) -> list[Resolution]:
        """What the capture must record for the affinity: nothing when the learned head gives it."""
        return [] if self.affinity_head is not None else [grid]

    def affinities(self, images: torch.Tensor, store: AttentionStore, grid: Resolution) -> torch.Tensor:
        """``(B, N, N)`` affinities over `grid` for a pass's `images` (B, 3, H, W) in [0, 1]."""
        if self.affinity_head is not None:
            return learned_affinities(self.affinity_head, images, grid)
        return store.self_attention_means()[grid].float()

    def step_graphs(self) -> AbstractContextManager[object]:
        """Where the config asks for it, the denoising steps of the block replay from CUDA graphs.

        With `compile_unet`, the graphs hold the torch.compile'd UNet's kernels. Compiled with
        static shapes: a dynamic batch would not survive the capture processors, whose
        arithmetic depends on it (the conditional half, the self-attention head groups).
        """
        if not self.config.cuda_graphs:
            return nullcontext()
        if self.config.compile_unet and self._compiled_unet_forward is None:
            # 1x1 convolutions as matrix products: SD 1.5's transformer blocks project in and out with them.
            self._compiled_unet_forward = torch.compile(self.pipe.unet.forward, dynamic=False,
                                                        options={"conv_1x1_as_mm": True})
        return graphed_unet(self.pipe.unet, self._compiled_unet_forward)

    def _check_size(self, height: int, width: int) -> None:
        """The UNet halves its grid three times, so the latent side must divide by 8."""
        if height % (self.latent_scale * 8) or width % (self.latent_scale * 8):
            raise InvalidInput(f"image size {width}x{height} must be a multiple of {self.latent_scale * 8} "
                               "for this generator")

    def prompt_for(self, prompt: str, class_name: str, seed: int, num_inference_steps: int | None = None,
                   guidance_scale: float | None = None, height: int | None = None,
                   width: int | None = None) -> ObjectPrompt:
        """An ObjectPrompt with the configured and native defaults filled in."""
        return ObjectPrompt(
            prompt=prompt, class_name=class_name, seed=int(seed),
            num_inference_steps=num_inference_steps or self.config.num_inference_steps,
            guidance_scale=self.config.guidance_scale if guidance_scale is None else float(guidance_scale),
            height=height or self.native_size, width=width or self.native_size,
        )

    def generate(self, prompts: Sequence[ObjectPrompt]) -> list[GeneratedObject]:
        """One GeneratedObject per prompt, in order; prompts run in passes of up to `max_batch`.

        All prompts are checked before any pass runs, so one bad prompt fails the whole call
        with nothing generated. A mask may come out empty; `require_mask` is the caller's check.
        """
        positions = [class_token_positions(self.pipe.tokenizer, p.prompt, p.class_name) for p in prompts]
        for p in prompts:
            self._check_size(p.height, p.width)
        results: list[GeneratedObject | None] = [None] * len(prompts)
        groups: dict[tuple[int, float, int, int], list[int]] = {}
        for index, p in enumerate(prompts):
            groups.setdefault(p.pass_key, []).append(index)
        for members in groups.values():
            for start in range(0, len(members), self.config.max_batch):
                chunk = members[start:start + self.config.max_batch]
                for index, result in zip(chunk, self._one_pass([prompts[i] for i in chunk],
                                                               [positions[i] for i in chunk])):
                    results[index] = result
        return [r for r in results if r is not None]

    @torch.no_grad()
    def segment(self, image: np.ndarray, prompt: str, class_names: Sequence[str], seed: int = 0,
                noise_level: float = 0.3) -> np.ndarray:
        """Generate-then-segment: each class word's fused cross-attention map on an existing image.

        The image is noised to `noise_level` of the schedule (seeded) and denoised for one
        UNet step with `prompt`, which must name every class; the class words' maps are fused
        as generation fuses them (eq. 1/2). Returns (len(class_names), H, W) float32 maps, each
        in [0, 1]. This is the path that segments a multi-object picture with attention alone,
        the baseline edited scenes are compared with: it has no notion of which object is in
        front where two overlap.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidInput(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        self._check_size(height, width)
        if not class_names:
            raise InvalidInput("name at least one class to segment")
        if not 0.0 <= noise_level < 1.0:
            raise InvalidInput(f"noise_level must be in [0, 1), got {noise_level}")
        positions = [class_token_positions(self.pipe.tokenizer, prompt, name) for name in class_names]
        unet, device = self.pipe.unet, self.pipe.unet.device
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(127.5).sub(1.0).to(device, unet.dtype)
        vae = getattr(self.pipe, "vae", None)
        latents = (pixels if vae is None
                   else vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
        timestep = torch.tensor([round(noise_level * (self.pipe.scheduler.config.num_train_timesteps - 1))])
        noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(seed))
        noisy = self.pipe.scheduler.add_noise(latents, noise.to(device, latents.dtype), timestep.to(device))
        embeds, _ = self.pipe.encode_prompt([prompt], device, len(class_names), do_classifier_free_guidance=False)
        with self._unet_lock, capture_attention(unet, [list(p) for p in positions]) as store:
            unet(noisy.repeat(len(class_names), 1, 1, 1), timestep.to(device), encoder_hidden_states=embeds,
                 return_dict=False)
        cross = store.cross_attention_means()
        fused = soft_maps({res: level.float().cpu() for res, level in cross.items()}, store.token_mask,
                          (height, width))
        return fused.numpy().astype(np.float32)

    def _one_pass(self, prompts: Sequence[ObjectPrompt], positions: Sequence[tuple[int, ...]]
                  ) -> list[GeneratedObject]:
        first = prompts[0]
        height, width = first.height, first.width
        affinity_grid = self.affinity_resolution(height, width)
        device = self.pipe.unet.device
        generators = [torch.Generator(device).manual_seed(p.seed) for p in prompts]
        with self._unet_lock, capture_attention(self.pipe.unet, [list(pos) for pos in positions],
                                                self_attention_resolutions=self.self_attention_grids(affinity_grid),
                                                classifier_free_guidance=first.guidance_scale > 1.0) as store, \
                self.step_graphs():
            images = self.pipe([p.prompt for p in prompts], height=height, width=width,
                               num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
                               generator=generators, output_type="pt").images
        # Fusion and the random walk stay on the UNet's device (on a GPU they cost little there,
        # while the CPU would hold the next pass back); only the results come back to the host.
        cross = store.cross_attention_means()
        images = images.float().clamp(0, 1)
        affinity = self.affinities(images, store, affinity_grid)
        fused = soft_maps({res: level.float() for res, level in cross.items()},
                          store.token_mask, (height, width))
        fused_host = fused.cpu().numpy().astype(np.float32)
        # Rounded to bytes before the copy: a quarter of the bytes cross to the host, and the
        # host does no per-pixel arithmetic (float32 × 255 and round-half-even, as numpy does).
        pixels = (images * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return [
            GeneratedObject(
                image=pixels[i], soft_map=fused_host[i], mask=refined.mask.numpy(),
                threshold=refined.threshold, threshold_iou=refined.iou,
                token_positions=positions[i], cross_attention_resolutions=tuple(sorted(cross, reverse=True)),
                affinity_resolution=affinity_grid,
            )
            for i, refined in enumerate(refine_batch(fused, affinity, affinity_grid, self.refine_config))
        ]
