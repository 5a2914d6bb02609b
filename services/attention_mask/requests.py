"""Validation of generation requests, shared by the gRPC API and the Kafka stage.

A request that fails here is answered INVALID_ARGUMENT (gRPC) or dead-lettered
at once (Kafka), before anything is generated or written.
"""

from __future__ import annotations

import math
import re

from freemask.shared.config import LimitsConfig, WorldConfig
from freemask.shared.errors import InvalidInput
from freemask.shared.keys import validate_id, validate_round
from freemask.v1 import generate_pb2

MAX_INFERENCE_STEPS = 1000
MAX_GUIDANCE_SCALE = 30.0
# The UNet downsamples by 8 (latent) and then by 2 per level; multiples of 8 keep
# every attention resolution an integer.
SIDE_MULTIPLE = 8


def validate_generate_request(
    request: generate_pb2.GenerateRequest, world: WorldConfig, limits: LimitsConfig
) -> generate_pb2.GenerateRequest:
    problems: list[str] = []

    def check(condition: bool, problem: str) -> None:
        if not condition:
            problems.append(problem)

    for what, value in (("run_id", request.run_id), ("sample_id", request.sample_id)):
        try:
            validate_id(value, what)
        except InvalidInput as err:
            problems.append(str(err))
    try:
        validate_round(request.round)
    except InvalidInput as err:
        problems.append(str(err))
    check(
        request.class_name in world.classes,
        f"unknown class {request.class_name[:64]!r}; known classes: {', '.join(world.classes)}",
    )
    check(
        request.background_name in world.backgrounds,
        f"unknown background {request.background_name[:64]!r}; known backgrounds: {', '.join(world.backgrounds)}",
    )
    prompt = request.prompt
    check(bool(prompt.strip()), "prompt is empty")
    check(
        len(prompt) <= limits.max_prompt_chars,
        f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}",
    )
    # The mask is read from the cross-attention of the class's own tokens, so the
    # prompt must name the class (a plural counts).
    if request.class_name in world.classes and prompt.strip() and len(prompt) <= limits.max_prompt_chars:
        check(
            re.search(rf"\b{re.escape(request.class_name)}(e?s)?\b", prompt, re.IGNORECASE) is not None,
            f"prompt does not name the class {request.class_name!r}",
        )
    if request.HasField("num_inference_steps"):
        check(
            1 <= request.num_inference_steps <= MAX_INFERENCE_STEPS,
            f"num_inference_steps {request.num_inference_steps} is outside [1, {MAX_INFERENCE_STEPS}]",
        )
    if request.HasField("guidance_scale"):
        check(
            math.isfinite(request.guidance_scale) and 0.0 <= request.guidance_scale <= MAX_GUIDANCE_SCALE,
            f"guidance_scale {request.guidance_scale} is outside [0, {MAX_GUIDANCE_SCALE:g}]",
        )
    if request.HasField("image_size"):
        for side_name in ("width", "height"):
            side = getattr(request.image_size, side_name)
            check(
                SIDE_MULTIPLE <= side <= limits.max_image_side_px and side % SIDE_MULTIPLE == 0,
                f"image_size.{side_name} {side} must be a multiple of {SIDE_MULTIPLE} "
                f"in [{SIDE_MULTIPLE}, {limits.max_image_side_px}]",
            )
    if problems:
        raise InvalidInput("invalid GenerateRequest: " + "; ".join(problems))
    return request
