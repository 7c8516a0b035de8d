"""L2 normalisation of embeddings: the one definition the engine, classifier serving and training share."""

from __future__ import annotations

import numpy as np

# A normalised float32 vector's norm is 1 within about 1e-6; raw CLIP and DINOv2 vectors are nowhere
# near 1. Treating a raw vector of norm 1 +- 1e-3 as normalised changes it by at most 0.1% anyway.
UNIT_NORM_TOLERANCE = 1e-3


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    """`vector` scaled to unit length (a zero vector stays zero), in its own dtype."""
    norm = float(np.linalg.norm(vector))
    return vector / np.asarray(norm, dtype=vector.dtype) if norm > 0 else vector


def looks_normalized(vector: np.ndarray) -> bool:
    """Whether a vector of unknown origin (a result from before the `normalized` flag) is unit length."""
    return abs(float(np.linalg.norm(np.asarray(vector, dtype=np.float64))) - 1.0) <= UNIT_NORM_TOLERANCE
