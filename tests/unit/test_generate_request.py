"""validate_generate_request, and how its errors (and others) map to gRPC status codes."""

from __future__ import annotations

import math

import grpc
import pytest

from freemask.attention_mask.requests import MAX_INFERENCE_STEPS, validate_generate_request
from freemask.shared.config import ConfigError, LimitsConfig, WorldConfig
from freemask.shared.errors import InvalidInput, NotFound, Unavailable, Unusable
from freemask.shared.grpc_runtime import status_for
from freemask.shared.keys import InvalidIdError
from freemask.v1 import common_pb2, generate_pb2

WORLD = WorldConfig(
    classes=("cat", "dog"), backgrounds=("grass", "sky"), prompt_templates=("a photo of a {cls} on the {background}",)
)
LIMITS = LimitsConfig(max_prompt_chars=40, max_image_side_px=512)


def make_request(**changes: object) -> generate_pb2.GenerateRequest:
    fields: dict[str, object] = {
        "run_id": "run-1",
        "round": 0,
        "sample_id": "s-0-0-057b92e9c066",
        "class_name": "cat",
        "background_name": "grass",
        "prompt": "a photo of a cat on the grass",
        "seed": 42,
    }
    fields.update(changes)
    return generate_pb2.GenerateRequest(**fields)


def size(width: int, height: int) -> common_pb2.ImageSize:
    return common_pb2.ImageSize(width=width, height=height)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"num_inference_steps": 50, "guidance_scale": 7.5, "image_size": size(64, 64)},
        {"num_inference_steps": 1, "guidance_scale": 0.0, "image_size": size(8, 8)},
        {"num_inference_steps": MAX_INFERENCE_STEPS, "guidance_scale": 30.0, "image_size": size(512, 504)},
        {"prompt": "cats " * 8, "round": 9999, "seed": 2**64 - 1},
        {"class_name": "dog", "background_name": "sky", "prompt": "a dog in the sky"},
    ],
)
def test_valid_requests_pass(changes: dict) -> None:
    request = make_request(**changes)
    assert validate_generate_request(request, WORLD, LIMITS) is request


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"class_name": "unicorn"}, "unknown class 'unicorn'; known classes: cat, dog"),
        ({"class_name": "Cat"}, "unknown class 'Cat'"),
        ({"class_name": ""}, "unknown class ''"),
        ({"background_name": "moon"}, "unknown background 'moon'; known backgrounds: grass, sky"),
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": " \t\n "}, "prompt is empty"),
        ({"prompt": "y" * 41}, "prompt has 41 characters; the limit is 40"),
        ({"run_id": ""}, "run_id '' is not a valid id"),
        ({"run_id": "../other-run"}, "run_id '../other-run' is not a valid id"),
        ({"run_id": "Run-1"}, "run_id 'Run-1' is not a valid id"),
        ({"sample_id": "s/1"}, "sample_id 's/1' is not a valid id"),
        ({"sample_id": "x" * 65}, "sample_id"),
        ({"round": 10_000}, "round 10000 must be an integer in [0, 10000)"),
        ({"num_inference_steps": 0}, "num_inference_steps 0 is outside [1, 1000]"),
        ({"num_inference_steps": 1001}, "num_inference_steps 1001 is outside [1, 1000]"),
        ({"num_inference_steps": 5000}, "num_inference_steps 5000 is outside [1, 1000]"),
        ({"guidance_scale": math.nan}, "guidance_scale nan is outside [0, 30]"),
        ({"guidance_scale": math.inf}, "guidance_scale inf is outside [0, 30]"),
        ({"guidance_scale": -1.0}, "guidance_scale -1.0 is outside [0, 30]"),
        ({"guidance_scale": 31.0}, "guidance_scale 31.0 is outside [0, 30]"),
        ({"image_size": size(100, 64)}, "image_size.width 100 must be a multiple of 8 in [8, 512]"),
        ({"image_size": size(64, 60)}, "image_size.height 60 must be a multiple of 8"),
        ({"image_size": size(520, 64)}, "image_size.width 520 must be a multiple of 8 in [8, 512]"),
        ({"image_size": size(0, 64)}, "image_size.width 0"),
        ({"image_size": size(64, 4096)}, "image_size.height 4096"),
    ],
)
def test_each_invalid_field_raises_invalid_input_naming_it(changes: dict, problem: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_generate_request(make_request(**changes), WORLD, LIMITS)
    message = str(info.value)
    assert message.startswith("invalid GenerateRequest: ")
    assert problem in message


def test_several_problems_are_reported_together() -> None:
    request = make_request(
        run_id="Bad/Run", class_name="unicorn", prompt="  ", num_inference_steps=0, image_size=size(9, 8)
    )
    with pytest.raises(InvalidInput) as info:
        validate_generate_request(request, WORLD, LIMITS)
    message = str(info.value)
    for problem in ("run_id 'Bad/Run'", "unknown class 'unicorn'", "prompt is empty", "num_inference_steps 0",
                    "image_size.width 9"):
        assert problem in message
    assert "image_size.height" not in message


def test_huge_untrusted_values_are_not_echoed_in_full() -> None:
    request = make_request(run_id="R" * 100_000, class_name="c" * 100_000, prompt="p" * 100_000)
    with pytest.raises(InvalidInput) as info:
        validate_generate_request(request, WORLD, LIMITS)
    assert len(str(info.value)) < 1_000
    assert "prompt has 100000 characters" in str(info.value)


def test_limits_come_from_the_config() -> None:
    request = make_request(prompt="a photo of a cat on the grass", image_size=size(1024, 1024))
    validate_generate_request(request, WORLD, LimitsConfig(max_prompt_chars=100, max_image_side_px=1024))
    with pytest.raises(InvalidInput, match="prompt has 29 characters; the limit is 28"):
        validate_generate_request(request, WORLD, LimitsConfig(max_prompt_chars=28, max_image_side_px=1024))


# --- error -> gRPC status -------------------------------------------------------


class _Custom(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidIdError("bad id"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("gone"), grpc.StatusCode.NOT_FOUND),
        (Unavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (Unusable("empty mask"), grpc.StatusCode.FAILED_PRECONDITION),
        (NotImplementedError(), grpc.StatusCode.UNIMPLEMENTED),
        # the base classes of our errors are not ours: they are bugs, hence INTERNAL
        (ValueError("x"), grpc.StatusCode.INTERNAL),
        (ConfigError("x"), grpc.StatusCode.INTERNAL),
        (KeyError("x"), grpc.StatusCode.INTERNAL),
        (LookupError("x"), grpc.StatusCode.INTERNAL),
        (RuntimeError("x"), grpc.StatusCode.INTERNAL),
        (TypeError("x"), grpc.StatusCode.INTERNAL),
        (ZeroDivisionError(), grpc.StatusCode.INTERNAL),
        (_Custom(), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_for(error: BaseException, code: grpc.StatusCode) -> None:
    assert status_for(error) is code
