"""The operation registry's description and parameter validation (SPEC §4).

Lives in `schemas` so that `imgstream operations`, the worker's `/operations` and the
engine all read one table, and so a crawler can validate tasks without torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

WHOLE_IMAGE = "whole_image"
PROMINENT_PERSON = "prominent_person"
PROMINENT_FACE = "prominent_face"
TARGETS = (WHOLE_IMAGE, PROMINENT_PERSON, PROMINENT_FACE)
FACE_CONTEXTS = (PROMINENT_PERSON, WHOLE_IMAGE)

PERSON_MIN_SCORE = 0.5
FACE_MIN_SCORE = 0.95
DEFAULT_MAX_LENGTH = 50


class ParamSpec(BaseModel):
    """One parameter an operation accepts."""

    type: Literal["string", "integer", "number", "boolean"]
    description: str
    default: Any = None
    required: bool = False
    choices: list[str] | None = None
    minimum: float | None = None
    maximum: float | None = None


class OperationSpec(BaseModel):
    """What `imgstream operations` prints for one operation type."""

    description: str
    allowed_targets: list[str]
    default_target: str
    params: dict[str, ParamSpec] = Field(default_factory=dict)


def _target(targets: tuple[str, ...]) -> ParamSpec:
    return ParamSpec(type="string", description="Image region to work on.", default=targets[0], choices=list(targets))


_FACE_CONTEXT = ParamSpec(
    type="string",
    description="Where to look for the face: inside the prominent person's box (whole image if no person) "
    "or the whole image. Only used with target prominent_face.",
    default=PROMINENT_PERSON,
    choices=list(FACE_CONTEXTS),
)
_MIN_SCORE = ParamSpec(
    type="number",
    description=f"Minimum detector score for the target region (default {PERSON_MIN_SCORE} for a person, "
    f"{FACE_MIN_SCORE} for a face).",
    minimum=0.0,
    maximum=1.0,
)
_RETURN_CROP = ParamSpec(
    type="boolean", description="Include the PNG of the crop (base64) when a crop is used.", default=True
)
_NORMALIZE = ParamSpec(type="boolean", description="Return the L2-normalised vector.", default=False)

_REGION_TARGETS = (WHOLE_IMAGE, PROMINENT_PERSON, PROMINENT_FACE)
_REGION_PARAMS = {
    "target": _target(_REGION_TARGETS),
    "face_context": _FACE_CONTEXT,
    "min_score": _MIN_SCORE,
    "return_crop": _RETURN_CROP,
}

OPERATIONS: dict[str, OperationSpec] = {
    "detect_bounding_box": OperationSpec(
        description="Detects the bounding box [xmin, ymin, xmax, ymax] of the prominent person (Faster R-CNN) "
        "or face (MTCNN); null when none is found.",
        allowed_targets=[PROMINENT_PERSON, PROMINENT_FACE],
        default_target=PROMINENT_PERSON,
        params={
            "target": _target((PROMINENT_PERSON, PROMINENT_FACE)),
            "face_context": _FACE_CONTEXT,
            "min_score": _MIN_SCORE,
        },
    ),
    "embed_clip_vit_b_32": OperationSpec(
        description="CLIP ViT-B/32 image embedding (open_clip ViT-B-32-quickgelu, OpenAI weights), 512 floats.",
        allowed_targets=list(_REGION_TARGETS),
        default_target=WHOLE_IMAGE,
        params={**_REGION_PARAMS, "normalize": _NORMALIZE},
    ),
    "embed_dino_v2": OperationSpec(
        description="DINOv2 base image embedding (CLS token after the final layer norm), 768 floats.",
        allowed_targets=list(_REGION_TARGETS),
        default_target=WHOLE_IMAGE,
        params={**_REGION_PARAMS, "normalize": _NORMALIZE},
    ),
    "classify": OperationSpec(
        description="Classifies an image region with the trained classifier of a collection: "
        "{is_in_collection, probability, threshold}. The classifier decides region and embedding.",
        allowed_targets=list(_REGION_TARGETS),
        default_target=WHOLE_IMAGE,
        params={
            **_REGION_PARAMS,
            "target": ParamSpec(
                type="string",
                description="Optional; must agree with the classifier's own region when given.",
                choices=list(_REGION_TARGETS),
            ),
            "collection_id": ParamSpec(type="integer", description="Collection whose classifier to use.", required=True),
            "normalize": ParamSpec(
                type="boolean",
                description="Accepted and ignored: the classifier's record says whether its input is "
                "L2-normalised, and serving builds exactly that input.",
            ),
        },
    ),
    "describe_image": OperationSpec(
        description="Generates a caption of an image region (default BLIP base captioning).",
        allowed_targets=list(_REGION_TARGETS),
        default_target=WHOLE_IMAGE,
        params={
            **_REGION_PARAMS,
            "max_length": ParamSpec(
                type="integer",
                description="Maximum number of new tokens in the caption.",
                default=DEFAULT_MAX_LENGTH,
                minimum=1,
                maximum=512,
            ),
        },
    ),
}


class UnsupportedOperation(Exception):
    """The task names an operation this server does not have."""


class InvalidParams(Exception):
    """A task parameter is unknown, of the wrong type or out of range."""


def _coerce(name: str, spec: ParamSpec, value: Any) -> Any:
    if spec.type == "boolean":
        if not isinstance(value, bool):
            raise InvalidParams(f"param '{name}' must be a boolean, got {value!r}")
        return value
    if spec.type == "integer":
        # Accept integral numbers and digit strings (crawlers often send ids as strings); reject bools.
        if isinstance(value, bool):
            raise InvalidParams(f"param '{name}' must be an integer, got {value!r}")
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise InvalidParams(f"param '{name}' must be an integer, got {value!r}")
    elif spec.type == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidParams(f"param '{name}' must be a number, got {value!r}")
        value = float(value)
    elif spec.type == "string":
        if not isinstance(value, str):
            raise InvalidParams(f"param '{name}' must be a string, got {value!r}")
        if spec.choices is not None and value not in spec.choices:
            raise InvalidParams(f"param '{name}' must be one of {spec.choices}, got {value!r}")
    if spec.minimum is not None and value < spec.minimum:
        raise InvalidParams(f"param '{name}' must be >= {spec.minimum:g}, got {value!r}")
    if spec.maximum is not None and value > spec.maximum:
        raise InvalidParams(f"param '{name}' must be <= {spec.maximum:g}, got {value!r}")
    return value


def resolve_params(op_type: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate a task's params against the registry and fill in defaults.

    Raises UnsupportedOperation or InvalidParams with a message a user can act on.
    """
    spec = OPERATIONS.get(op_type)
    if spec is None:
        raise UnsupportedOperation(f"Unsupported operation type: '{op_type}'. Available: {sorted(OPERATIONS)}")
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise InvalidParams(f"unknown param(s) {unknown} for '{op_type}'; allowed: {sorted(spec.params)}")
    target = params.get("target")
    if target is not None and target not in spec.allowed_targets:
        raise InvalidParams(f"Unsupported target {target!r} for '{op_type}'. Allowed: {spec.allowed_targets}")
    resolved: dict[str, Any] = {}
    for name, pspec in spec.params.items():
        value = params.get(name)
        if value is None:
            if pspec.required:
                raise InvalidParams(f"param '{name}' is required for '{op_type}'")
            resolved[name] = pspec.default
        else:
            resolved[name] = _coerce(name, pspec, value)
    if op_type != "classify" and resolved["target"] is None:
        resolved["target"] = spec.default_target
    return resolved


def describe_operations() -> dict[str, Any]:
    """The registry as plain JSON-able data: type -> {description, allowed_targets, default_target, params}."""
    return {name: spec.model_dump(exclude_none=True) for name, spec in OPERATIONS.items()}
