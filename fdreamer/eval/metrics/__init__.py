"""Evaluation metrics (no Ray): CLIP FC/PC (paper Table 3), Fréchet distance on video features,
weight-free motion metrics (flow magnitude, warping error) and motion-direction accuracy on the
synthetic moving-shapes data.

All video inputs are uint8 numpy ``[T, H, W, 3]`` RGB.
"""

from fdreamer.eval.metrics.clip_scores import (
    PAIR_MODES,
    ClipCallables,
    ClipEncoder,
    clip_scores,
    frame_consistency,
    frame_consistency_from_embeddings,
    frame_embeddings,
    load_clip,
    prompt_consistency,
    text_embedding,
)
from fdreamer.eval.metrics.direction import (
    UNKNOWN,
    classify_motion,
    direction_accuracy,
    subject_colour,
    track_subject,
)
from fdreamer.eval.metrics.frechet import (
    I3DFeatureExtractor,
    PixelFlowFeatures,
    VideoFeatureExtractor,
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    video_frechet_distance,
)
from fdreamer.eval.metrics.motion import (
    dis_flow,
    mean_flow_magnitude,
    motion_metrics,
    warp_back,
    warping_error,
)

__all__ = [
    "PAIR_MODES", "UNKNOWN", "ClipCallables", "ClipEncoder", "I3DFeatureExtractor", "PixelFlowFeatures",
    "VideoFeatureExtractor", "classify_motion", "clip_scores", "direction_accuracy", "dis_flow", "subject_colour",
    "feature_stats", "frame_consistency", "frame_consistency_from_embeddings", "frame_embeddings",
    "frechet_distance", "frechet_distance_from_stats", "load_clip", "mean_flow_magnitude",
    "motion_metrics", "prompt_consistency", "text_embedding", "track_subject", "video_frechet_distance",
    "warp_back", "warping_error",
]
